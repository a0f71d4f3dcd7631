"""Quantized weights (``--weights-dtype``) against fp32 in one run: decode step time, agreement, perplexity.

Run (under the shared lock on a busy machine): ``python bench/quant.py`` (``--model``, default
SmolLM2-135M-Instruct Q4_1; ``--dtypes fp32,bf16,int8,int4``; ``--batches 1,16``; ``--threads``;
``--text``). Prints one table, one row per weights dtype, ratios against the fp32 row:

* **weights MiB**: bytes of the model's parameters and weight scales (rope cache excluded).
* **decode ms @ B**: one decode step of B sequences at position ``--context`` (the KV of a
  ``--context``-token prompt in the cache), median of ``--repeats`` calls taken in rounds that
  alternate the dtypes (so drift from other processes hits all rows alike); ``x fp32`` =
  fp32's time / this row's (above 1 is faster).
* **top-1 agree**: share of the text's positions where this dtype's most likely next token
  equals fp32's, teacher-forced (every position sees the true text before it), over the whole
  text in windows of ``--window`` tokens (each window a fresh prefill).
* **ppl**: perplexity of the same positions' true next tokens, ``exp(mean NLL)``.

The text is ``bench/data/pride_and_prejudice_ch1.txt`` (public domain; see its README).
:func:`score_text` is also what ``tests/engine/test_quant.py`` bounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.machine import describe  # noqa: E402
from common.model import WEIGHTS_DTYPES, CacheConfig  # noqa: E402
from engine.batch import ForwardBatch  # noqa: E402
from engine.loader import load_model, load_tokenizer, resolve_model  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pride_and_prejudice_ch1.txt")
BLOCK = 16


def text_tokens(tokenizer, path: str = TEXT) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return tokenizer(f.read(), add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def score_text(model, config, tokens: list[int], window: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced pass over ``tokens`` in windows of ``window`` (each a fresh prefill):
    ``(top1 [P] int64, nll [P] fp32)`` for the ``P`` positions that have a next token, where
    ``top1[p]`` is the argmax of the logits after ``tokens[: p + 1]`` (within its window) and
    ``nll[p] = -log softmax(logits)[tokens[p + 1]]``."""
    blocks = -(-window // BLOCK)
    kv = model.allocate_kv_cache(CacheConfig(block_size=BLOCK, num_blocks=blocks))
    top1, nll = [], []
    for lo in range(0, len(tokens) - 1, window):
        chunk = tokens[lo: lo + window + 1]
        inputs, targets = chunk[:-1], torch.tensor(chunk[1:])
        batch = ForwardBatch.prefill([inputs], [list(range(blocks))], BLOCK)
        batch = dataclasses.replace(batch, logits_indices=torch.arange(len(inputs)))
        logits = model(batch, kv)
        top1.append(logits.argmax(dim=-1))
        nll.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    return torch.cat(top1), torch.cat(nll)


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers, the rope cache excepted (weights and their scales)."""
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if "rope" not in n]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


class DecodeTimer:
    """One decode step of ``batch`` sequences at position ``context`` on ``model``, repeatable."""

    def __init__(self, model, config, batch: int, context: int):
        per_seq = -(-(context + 1) // BLOCK)
        self.model = model
        self.kv = model.allocate_kv_cache(CacheConfig(block_size=BLOCK, num_blocks=batch * per_seq))
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(100, config.vocab_size, (batch, context), generator=gen).tolist()
        with torch.inference_mode():
            model(ForwardBatch.prefill(prompts, tables, BLOCK), self.kv)
        self.step = ForwardBatch.decode([p[-1] for p in prompts], [context] * batch, tables, BLOCK)

    @torch.inference_mode()
    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.model(self.step, self.kv)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model spec (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    ap.add_argument("--dtypes", default=",".join(WEIGHTS_DTYPES), help="comma list; fp32 is always run")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=128, help="tokens in the cache of each decoded sequence")
    ap.add_argument("--repeats", type=int, default=30, help="timed decode steps per dtype and batch")
    ap.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    dtypes = ["fp32"] + [d for d in dict.fromkeys(args.dtypes.split(",")) if d and d != "fp32"]
    bad = [d for d in dtypes if d not in WEIGHTS_DTYPES]
    if bad:
        ap.error(f"--dtypes takes {', '.join(WEIGHTS_DTYPES)}; got {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    source = resolve_model(args.model)
    tokens = text_tokens(load_tokenizer(source), args.text)

    rows: dict[str, dict] = {}
    timers: dict[tuple[str, int], DecodeTimer] = {}
    for d in dtypes:
        t0 = time.perf_counter()
        config, model = load_model(source, weights_dtype=d)
        top1, nll = score_text(model, config, tokens, args.window)
        rows[d] = dict(mib=weight_bytes(model) / 2**20, load_s=time.perf_counter() - t0, top1=top1, nll=nll,
                       times={b: [] for b in batches})
        for b in batches:
            timers[(d, b)] = DecodeTimer(model, config, b, args.context)
    for _ in range(args.repeats):                       # rounds alternate the dtypes
        for (d, b), timer in timers.items():
            rows[d]["times"][b].append(timer())

    ref = rows["fp32"]
    base = {b: statistics.median(ref["times"][b]) for b in batches}
    print(f"\n{describe()}")
    print(f"{source.model_id} ({source.kind}), {torch.get_num_threads()} torch threads, decode at context "
          f"{args.context}, {ref['top1'].numel()} scored positions of {os.path.basename(args.text)}\n")
    head = ["weights", "weights MiB"] + [f"decode ms @{b} (x fp32)" for b in batches] + ["top-1 agree", "ppl"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d, r in rows.items():
        cells = [d, f"{r['mib']:.0f}"]
        for b in batches:
            ms = statistics.median(r["times"][b])
            cells.append(f"{ms * 1e3:.2f} ({base[b] / ms:.2f}x)")
        agree = (r["top1"] == ref["top1"]).float().mean().item()
        cells += [f"{agree:.1%}", f"{r['nll'].mean().exp().item():.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\ncommand: python bench/quant.py {' '.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
