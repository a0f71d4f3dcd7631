"""``cleave bench`` agrees with an established load generator (NVIDIA AIPerf) on the same load.

Runs ``bench/external_loadgen.py``: one local stack, the same streaming ``/v1/completions``
load from both tools (AIPerf from its own virtual environment, created on first use), and
TTFT and throughput compared within 15%. Minutes (and a one-time AIPerf install), so ``slow``.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_cleave_bench_agrees_with_aiperf_within_15_percent(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "external_loadgen.py"), "--concurrency", "2",
                           "--requests", "16", "--isl", "64", "--osl", "24", "--json", str(out)],
                          capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["cleave_bench"]["requests"] == figures["aiperf"]["requests"] == 16
    for name in ("ttft_mean_ms", "ttft_p50_ms", "request_throughput", "output_token_throughput"):
        assert abs(figures["ratio"][name] - 1) <= 0.15, (name, figures)
