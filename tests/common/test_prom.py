"""Metrics a Prometheus server accepts without complaint.

Every Cleave series is named ``cleave_*`` (``:`` is reserved for recording rules) and no
counter or histogram exports a ``_created`` series; ``promtool check metrics`` (Prometheus'
own linter) is clean on the exposition of ``RouterMetrics`` and ``WorkerMetrics``, and on a
real router's ``/metrics`` and real workers' ``--metrics-port`` after they served requests.
``make test`` installs promtool into the venv; without it the promtool tests skip, saying so.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.prom import RouterMetrics, WorkerMetrics, layout_label

NAME = re.compile(r"cleave_[a-z0-9_]+")


# on PATH, or where `make test` puts it: beside the venv's python
PROMTOOL = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found on PATH or in the venv: `make test` installs it "
                             "(Makefile target promtool, from Debian's prometheus package)")


def promtool_check(text: str) -> tuple[int, str]:
    """``promtool check metrics`` of ``text``: its exit status and what it said (nothing when clean)."""
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return out.returncode, (out.stdout + out.stderr).strip()


def _router() -> RouterMetrics:
    m = RouterMetrics("m", running=lambda: 1, waiting=lambda: 0)
    m.first_token(0.05)
    m.tokens(0.02, 2)
    m.finished("stop", 10, 3, 0.2, 0.01, attempts=2)
    m.failed("unavailable", None, attempts=1)
    return m


def _worker() -> WorkerMetrics:
    m = WorkerMetrics("decode", lambda: "decode-a", layout_label({"tp": 1, "pp": 1, "cp": 1, "ep": 2}))
    for name in ("cleave_kv_cache_usage_perc", "cleave_prefill_queue_tokens", "cleave_batch_size"):
        m.gauges.add(name, "g", lambda: 0.5)
    m.gauges.add("cleave_expert_hotspot_ratio{layer}", "h", lambda: {0: 1.5})
    m.transfer(0.01, 1000)
    m.transfer_failed()
    m.decode_step(0.02, 3)
    return m


def _names(text: str) -> set[str]:
    """Every family and sample name in an exposition."""
    return {n for fam in text_string_to_metric_families(text) for n in (fam.name, *(s.name for s in fam.samples))}


@pytest.mark.unit
def test_every_name_is_cleave_underscore_and_there_is_no_created_series():
    worker = _worker()
    for text in (_router().exposition().decode(), generate_latest(worker.registry).decode()):
        names = _names(text)
        assert names and all(NAME.fullmatch(n) for n in names), sorted(names)
        assert "_created" not in text


@pytest.mark.unit
def test_worker_http_server_has_no_created_series_in_any_format():
    """The workers' HTTP server: the text format, OpenMetrics (where ``_created`` is legal but
    still left out, one set of series whatever the scraper asks), and ``name[]`` selections."""
    worker = _worker()
    port = worker.serve("127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{port}/metrics"
        asks = [(base, "text/plain"), (base, "application/openmetrics-text; version=1.0.0"),
                (base + "?name[]=cleave_kv_transfer_bytes_total&name[]=cleave_kv_transfer_bytes_created", "text/plain")]
        for url, accept in asks:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=10) as resp:
                text = resp.read().decode()
            assert "cleave_kv_transfer_bytes_total" in text and "_created" not in text, (url, accept, text)
    finally:
        worker.close()


@pytest.mark.unit
def test_created_series_are_dropped_per_registry_not_process_wide():
    _router(), _worker()
    plain = CollectorRegistry()
    Counter("other_things", "a registry that is not Cleave's", registry=plain).inc()
    assert "other_things_created" in generate_latest(plain).decode()  # no global switch was flipped


@pytest.mark.unit
@needs_promtool
def test_promtool_accepts_the_router_and_worker_exposition():
    for text in (_router().exposition().decode(), generate_latest(_worker().registry).decode()):
        assert promtool_check(text) == (0, "")


@pytest.mark.unit
@needs_promtool
def test_promtool_sees_a_colon():
    """The check bites: the names Cleave used to export are refused."""
    rc, said = promtool_check("# HELP cleave:batch_size b\n# TYPE cleave:batch_size gauge\ncleave:batch_size 1\n")
    assert rc != 0 and "cleave:batch_size" in said


@pytest.mark.e2e
@pytest.mark.timeout(600)
@needs_promtool
def test_promtool_accepts_a_real_router_and_real_workers_after_requests(tiny_stack):
    """The session's ``tiny_stack`` (router + prefill + decode processes) after a completion and
    a streamed one over HTTP: every histogram the requests touch has samples when it is linted."""
    before = tiny_stack.free_blocks()
    with urllib.request.urlopen(tiny_stack.http_url + "/models", timeout=10) as resp:
        model = json.loads(resp.read())["data"][0]["id"]
    for stream in (False, True):
        body = {"model": model, "prompt": [5, 17, 99], "max_tokens": 4, "temperature": 0, "stream": stream}
        req = urllib.request.Request(tiny_stack.http_url + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200 and resp.read()
    endpoints = {"router": tiny_stack.http_url.removesuffix("/v1") + "/metrics",
                 **{name: f"http://127.0.0.1:{port}/metrics" for name, port in tiny_stack.stack.metrics_ports.items()}}
    assert any(n.startswith("prefill") for n in endpoints) and any(n.startswith("decode") for n in endpoints)
    for name, url in endpoints.items():
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        counts = {s.name.removesuffix("_count"): s.value for fam in text_string_to_metric_families(text)
                  for s in fam.samples if s.name.endswith("_count")}
        histogram = "cleave_time_to_first_token_seconds" if name == "router" else "cleave_kv_transfer_seconds"
        assert counts.get(histogram, 0) >= 2, (name, histogram, counts)
        assert promtool_check(text) == (0, ""), (name, text)
    assert tiny_stack.wait_free_blocks(before) == before, "KV blocks leaked"


@pytest.mark.unit
def test_decode_steps_are_counted_by_the_tokens_they_make():
    m = WorkerMetrics("decode", lambda: "decode-a", layout_label({"tp": 1, "pp": 1, "cp": 1, "ep": 1}))
    m.decode_step(0.010, 1)
    m.decode_step(0.040, 16)
    value = lambda name: m.registry.get_sample_value(name, m.labels())   # noqa: E731
    assert value("cleave_decode_step_seconds_count") == 2
    assert value("cleave_decode_step_tokens_total") == 17
    assert value("cleave_decode_step_token_seconds_total") == pytest.approx(0.010 + 0.64)
    # the step the mean stream waits for: 16 of the 17 tokens came from the 40 ms step
    assert value("cleave_decode_step_token_seconds_total") / value("cleave_decode_step_tokens_total") == \
        pytest.approx(0.65 / 17)
