"""Log-likelihood through Cleave's OpenAI API, the way evaluation harnesses ask for it, vs transformers.

What lm-evaluation-harness' ``local-completions`` model sends for a log-likelihood request,
with the official OpenAI SDK only: ``completions.create(prompt=[context + continuation ids],
echo=True, logprobs=1, max_tokens=0, temperature=0)``; the continuation's log-likelihood is the
sum of ``token_logprobs`` over its positions, and it is greedy when every continuation token is
its position's top entry. The reference is ``log_softmax`` of ``transformers``' fp32 logits on
the same weights. Prints per passage the two sums, their difference and the greedy flags, and
the wall time of the requests.

    .venv/bin/python bench/loglikelihood.py                     # the default model, its own stack
    .venv/bin/python bench/loglikelihood.py --url http://127.0.0.1:8000/v1   # a running stack
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DATA = pathlib.Path(__file__).with_name("data") / "pride_and_prejudice_ch1.txt"


def passages(tokenizer, n: int, context: int, continuation: int) -> list[tuple[list[int], list[int]]]:
    """``n`` (context ids, continuation ids) pairs cut from the bench text."""
    ids = tokenizer.encode(DATA.read_text(encoding="utf-8"), add_special_tokens=False)
    step = context + continuation
    return [(ids[i * step: i * step + context], ids[i * step + context: (i + 1) * step]) for i in range(n)]


def cleave_scores(url: str, model: str, pairs) -> list[tuple[float, bool]]:
    from openai import OpenAI
    out = []
    with OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) as client:
        for ctx, cont in pairs:
            lp = client.completions.create(model=model, prompt=[ctx + cont], echo=True, logprobs=1, max_tokens=0,
                                           temperature=0).choices[0].logprobs
            span = range(len(ctx), len(ctx) + len(cont))
            greedy = all(max(lp.top_logprobs[i], key=lp.top_logprobs[i].get) == lp.tokens[i] for i in span)
            out.append((sum(lp.token_logprobs[i] for i in span), greedy))
    return out


def reference_scores(model, pairs) -> list[tuple[float, bool]]:
    import torch
    out = []
    with torch.inference_mode():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            rows = lp[len(ctx) - 1: len(ctx) + len(cont) - 1]
            target = torch.tensor(cont)
            out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="", help="a running stack's OpenAI API (.../v1); empty: start one")
    p.add_argument("--model", default="", help="model spec (empty = the default SmolLM2)")
    p.add_argument("--passages", type=int, default=8, help="how many (context, continuation) pairs")
    p.add_argument("--context", type=int, default=96, help="context tokens per passage")
    p.add_argument("--continuation", type=int, default=16, help="continuation tokens per passage")
    args = p.parse_args()

    from engine.loader import load_reference_model, load_tokenizer, resolve_model
    from services.launcher import LocalStack, StackConfig
    from bench.machine import describe
    print(describe())
    source = resolve_model(args.model)
    pairs = passages(load_tokenizer(source), args.passages, args.context, args.continuation)
    stack = None
    if not args.url:
        stack = LocalStack(StackConfig(port=0, http_port=0, model=args.model, log_level="WARNING"))
        stack.start()
    try:
        url = args.url or stack.http_url
        t0 = time.perf_counter()
        got = cleave_scores(url, source.model_id, pairs)
        seconds = time.perf_counter() - t0
    finally:
        if stack is not None:
            stack.stop()
    want = reference_scores(load_reference_model(source), pairs)
    print(f"{source.model_id}: {len(pairs)} passages of {args.context} + {args.continuation} tokens "
          f"(echo, logprobs=1, max_tokens=0 through the OpenAI SDK), {seconds:.1f} s")
    print("| passage | Cleave log-likelihood | transformers | difference | greedy (Cleave / HF) |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for i, ((a, ga), (b, gb)) in enumerate(zip(got, want)):
        worst = max(worst, abs(a - b))
        print(f"| {i} | {a:.5f} | {b:.5f} | {a - b:+.2e} | {ga} / {gb} |")
    print(f"largest |difference| {worst:.2e} nats over {args.continuation} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
