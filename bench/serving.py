"""Serving benchmark: the local stack vs Hugging Face ``generate`` on the same model, in one run.

    python bench/serving.py [--model M] [--tokens 64] [--threads 2] [--prompt-tokens 64]

Measures, for 1, 8 and 16 concurrent streams of ``--tokens`` new tokens each (``ignore_eos``):
TTFT (p50/p90), TPOT (mean time between a stream's tokens after the first) and aggregate
decode throughput (completion tokens / wall time). The stack is started with
``services.launcher.LocalStack`` (real Redis, gRPC, UCX) and driven by ``cleave bench``'s load
generator (``services.loadgen``: one request per stream, all sent at once, after a warm-up),
over gRPC or the OpenAI HTTP API (``--backend``); ``--goodput ttft:MS,tpot:MS`` adds goodput.
The baseline is transformers' greedy ``generate`` in this process, batch 1, 8 and 16 (TTFT =
a 1-token generate of the batch). Prints the load generator's table and one comparison table
with ratios; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.loader import load_reference_model, load_tokenizer, resolve_model  # noqa: E402
from services.launcher import LocalStack, StackConfig  # noqa: E402
from services.loadgen.cli import bench  # noqa: E402
from services.loadgen.datasets import DatasetConfig, LengthDist  # noqa: E402
from services.loadgen.report import Slo, table  # noqa: E402
from services.loadgen.runner import LoadConfig  # noqa: E402

PROMPTS = ["Explain how a refrigerator works.", "Write a short story about a lighthouse keeper.",
           "List some uses of graph theory.", "Describe the water cycle to a child.",
           "What makes a good API design?", "Summarize the history of the printing press.",
           "How do vaccines train the immune system?", "Give advice to a new programmer."]


def prompt_ids(tokenizer, i: int, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " " + "Please be detailed. " * 40)
    return ids[:n]


def bench_stack(stack, backend, vocab, concurrency, tokens, prompt_tokens, slo):
    """One load level through the load generator; returns its report (``services.loadgen.report``)."""
    target = stack.http_url if backend.startswith("openai") else f"{stack.cfg.host}:{stack.router_port}"
    data = DatasetConfig(num_requests=concurrency, prompt=LengthDist(prompt_tokens), output=LengthDist(tokens),
                         token_range=(100, min(10_000, vocab)), seed=concurrency)
    (report,) = asyncio.run(bench(backend, target, data, [LoadConfig(concurrency=concurrency, warmup=1)], slo))
    if report["requests_failed"]:
        raise RuntimeError(f"{report['requests_failed']} request(s) failed: {report['errors']}")
    return report


def bench_hf(model, tokenizer, batch, tokens, prompt_tokens):
    ids = torch.tensor([prompt_ids(tokenizer, i, prompt_tokens) for i in range(batch)])
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, attention_mask=mask, pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        wall = time.perf_counter() - t0
    n = (out.shape[1] - ids.shape[1]) * batch
    return dict(ttft_p50=ttft, ttft_p90=ttft, tpot=(wall - ttft) / max(1, tokens - 1), tput=n / wall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, baseline and each worker")
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--transport", default="ucx")
    ap.add_argument("--backend", default="grpc", choices=["grpc", "openai"], help="the API the load goes through")
    ap.add_argument("--goodput", default="", help="SLO for goodput, e.g. ttft:2000,tpot:200 (ms)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    slo = Slo.parse(args.goodput) if args.goodput else None
    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    rows, reports = {}, []
    stack = LocalStack(StackConfig(port=0, http_port=0, model=args.model, log_level="WARNING",
                                   worker_args=("--threads", str(args.threads), "--transport", args.transport)))
    try:
        stack.start()
        for c in levels:
            r = bench_stack(stack, args.backend, len(tokenizer), c, args.tokens, args.prompt_tokens, slo)
            reports.append(r)
            rows[("cleave", c)] = dict(ttft_p50=r["ttft_ms"]["p50"] / 1e3, ttft_p90=r["ttft_ms"]["p90"] / 1e3,
                                       tpot=r["tpot_ms"]["mean"] / 1e3, tput=r["output_token_throughput"])
    finally:
        stack.stop()
    print(f"\ncleave bench ({args.backend}), one request per stream:\n{table(reports)}")
    model = load_reference_model(source)
    for c in levels:
        rows[("hf", c)] = bench_hf(model, tokenizer, c, args.tokens, args.prompt_tokens)
    print(f"\nmodel {source.model_id}, {args.prompt_tokens}-token prompts, {args.tokens} new tokens per stream, "
          f"{args.threads} torch threads per process, {os.cpu_count()} cores, KV transport {args.transport}\n")
    print("| streams | system | TTFT p50 (ms) | TTFT p90 (ms) | TPOT (ms) | throughput (tok/s) | throughput vs HF |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        for name in ("cleave", "hf"):
            r = rows[(name, c)]
            ratio = r["tput"] / rows[("hf", c)]["tput"]
            label = "Cleave (disaggregated)" if name == "cleave" else "HF transformers generate"
            print(f"| {c} | {label} | {r['ttft_p50'] * 1e3:.0f} | {r['ttft_p90'] * 1e3:.0f} | "
                  f"{r['tpot'] * 1e3:.1f} | {r['tput']:.1f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
