"""Serving benchmark: the local stack vs Hugging Face ``generate`` on the same model, in one run.

    python bench/serving.py [--model M] [--tokens 64] [--threads 2] [--prompt-tokens 64]

Measures, for 1, 8 and 16 concurrent streams of ``--tokens`` new tokens each (``ignore_eos``):
TTFT (p50/p90), TPOT (mean time between a stream's tokens after the first) and aggregate
decode throughput (completion tokens / wall time). The baseline is transformers' greedy
``generate`` in this process, batch 1, 8 and 16 (TTFT = a 1-token generate of the batch).
The stack is started with ``services.launcher.LocalStack`` (real Redis, gRPC, UCX).
Prints one table with ratios; nothing is asserted.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
import torch  # noqa: E402

from cleave.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from engine.loader import load_reference_model, load_tokenizer, resolve_model  # noqa: E402
from services.launcher import LocalStack, StackConfig  # noqa: E402

PROMPTS = ["Explain how a refrigerator works.", "Write a short story about a lighthouse keeper.",
           "List some uses of graph theory.", "Describe the water cycle to a child.",
           "What makes a good API design?", "Summarize the history of the printing press.",
           "How do vaccines train the immune system?", "Give advice to a new programmer."]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def prompt_ids(tokenizer, i: int, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " " + "Please be detailed. " * 40)
    return ids[:n]


def one_stream(stub, ids, tokens):
    req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=ids), sampling=inference_pb2.SamplingParams(
        max_tokens=tokens, ignore_eos=True))
    t0 = time.perf_counter()
    stamps = []
    for msg in stub.Generate(req, timeout=600):
        now = time.perf_counter()
        stamps.extend([now] * len(msg.token_ids))
    ttft = stamps[0] - t0
    tpot = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return ttft, tpot, len(stamps), t0, stamps[-1]


def bench_stack(address, tokenizer, concurrency, tokens, prompt_tokens):
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        one_stream(stub, prompt_ids(tokenizer, 0, prompt_tokens), 4)  # warm-up
        with cf.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda i: one_stream(stub, prompt_ids(tokenizer, i, prompt_tokens), tokens),
                                    range(concurrency)))
    wall = max(r[4] for r in results) - min(r[3] for r in results)
    return dict(ttft=[r[0] for r in results], tpot=statistics.mean(r[1] for r in results),
                tput=sum(r[2] for r in results) / wall)


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
    return dict(ttft=[ttft] * batch, tpot=(wall - ttft) / max(1, tokens - 1), tput=n / wall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, baseline and each worker")
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--transport", default="ucx")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    rows = {}
    stack = LocalStack(StackConfig(port=0, model=args.model, log_level="WARNING",
                                   worker_args=("--threads", str(args.threads), "--transport", args.transport)))
    try:
        address = stack.start()
        for c in levels:
            rows[("cleave", c)] = bench_stack(address, tokenizer, c, args.tokens, args.prompt_tokens)
    finally:
        stack.stop()
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
            print(f"| {c} | {label} | {pct(r['ttft'], .5) * 1e3:.0f} | {pct(r['ttft'], .9) * 1e3:.0f} | "
                  f"{r['tpot'] * 1e3:.1f} | {r['tput']:.1f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
