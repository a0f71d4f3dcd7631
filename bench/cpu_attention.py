"""CPU paged decode attention: the per-sequence loop vs the batched call, side by side.

Run: ``python bench/cpu_attention.py`` (``--threads 2``, ``--warmup``, ``--repeats``,
``--dtypes fp32,bf16``). SmolLM2-135M's attention shapes (9 query / 3 kv heads, head_dim 64,
block 16) unless ``--heads/--kv-heads/--dim/--block`` say otherwise.

Each row times one call over one layer's cache, the best of ``--repeats`` after ``--warmup``
with the two versions interleaved (wall clock, ``torch.set_num_threads(--threads)``; the best
run is the least disturbed one on a shared machine): ``loop ms`` is
``kernels.attention.paged_decode_attention_reference`` (one gather + SDPA per sequence),
``batched ms`` is ``kernels.attention.paged_decode_attention`` (what ``kernels`` runs on CPU:
the batch in length groups, one gather + masked SDPA each; ``calls`` = groups), ``x`` the
speed-up. Contexts are ``B x n`` equal lengths (64..2048), ``ragged`` (seeded uniform 1..2048)
and ``1 long + short`` (one 2048-token context among 64-token ones). Block tables are shuffled;
``max err`` is the largest difference between the two outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.machine import describe  # noqa: E402
from kernels import attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cases() -> list[tuple[str, list[int]]]:
    """(label, context lengths) of every row."""
    g = torch.Generator().manual_seed(0)
    rows = [(f"B={b} n={n}", [n] * b) for b in (1, 8, 16, 64) for n in (64, 256, 1024, 2048)]
    rows += [(f"B={b} ragged", torch.randint(1, 2049, (b,), generator=g).tolist()) for b in (16, 64)]
    rows += [(f"B={b} 1 long+short", [2048] + [64] * (b - 1)) for b in (16, 64)]
    return rows


def paged(lengths: list[int], args, dtype: torch.dtype):
    """(q, kv_layer, block_tables, context_lens) with each sequence's blocks shuffled."""
    need = [-(-n // args.block) for n in lengths]
    kv = torch.randn(2, sum(need), args.block, args.kv_heads, args.dim, dtype=dtype)
    perm, at = torch.randperm(sum(need)), 0
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    for b, nb in enumerate(need):
        tables[b, :nb] = perm[at: at + nb]
        at += nb
    q = torch.randn(len(lengths), args.heads, args.dim, dtype=dtype)
    return q, kv, tables, torch.tensor(lengths, dtype=torch.int32)


def best_ms(fns: dict, warmup: int, repeats: int) -> dict:
    """Fastest wall-clock milliseconds of each zero-argument function, run in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    print(f"CPU paged decode attention, {args.threads} threads, {args.heads} q / {args.kv_heads} kv "
          f"heads x {args.dim}, block {args.block}; best of {args.repeats}")
    head = f"{'dtype':<6}{'case':<20}{'loop ms':>10}{'batched ms':>12}{'x':>7}{'calls':>7}{'max err':>10}"
    print(head)
    print("-" * len(head))
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        token_bytes = 2 * args.kv_heads * args.dim * dtype.itemsize
        for label, lengths in cases():
            call = paged(lengths, args, dtype) + (args.dim ** -0.5,)
            err = (attention.paged_decode_attention(*call).float()
                   - attention.paged_decode_attention_reference(*call).float()).abs().max()
            ms = best_ms({"loop": lambda: attention.paged_decode_attention_reference(*call),
                          "batched": lambda: attention.paged_decode_attention(*call)},
                         args.warmup, args.repeats)
            loop, batched = ms["loop"], ms["batched"]
            calls = len(attention.decode_groups(lengths, token_bytes))
            print(f"{name:<6}{label:<20}{loop:>10.3f}{batched:>12.3f}{loop / batched:>7.2f}"
                  f"{calls:>7}{float(err):>10.1e}", flush=True)


if __name__ == "__main__":
    main()
