"""``bench/machine.py``: the CPU line every CPU bench prints in its header (``make bench`` first)."""
from __future__ import annotations

import pytest
import torch

from bench.machine import cpu_features, describe, parse_cpuinfo

pytestmark = pytest.mark.unit

# /proc/cpuinfo of an AMD EPYC (Zen 4: AVX-512 with BF16 and VNNI, no AMX), abridged, two processors
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9454 48-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: something else
"""
# an AVX2-only server: none of the AVX-512 or AMX flags
AVX2_ONLY = "model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\nflags\t\t: sse avx avx2 fma\n"


def test_epyc_line_names_the_model_and_no_amx():
    line = describe(EPYC, environ={})
    assert line.startswith("CPU: AMD EPYC 9454 48-Core Processor (AuthenticAMD family 25 model 17), ")
    assert "AMX no, AVX-512-BF16 yes, AVX-512-VNNI yes, AVX-512 yes, AVX2 yes" in line
    assert f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}" in line
    assert "capped" not in line
    assert parse_cpuinfo(EPYC)["model name"] == "AMD EPYC 9454 48-Core Processor"   # the first processor


def test_avx2_only_and_caps_and_no_flags():
    line = describe(AVX2_ONLY, environ={"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "X": "1"})
    assert "AMX no, AVX-512-BF16 no, AVX-512-VNNI no, AVX-512 no, AVX2 yes" in line
    assert line.endswith("; capped by ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2")
    assert "features unknown" in describe("", environ={})
    assert cpu_features({"amx_tile"})["AMX"] is False          # AMX needs the tiles and bf16


def test_this_machine():
    line = describe()
    assert line.startswith("CPU: ") and "torch CPU capability" in line
