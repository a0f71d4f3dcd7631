"""``cleave bench`` checked against an established load generator, NVIDIA AIPerf, on one load.

    python bench/external_loadgen.py [--concurrency 2] [--requests 24] [--isl 64] [--osl 32]

AIPerf lives in its own virtual environment (``bench/.venv-aiperf``, gitignored, created on
first use with ``pip install aiperf==0.13.*``) so its pins never meet ours. One local stack
(``services.launcher.LocalStack``, the default model) serves both tools, one after the other,
through the OpenAI-compatible ``/v1/completions`` endpoint, streaming, at the same fixed
concurrency, request count, prompt and output lengths (``ignore_eos``), each after a warm-up.
AIPerf makes its prompts from text with the model's tokenizer (saved from the served model)
and counts tokens from the server's ``usage`` (``--use-server-token-count``); ``cleave bench``
sends random token ids of the same length.

The stack runs on all cores but the last and both tools on the last one (CPU affinity,
``--no-pin`` turns it off): a load generator's own CPU use must not slow the server it
measures. Unpinned on 2 cores, AIPerf's processes (controller, dataset, timing, worker,
record processors) took ~37 CPU-seconds during a 27 s run and slowed the stack by ~25%,
which ``cleave bench`` (0.25 CPU-seconds) does not; ``client_cpu_s`` in the output shows it.

Prints TTFT (mean, p50), request and output-token throughput from both tools and their ratios;
``--max-diff 0.15`` makes the exit code 1 when a ratio is off by more (the slow test
``tests/bench/test_external_loadgen.py`` runs it so).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import resource
import time
import subprocess
import sys
import tempfile
import venv

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.launcher import LocalStack, StackConfig, workers  # noqa: E402
from services.loadgen.cli import bench  # noqa: E402
from services.loadgen.datasets import DatasetConfig, LengthDist  # noqa: E402
from services.loadgen.runner import LoadConfig  # noqa: E402

AIPERF_REQUIREMENT = "aiperf==0.13.*"
DEFAULT_ENV = ROOT / "bench" / ".venv-aiperf"
FIGURES = ("ttft_mean_ms", "ttft_p50_ms", "request_throughput", "output_token_throughput")


def ensure_aiperf(env_dir: pathlib.Path) -> pathlib.Path:
    """The ``aiperf`` executable of ``env_dir``, creating the environment when missing."""
    exe = env_dir / "bin" / "aiperf"
    if not exe.exists():
        print(f"creating {env_dir} with {AIPERF_REQUIREMENT} (once; a few minutes)", file=sys.stderr)
        venv.create(env_dir, with_pip=True, clear=True)
        subprocess.run([str(env_dir / "bin" / "pip"), "install", "-q", AIPERF_REQUIREMENT], check=True)
    return exe


def run_aiperf(exe: pathlib.Path, base_url: str, model: str, tokenizer_dir: str, out_dir: str, args) -> dict:
    cmd = [str(exe), "profile", "--model", model, "--url", base_url, "--endpoint-type", "completions",
           "--streaming", "--tokenizer", tokenizer_dir, "--isl", str(args.isl), "--isl-stddev", "0",
           "--osl", str(args.osl), "--osl-stddev", "0", "--extra-inputs", "ignore_eos:true",
           "--extra-inputs", "temperature:0", "--use-server-token-count", "--concurrency", str(args.concurrency),
           "--request-count", str(args.requests), "--warmup-request-count", str(args.warmup),
           "--random-seed", "0", "--artifact-dir", out_dir, "--ui-type", "none", "--no-server-metrics",
           "--no-gpu-telemetry", "--workers-max", "1"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"aiperf failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    found = sorted(pathlib.Path(out_dir).rglob("profile_export_aiperf.json"))
    if not found:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {out_dir}:\n{proc.stdout[-2000:]}")
    data = json.loads(found[-1].read_text())

    def metric(name: str, stat: str) -> float:
        entry = data[name] if name in data else data["records"][name]
        return float(entry[stat])
    return {"ttft_mean_ms": metric("time_to_first_token", "avg"), "ttft_p50_ms": metric("time_to_first_token", "p50"),
            "request_throughput": metric("request_throughput", "avg"),
            "output_token_throughput": metric("output_token_throughput", "avg"),
            "requests": int(metric("request_count", "avg")), "itl_mean_ms": metric("inter_token_latency", "avg"),
            "prompt_tokens_mean": metric("input_sequence_length", "avg"),
            "output_tokens_mean": metric("output_sequence_length", "avg"),
            "e2e_mean_ms": metric("request_latency", "avg"), "client_cpu_s": cpu_s,
            "duration_s": metric("benchmark_duration", "avg")}


def run_cleave_bench(base_url: str, vocab: int, args) -> dict:
    data = DatasetConfig(num_requests=args.requests, prompt=LengthDist(args.isl), output=LengthDist(args.osl),
                         token_range=(100, min(10_000, vocab)))
    cpu0 = time.process_time()
    (r,) = asyncio.run(bench("openai", base_url, data, [LoadConfig(concurrency=args.concurrency, warmup=args.warmup)]))
    cpu_s = time.process_time() - cpu0
    if r["requests_failed"]:
        raise RuntimeError(f"cleave bench: {r['requests_failed']} request(s) failed: {r['errors']}")
    return {"ttft_mean_ms": r["ttft_ms"]["mean"], "ttft_p50_ms": r["ttft_ms"]["p50"],
            "request_throughput": r["request_throughput"], "output_token_throughput": r["output_token_throughput"],
            "requests": r["requests_completed"], "tpot_mean_ms": r["tpot_ms"]["mean"],
            "prompt_tokens_mean": r["prompt_tokens"] / r["requests_completed"],
            "output_tokens_mean": r["output_tokens"] / r["requests_completed"], "e2e_mean_ms": r["e2e_ms"]["mean"],
            "client_cpu_s": cpu_s, "duration_s": r["duration_s"]}


def compare(ours: dict, theirs: dict) -> dict[str, float]:
    """cleave bench / AIPerf for each figure."""
    return {k: ours[k] / theirs[k] for k in FIGURES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model to serve ('' = the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight, both tools")
    ap.add_argument("--requests", type=int, default=24, help="measured requests, both tools")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before each tool's run")
    ap.add_argument("--isl", type=int, default=64, help="prompt tokens")
    ap.add_argument("--osl", type=int, default=32, help="output tokens (EOS ignored)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--aiperf-env", default=str(DEFAULT_ENV), help="virtual environment holding aiperf")
    ap.add_argument("--max-diff", type=float, default=0.0,
                    help="exit 1 when a cleave bench / AIPerf ratio is off by more than this (0 = report only)")
    ap.add_argument("--json", default="", help="write both tools' figures and the ratios to this file")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds AIPerf may take")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the stack and the load generators to separate cores")
    args = ap.parse_args(argv)
    exe = ensure_aiperf(pathlib.Path(args.aiperf_env))
    from engine.loader import load_tokenizer, resolve_model
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    stack = LocalStack(StackConfig(port=0, http_port=0, model=args.model, log_level="WARNING",
                                   **workers(threads=int(args.threads))))
    cores = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cores) >= 2
    with tempfile.TemporaryDirectory(prefix="cleave-aiperf-") as tmp:
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        try:
            if pin:
                os.sched_setaffinity(0, cores[:-1])  # the stack's processes inherit this
            stack.start()
            if pin:
                os.sched_setaffinity(0, cores[-1:])  # this process (cleave bench) and AIPerf
            ours = run_cleave_bench(stack.http_url, len(tokenizer), args)
            theirs = run_aiperf(exe, stack.http_url.removesuffix("/v1"), source.model_id,
                                os.path.join(tmp, "tokenizer"), os.path.join(tmp, "aiperf"), args)
        finally:
            stack.stop()
    ratios = compare(ours, theirs)
    where = f"stack on cores {cores[:-1]}, load generators on core {cores[-1]}" if pin else "unpinned"
    print(f"\nmodel {source.model_id}, /v1/completions streaming, concurrency {args.concurrency}, "
          f"{args.requests} requests, {args.isl} prompt + {args.osl} output tokens, {where}\n")
    print("| figure | cleave bench | AIPerf | ratio |")
    print("|---|---|---|---|")
    for k in FIGURES:
        print(f"| {k} | {ours[k]:.2f} | {theirs[k]:.2f} | {ratios[k]:.3f} |")
    for k in ("e2e_mean_ms", "prompt_tokens_mean", "output_tokens_mean", "client_cpu_s", "duration_s"):
        print(f"| {k} (context) | {ours[k]:.2f} | {theirs[k]:.2f} | |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"cleave_bench": ours, "aiperf": theirs, "ratio": ratios}, indent=2))
    off = {k: r for k, r in ratios.items() if args.max_diff and abs(r - 1) > args.max_diff}
    if off:
        print(f"off by more than {args.max_diff:.0%}: {off}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
