"""The ``cleave bench`` subcommand: flags, a sweep over load levels, table and JSON output.

    cleave bench --backend grpc --target 127.0.0.1:50051 --num-requests 64 --concurrency 1,4,16
    cleave bench --backend openai --target http://127.0.0.1:8000/v1 --rate 2,4 \\
        --prompt-len 256 --output-len 64 --len-dist uniform --len-spread 0.5 --goodput ttft:500,tpot:50

A comma-separated ``--concurrency`` or ``--rate`` is a sweep: one run per value, the same
requests each time, one table row each.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from services.loadgen.backends import BACKENDS, make_backend
from services.loadgen.datasets import DISTRIBUTIONS, DatasetConfig, LengthDist, make_requests
from services.loadgen.report import Slo, summarize, table, to_json
from services.loadgen.runner import LoadConfig, run_load


def add_arguments(p: argparse.ArgumentParser, default_address: str) -> None:
    p.add_argument("--backend", default="grpc", choices=BACKENDS,
                   help="grpc: cleave.v1.Inference; openai: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--target", default="", help="host:port for grpc (default: CLEAVE_ADDRESS or "
                   f"{default_address}); base URL for openai (default http://127.0.0.1:8000/v1)")
    p.add_argument("--model", default="", help="model name sent to the OpenAI API ('' = the served one)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per load level")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="", help="requests in flight, comma list to sweep (e.g. 1,4,16)")
    load.add_argument("--rate", default="", help="Poisson arrivals per second, comma list to sweep (e.g. 1,2,4)")
    p.add_argument("--max-concurrency", type=int, default=None, help="with --rate: cap on requests in flight")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before each level, not measured")
    p.add_argument("--prompt-len", type=int, default=128, help="mean prompt length (tokens)")
    p.add_argument("--output-len", type=int, default=64, help="mean output length (tokens, EOS ignored)")
    p.add_argument("--len-dist", default="fixed", choices=DISTRIBUTIONS, help="distribution of both lengths")
    p.add_argument("--len-spread", type=float, default=0.0,
                   help="uniform: +-spread*mean; normal: std = spread*mean")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="shared-prefix dataset: tokens of prefix shared by the prompts (0 = none)")
    p.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes (used in turn)")
    p.add_argument("--token-range", default="1000:10000",
                   help="prompt token ids are drawn from LO:HI (keep HI <= the vocabulary size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrival times")
    p.add_argument("--goodput", default="", help="SLO for goodput in ms, e.g. ttft:500,tpot:50")
    p.add_argument("--json", default="", help="also write the reports to this file ('-' = stdout only JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _levels(args) -> list[LoadConfig]:
    def values(text: str, kind):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None

    common = dict(warmup=args.warmup, seed=args.seed)
    if args.rate:
        return [LoadConfig(rate=r, max_concurrency=args.max_concurrency, **common) for r in values(args.rate, float)]
    return [LoadConfig(concurrency=c, **common) for c in values(args.concurrency or "1", int)]


def dataset_of(args) -> DatasetConfig:
    lo, sep, hi = args.token_range.partition(":")
    if not sep:
        raise ValueError(f"--token-range must be LO:HI, got {args.token_range!r}")
    return DatasetConfig(num_requests=args.num_requests,
                         prompt=LengthDist(args.prompt_len, args.len_dist, args.len_spread),
                         output=LengthDist(args.output_len, args.len_dist, args.len_spread),
                         token_range=(int(lo), int(hi)), prefix_len=args.prefix_len,
                         num_prefixes=args.num_prefixes, seed=args.seed)


async def bench(backend_kind: str, target: str, dataset: DatasetConfig, levels: list[LoadConfig],
                slo: Slo | None = None, model: str = "", progress: bool = False) -> list[dict]:
    """Run every load level against ``target``; returns one report dict per level
    (``services.loadgen.report.summarize``)."""
    requests = make_requests(dataset)
    backend = make_backend(backend_kind, target, model)
    reports = []
    try:
        for level in levels:
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=len(requests), desc=level.label, unit="req", file=sys.stderr)
            try:
                timings, seconds = await run_load(backend, requests, level, bar)
            finally:
                if bar is not None:
                    bar.close()
            reports.append(summarize(timings, seconds, slo, level.label))
    finally:
        await backend.close()
    return reports


def run(args, default_address: str) -> int:
    target = args.target or (default_address if args.backend == "grpc" else "http://127.0.0.1:8000/v1")
    slo = Slo.parse(args.goodput) if args.goodput else None
    reports = asyncio.run(bench(args.backend, target, dataset_of(args), _levels(args), slo, args.model,
                                progress=not args.no_progress and args.json != "-"))
    if args.json == "-":
        print(to_json(reports))
    else:
        print(table(reports))
        if args.json:
            with open(args.json, "w") as f:
                f.write(to_json(reports))
    failed = sum(r["requests_failed"] for r in reports)
    if failed:
        errors = sorted({e for r in reports for e in r["errors"]})
        print(f"cleave bench: {failed} request(s) failed; first errors: {errors[:3]}", file=sys.stderr)
    return 1 if failed and not any(r["requests_completed"] for r in reports) else 0
