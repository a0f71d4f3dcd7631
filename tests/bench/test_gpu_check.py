"""``make gpu-check`` (bench/gpu_check/) where there is no GPU: it says so and exits 0, without
the virtualenv; its row protocol. The CPU dry run of every step (``GPU_CHECK_DEVICE=cpu``) takes
minutes and is run by hand (README "GPU check"), not here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench", "gpu_check"))
from rows import Row, emit, guard, parse, table  # noqa: E402

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path for machines without a GPU")
pytestmark = pytest.mark.timeout(120)


def _make(python: str, **env) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-s", "gpu-check", f"PYTHON={python}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=100, env={**os.environ, **env})


@pytest.mark.integration
@NO_GPU
def test_without_a_gpu_it_says_so_and_exits_0():
    done = _make(sys.executable, GPU_CHECK_DEVICE="auto")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA device present; nothing to check" in done.stdout
    assert "GPU_CHECK_DEVICE=cpu" in done.stdout                     # how to dry-run instead


@pytest.mark.integration
@NO_GPU
def test_asking_for_cuda_without_one_fails_and_bad_modes_are_refused():
    def run(mode):
        return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check", "run.py")], cwd=ROOT,
                              capture_output=True, text=True, timeout=100,
                              env={**os.environ, "GPU_CHECK_DEVICE": mode})
    cuda = run("cuda")
    assert cuda.returncode == 1 and "sees no CUDA device" in cuda.stdout
    bad = run("tpu")
    assert bad.returncode == 2 and "must be auto, cuda or cpu, got 'tpu'" in bad.stdout


@pytest.mark.integration
@NO_GPU
def test_a_python_without_torch_is_no_gpu_either():
    base = os.path.join(sys.base_prefix, "bin", "python3")
    if not os.path.exists(base) or subprocess.run([base, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without torch at hand")
    done = _make(base, GPU_CHECK_DEVICE="auto")
    assert done.returncode == 0 and "has no torch); nothing to check" in done.stdout, done.stdout + done.stderr


@pytest.mark.unit
def test_make_target_uses_the_given_python_and_never_the_venv():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under `make test`
    dry = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env=env)
    assert dry.returncode == 0
    assert dry.stdout.strip() == "python3 bench/gpu_check/run.py"


@pytest.mark.unit
def test_rows_round_trip_and_table(capsys):
    emit("handoff UCX cuda -> cuda", "pass", "256 MiB | 40 ms")
    with guard("parity tiny"):
        raise RuntimeError("boom")
    print("other log line")
    rows = parse(capsys.readouterr().out)
    assert rows == [Row("handoff UCX cuda -> cuda", "pass", "256 MiB | 40 ms"),
                    Row("parity tiny", "fail", "RuntimeError: boom")]
    assert table(rows).splitlines()[2:] == ["| handoff UCX cuda -> cuda | pass | 256 MiB / 40 ms |",
                                            "| parity tiny | FAIL | RuntimeError: boom |"]
    with pytest.raises(ValueError, match="result must be one of"):
        Row("x", "ok")
