"""The serving path alone: the local stack on the fake engine (``--fake-engine``), at 1 to 256 streams.

    python bench/serving_path.py [--levels 1,16,64,256] [--tokens 64] [--prompt-tokens 32]
                                 [--rounds 2] [--backend grpc|openai] [--json FILE]
    make bench-serving-path

The workers run ``engine.runtime.fake.FakeExecutor`` in the default model's shape (no weights: a
decode step costs well under a millisecond at 16 streams, reading each context back from a real
KV cache), so what is left is the router, the workers' services and the KV handoff: the ceiling of
the serving path when the model is free, the figure to keep ahead of a GPU's decode step (a few
milliseconds for a 16-sequence step of a model this size). Each level runs ``--rounds`` x streams
requests of ``--tokens`` new tokens (``ignore_eos``), ``streams`` in flight, through ``cleave
bench``'s load generator (``services.loadgen``) in this process, after a warm-up of ``streams``
short requests (not measured); the KV cache holds every stream at once. Printed per level:

* output tokens/s (all requests' tokens over the wall time);
* TPOT mean (client-side gap between a stream's tokens after the first) and the engine's decode
  step over the same window, weighted by the tokens each step made (the step the mean stream
  waits for: ``serving_extras.StepTotals``, from the decode worker's ``/metrics``);
  **added per token** = TPOT - step: what the serving path puts on every token;
* CPU time per output token of each process (router, decode, prefill, the load generator):
  user + system seconds from ``psutil`` over the level, divided by the tokens.

Nothing is asserted; the CPU is printed (figures differ between machines).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from bench import machine, serving_extras  # noqa: E402
from bench.serving import target_of, warm_up  # noqa: E402
from services.launcher import LocalStack, StackConfig, workers  # noqa: E402
from services.loadgen.cli import bench  # noqa: E402
from services.loadgen.datasets import DatasetConfig, LengthDist  # noqa: E402
from services.loadgen.report import Slo  # noqa: E402
from services.loadgen.runner import LoadConfig  # noqa: E402


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds so far of each named process and its children (the load
    generator alone: the stack's processes are its children)."""
    out = {}
    for name, top in procs.items():
        total = 0.0
        for p in (top, *(top.children(recursive=True) if name != "loadgen" else ())):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        out[name] = total
    return out


def stack_processes(stack: LocalStack) -> dict[str, psutil.Process]:
    """The stack's router and workers, and this process (the load generator)."""
    procs = {name: psutil.Process(proc.pid) for name, proc in stack.procs
             if name == "router" or name.startswith(("prefill", "decode"))}
    procs["loadgen"] = psutil.Process()
    return procs


def run_level(stack: LocalStack, args, streams: int) -> dict:
    """One load level: ``args.rounds * streams`` requests, ``streams`` in flight."""
    target = target_of(stack, args.backend)
    data = DatasetConfig(num_requests=args.rounds * streams, prompt=LengthDist(args.prompt_tokens),
                         output=LengthDist(args.tokens), token_range=(100, 10_000), seed=streams)
    warm_up(stack, args.backend, 10_000, args.prompt_tokens, requests=streams)
    procs = stack_processes(stack)
    c0, steps0, t0 = cpu_seconds(procs), serving_extras.decode_step_totals(stack), time.perf_counter()
    (r,) = asyncio.run(bench(args.backend, target, data, [LoadConfig(concurrency=streams)], Slo(None, None)))
    wall = time.perf_counter() - t0
    c1, steps1 = cpu_seconds(procs), serving_extras.decode_step_totals(stack)
    if r["requests_failed"]:
        raise RuntimeError(f"{r['requests_failed']} request(s) failed at {streams} streams: {r['errors']}")
    tokens = r["output_tokens"]
    step = steps1.step_since(steps0)
    tpot = r["tpot_ms"]["mean"] / 1e3
    return dict(streams=streams, tok_s=r["output_token_throughput"], tpot_ms=tpot * 1e3, step_ms=step * 1e3,
                added_ms=(tpot - step) * 1e3, ttft_p50_ms=r["ttft_ms"]["p50"],
                cpu_us_per_token={k: (c1[k] - c0[k]) / tokens * 1e6 for k in c0}, wall_s=wall)


def print_table(rows: list[dict]) -> None:
    names = list(rows[0]["cpu_us_per_token"])
    print("| streams | output tok/s | TPOT (ms) | engine step (ms) | added per token (ms) | TTFT p50 (ms) | "
          + " | ".join(f"CPU {n} (us/token)" for n in names) + " |")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names))
    for r in rows:
        print(f"| {r['streams']} | {r['tok_s']:.0f} | {r['tpot_ms']:.2f} | {r['step_ms']:.2f} | {r['added_ms']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} | " + " | ".join(f"{r['cpu_us_per_token'][n]:.0f}" for n in names) + " |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,16,64,256", help="comma-separated concurrent streams per level")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (ignore_eos)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    p.add_argument("--backend", default="grpc", choices=["grpc", "openai"], help="the router API to load")
    p.add_argument("--decode-instances", type=int, default=1, help="decode instances in the stack")
    p.add_argument("--json", default="", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x]
    if not args.levels or min(args.levels) < 1 or min(args.prompt_tokens, args.rounds) < 1 or args.tokens < 2:
        p.error("--levels, --prompt-tokens and --rounds must be positive, --tokens at least 2 (TPOT)")
    return args


def main() -> int:
    args = parse_args()
    print(machine.describe())
    # KV for every stream at once, with room to spare (no preemption or admission wait measured):
    # the fake engine keeps fp32 KV, 45 KiB per token in SmolLM2's shape
    blocks = 2 * max(args.levels) * -(-(args.prompt_tokens + args.tokens) // 16) + 64
    cfg = StackConfig(port=0, http_port=0, log_level="WARNING", decode_instances=args.decode_instances,
                      **workers(transport="tcp", fake_engine=True, max_batch=max(args.levels), num_blocks=blocks))
    stack = LocalStack(cfg)
    rows = []
    try:
        stack.start()
        print(f"cores: {getattr(stack, 'cores', {})}; fake engine, {args.prompt_tokens}-token prompts, "
              f"{args.tokens} new tokens, {args.rounds} requests per stream, {args.backend} API")
        for streams in args.levels:
            rows.append(run_level(stack, args, streams))
            print(f"{streams} streams: {rows[-1]['tok_s']:.0f} tok/s, added {rows[-1]['added_ms']:.2f} ms/token",
                  flush=True)
    finally:
        stack.stop()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
