"""The ``cleave bench`` subcommand: flags, a sweep over load levels, table and JSON output.

    cleave bench --backend grpc --target 127.0.0.1:50051 --num-requests 64 --concurrency 1,4,16
    cleave bench --backend openai --target http://127.0.0.1:8000/v1 --rate 2,4 \\
        --prompt-len 256 --output-len 64 --len-dist uniform --len-spread 0.5 --goodput ttft:500,tpot:50

    cleave bench --backend grpc --conversations 8 --turns 4 --turn-tokens 64 --output-len 32 \\
        --think-time 1.0 --concurrency 4

A comma-separated ``--concurrency`` or ``--rate`` is a sweep: one run per value, the same
requests each time, one table row each. ``--conversations N`` selects the multi-turn
workload (``services.loadgen.conversations``): there ``--concurrency`` counts conversations in
flight (default: all of them), ``--rate`` conversation starts per second.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from services.loadgen.backends import BACKENDS, make_backend
from services.loadgen.conversations import (THINK_DISTRIBUTIONS, ConversationConfig, make_conversations,
                                            run_conversations, warmup_requests)
from services.loadgen.datasets import DISTRIBUTIONS, DatasetConfig, LengthDist, make_requests
from services.loadgen.report import Slo, summarize, table, to_json
from services.loadgen.runner import LoadConfig, run_load


def add_arguments(p: argparse.ArgumentParser, default_address: str) -> None:
    p.add_argument("--backend", default="grpc", choices=BACKENDS,
                   help="grpc: cleave.v1.Inference; openai: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--target", default="", help="host:port for grpc (default: CLEAVE_ADDRESS or "
                   f"{default_address}); base URL for openai (default http://127.0.0.1:8000/v1)")
    p.add_argument("--model", default="", help="model name sent to the OpenAI API ('' = the served one)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per load level (default 64; multi-turn sends --conversations x --turns)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="", help="requests in flight, comma list to sweep (e.g. 1,4,16); "
                      "multi-turn: conversations in flight (default: all)")
    load.add_argument("--rate", default="", help="Poisson arrivals per second, comma list to sweep (e.g. 1,2,4); "
                      "multi-turn: conversation starts per second")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="with --rate: cap on requests (multi-turn: conversations) in flight")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before each level, not measured "
                   "(multi-turn: one-turn requests of ids no conversation uses)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="mean prompt length (tokens; default 128; multi-turn uses --turn-tokens instead)")
    p.add_argument("--output-len", type=int, default=64,
                   help="mean output length (tokens, EOS ignored; multi-turn: of each reply)")
    p.add_argument("--len-dist", default="fixed", choices=DISTRIBUTIONS,
                   help="distribution of both lengths (multi-turn: of --turn-tokens and --output-len)")
    p.add_argument("--len-spread", type=float, default=0.0,
                   help="uniform: +-spread*mean; normal: std = spread*mean")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="shared-prefix dataset: tokens of prefix shared by the prompts (0 = none)")
    p.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes (used in turn)")
    turn = p.add_argument_group("multi-turn workload (selected by --conversations)")
    turn.add_argument("--conversations", type=int, default=0,
                      help="multi-turn workload: N conversations, each turn's prompt the whole conversation so far "
                      "(previous prompt + the reply the server returned + new user tokens); 0 = single-turn requests")
    turn.add_argument("--turns", type=int, default=None, help="turns per conversation (default 4)")
    turn.add_argument("--turn-tokens", type=int, default=None,
                      help="mean new user tokens per turn, drawn --len-dist / --len-spread (default 64)")
    turn.add_argument("--think-time", type=float, default=None,
                      help="mean seconds between a reply and the conversation's next turn (default 0)")
    turn.add_argument("--think-dist", default=None, choices=THINK_DISTRIBUTIONS,
                      help="think-time distribution, drawn from --seed: exponential (default) or fixed")
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
    default = str(args.conversations) if args.conversations > 0 else "1"
    return [LoadConfig(concurrency=c, **common) for c in values(args.concurrency or default, int)]


MULTI_TURN_FLAGS = ("turns", "turn_tokens", "think_time", "think_dist")


def dataset_of(args) -> DatasetConfig | ConversationConfig:
    """The workload the flags describe; ValueError for flags that do not fit together."""
    lo, sep, hi = args.token_range.partition(":")
    if not sep:
        raise ValueError(f"--token-range must be LO:HI, got {args.token_range!r}")
    output = LengthDist(args.output_len, args.len_dist, args.len_spread)
    if args.conversations < 0:
        raise ValueError(f"--conversations must be >= 0 (0 = single-turn requests), got {args.conversations}")
    if not args.conversations:
        given = [f"--{f.replace('_', '-')}" for f in MULTI_TURN_FLAGS if getattr(args, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} describe the multi-turn workload: add --conversations N")
        return DatasetConfig(num_requests=64 if args.num_requests is None else args.num_requests,
                             prompt=LengthDist(128 if args.prompt_len is None else args.prompt_len, args.len_dist,
                                               args.len_spread),
                             output=output, token_range=(int(lo), int(hi)), prefix_len=args.prefix_len,
                             num_prefixes=args.num_prefixes, seed=args.seed)
    for flag, bad in (("--num-requests", args.num_requests is not None), ("--prompt-len", args.prompt_len is not None),
                      ("--prefix-len", args.prefix_len != 0)):
        if bad:
            raise ValueError(f"{flag} is for single-turn requests; with --conversations the requests are "
                             f"--conversations x --turns and each turn adds --turn-tokens")
    turns = 4 if args.turns is None else args.turns
    turn_tokens = 64 if args.turn_tokens is None else args.turn_tokens
    if turns < 1:
        raise ValueError(f"--turns must be >= 1, got {turns}")
    if turn_tokens < 1:
        raise ValueError(f"--turn-tokens must be >= 1, got {turn_tokens}")
    return ConversationConfig(conversations=args.conversations, turns=turns,
                              user=LengthDist(turn_tokens, args.len_dist, args.len_spread), output=output,
                              think_s=0.0 if args.think_time is None else args.think_time,
                              think_dist=args.think_dist or "exponential", token_range=(int(lo), int(hi)),
                              seed=args.seed)


async def bench(backend_kind: str, target: str, dataset: DatasetConfig | ConversationConfig,
                levels: list[LoadConfig], slo: Slo | None = None, model: str = "",
                progress: bool = False) -> list[dict]:
    """Run every load level against ``target``; returns one report dict per level
    (``services.loadgen.report.summarize``; with ``multi_turn`` for a ConversationConfig)."""
    multi = isinstance(dataset, ConversationConfig)
    requests = None if multi else make_requests(dataset)
    backend = make_backend(backend_kind, target, model)
    reports = []
    try:
        for i, level in enumerate(levels):
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=dataset.requests if multi else len(requests), desc=level.label, unit="req",
                           file=sys.stderr)
            try:
                if multi:
                    run = await run_conversations(backend, make_conversations(dataset, i), level, bar,
                                                  warmup=warmup_requests(dataset, level.warmup, i))
                    reports.append(summarize(run.timings, run.seconds, slo, level.label, run.turns))
                else:
                    timings, seconds = await run_load(backend, requests, level, bar)
                    reports.append(summarize(timings, seconds, slo, level.label))
            finally:
                if bar is not None:
                    bar.close()
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
