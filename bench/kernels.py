"""Triton kernels vs their PyTorch equivalents on one GPU: time, throughput, share of peak.

Run: ``python bench/kernels.py`` on a machine with CUDA (``--warmup``, ``--repeats``,
``--only decode,prefill,kv,pointwise,moe``). Without CUDA it says so and exits 0;
``--interpret`` instead runs tiny shapes on CPU under ``TRITON_INTERPRET=1``, only to exercise
the code (its timings mean nothing).

Each row times one call, median of ``--repeats`` after ``--warmup`` (CUDA events):

* **decode**: ``paged_decode_attention``, 32 query / 8 kv heads, head_dim 128, block size 16,
  bf16, batch 1-64 x context 1k-32k (shuffled block tables). ``torch`` is the reference
  (gathers each sequence's blocks, then SDPA); ``sdpa`` is
  ``scaled_dot_product_attention(enable_gqa=True)`` on the same K/V already dense, the floor for
  an unpaged kernel. Bytes = K+V read once + q + out.
* **prefill**: ``prefill_attention`` (causal, varlen) vs ``sdpa`` (``is_causal``) on one sequence
  of 1k-16k tokens and on 8 sequences of 1k; reported in TFLOP/s (causal: half the scores).
* **kv_pack / kv_unpack**: 32 layers x 8 kv heads x 128, 1k-32k tokens of one sequence, vs the
  ``index_select``/``index_copy_`` reference. Bytes = piece read + written.
* **pointwise** (``rms_norm`` with residual, ``rotary_embedding``, ``silu_and_mul``) and **moe**
  (``moe_permute`` / ``moe_unpermute``, 8 experts, top-2): 4096 tokens, hidden 4096.

``GB/s`` is bytes / time; ``%peak`` divides it by the device's HBM bandwidth from the table
``PEAK_TBPS`` (by device name) and ``%copy`` by the bandwidth of a 1 GiB device-to-device copy
measured here (read + write), the practical ceiling.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Substring of torch.cuda.get_device_name -> HBM TB/s (vendor datasheets); first match wins.
PEAK_TBPS = [("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35),
             ("H800", 3.35), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555),
             ("L40S", 0.864), ("L40", 0.864), ("L4", 0.3), ("A10", 0.6), ("4090", 1.008)]

FULL = dict(heads=32, kv_heads=8, dim=128, page=16, layers=32, tokens=4096, hidden=4096,
            inter=14336, experts=8, topk=2,
            decode=[(b, c) for b in (1, 16, 64) for c in (1024, 4096, 16384, 32768)],
            prefill=[[1024], [4096], [16384], [1024] * 8], kv=[1024, 8192, 32768])
TINY = dict(heads=6, kv_heads=2, dim=16, page=4, layers=2, tokens=8, hidden=32, inter=24,
            experts=4, topk=2, decode=[(1, 5), (3, 40)], prefill=[[7], [3, 3]], kv=[9])


class Timer:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, wall clock on CPU."""

    def __init__(self, torch, cuda: bool, warmup: int, repeats: int):
        self.torch, self.cuda, self.warmup, self.repeats = torch, cuda, warmup, repeats

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def row(kernel, shape, ms, torch_ms=None, sdpa_ms=None, nbytes=None, flops=None):
    return dict(kernel=kernel, shape=shape, ms=ms, torch_ms=torch_ms, sdpa_ms=sdpa_ms,
                nbytes=nbytes, flops=flops)


def bench_decode(torch, K, cfg, dev, dtype, timer):
    from kernels import attention as ref
    F = torch.nn.functional
    h, kvh, d, page = cfg["heads"], cfg["kv_heads"], cfg["dim"], cfg["page"]
    rows = []
    for batch, ctx in cfg["decode"]:
        per_seq = -(-ctx // page)
        blocks = batch * per_seq
        cache_bytes = 2 * blocks * page * kvh * d * torch.finfo(dtype).bits // 8
        if dev.type == "cuda" and 3 * cache_bytes > torch.cuda.mem_get_info()[0]:
            continue
        kv = torch.randn(2, blocks, page, kvh, d, device=dev, dtype=dtype)
        tables = torch.randperm(blocks, device=dev).view(batch, per_seq).int()
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        q = torch.randn(batch, h, d, device=dev, dtype=dtype)
        dense = kv[:, tables.long()].flatten(2, 3)[:, :, :ctx].permute(0, 1, 3, 2, 4)  # [2,B,KVH,ctx,D]
        kd, vd = dense[0].contiguous(), dense[1].contiguous()
        args = (q, kv, tables, lens, d ** -0.5)
        ms = timer(lambda: K.paged_decode_attention(*args))
        slow = batch * ctx > 64 * 4096 and dev.type == "cuda"      # the Python loop: skip huge
        torch_ms = None if slow else timer(lambda: ref.paged_decode_attention(*args))
        sdpa_ms = timer(lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd, scale=d ** -0.5,
                                                               enable_gqa=True))
        nbytes = cache_bytes * ctx // (per_seq * page) + 2 * q.numel() * q.element_size()
        rows.append(row("decode", f"B={batch} ctx={ctx}", ms, torch_ms, sdpa_ms, nbytes=nbytes))
    return rows


def bench_prefill(torch, K, cfg, dev, dtype, timer):
    from kernels import attention as ref
    F = torch.nn.functional
    h, kvh, d = cfg["heads"], cfg["kv_heads"], cfg["dim"]
    rows = []
    for lengths in cfg["prefill"]:
        t = sum(lengths)
        q, k, v = (torch.randn(t, n, d, device=dev, dtype=dtype) for n in (h, kvh, kvh))
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=dev, dtype=torch.int32)
        ms = timer(lambda: K.prefill_attention(q, k, v, cu, d ** -0.5))
        torch_ms = timer(lambda: ref.prefill_attention(q, k, v, cu, d ** -0.5))   # SDPA per sequence
        sdpa_ms = None
        if len(set(lengths)) == 1:      # equal lengths: one batched SDPA call, the dense floor
            qb, kb, vb = (x.view(len(lengths), lengths[0], -1, d).transpose(1, 2) for x in (q, k, v))
            sdpa_ms = timer(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                                                   scale=d ** -0.5, enable_gqa=True))
        flops = sum(4 * h * d * n * (n + 1) // 2 for n in lengths)
        shape = f"{len(lengths)}x{lengths[0]}" if len(lengths) > 1 else f"L={lengths[0]}"
        rows.append(row("prefill", shape, ms, torch_ms, sdpa_ms, flops=flops))
    return rows


def bench_kv(torch, K, cfg, dev, dtype, timer):
    from kernels import kv_copy as ref
    layers, kvh, d, page = cfg["layers"], cfg["kv_heads"], cfg["dim"], cfg["page"]
    rows = []
    for tokens in cfg["kv"]:
        blocks = 2 * -(-tokens // page)
        cache = torch.randn(layers, 2, blocks, page, kvh, d, device=dev, dtype=dtype)
        table = torch.randperm(blocks, device=dev)[: blocks // 2]
        args = (table, 0, tokens, 0, layers, 0, kvh)
        piece = K.kv_pack(cache, *args)
        nbytes = 2 * piece.numel() * piece.element_size()
        rows.append(row("kv_pack", f"T={tokens}", timer(lambda: K.kv_pack(cache, *args, out=piece)),
                        timer(lambda: ref.kv_pack(cache, *args, out=piece)), nbytes=nbytes))
        unpack = (piece, cache, table, 0, 0, 0)
        rows.append(row("kv_unpack", f"T={tokens}", timer(lambda: K.kv_unpack(*unpack)),
                        timer(lambda: ref.kv_unpack(*unpack)), nbytes=nbytes))
    return rows


def bench_pointwise(torch, K, cfg, dev, dtype, timer):
    from kernels import ops as ref
    t, hid, h, kvh, d, inter = (cfg[k] for k in ("tokens", "hidden", "heads", "kv_heads", "dim", "inter"))
    x, res, w = torch.randn(t, hid, device=dev, dtype=dtype), torch.randn(t, hid, device=dev, dtype=dtype), \
        torch.randn(hid, device=dev, dtype=dtype)
    q, k = torch.randn(t, h, d, device=dev, dtype=dtype), torch.randn(t, kvh, d, device=dev, dtype=dtype)
    cache = ref.build_rope_cache(d, 8192, 10000.0, device=dev)
    pos = torch.randint(0, 8192, (t,), device=dev)
    gu = torch.randn(t, 2 * inter, device=dev, dtype=dtype)
    e = x.element_size()
    return [
        row("rms_norm+res", f"T={t} H={hid}", timer(lambda: K.rms_norm(x, w, 1e-6, res)),
            timer(lambda: ref.rms_norm(x, w, 1e-6, res)), nbytes=4 * x.numel() * e),
        row("rotary", f"T={t} {h}/{kvh}x{d}", timer(lambda: K.rotary_embedding(q, k, pos, cache)),
            timer(lambda: ref.rotary_embedding(q, k, pos, cache)), nbytes=2 * (q.numel() + k.numel()) * e),
        row("silu_and_mul", f"T={t} I={inter}", timer(lambda: K.silu_and_mul(gu)),
            timer(lambda: ref.silu_and_mul(gu)), nbytes=gu.numel() * e * 3 // 2),
    ]


def bench_moe(torch, K, cfg, dev, dtype, timer):
    import importlib
    ref = importlib.import_module("kernels.moe_permute")
    t, hid, ex, topk = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["topk"]
    x = torch.randn(t, hid, device=dev, dtype=dtype)
    ids = torch.rand(t, ex, device=dev).topk(topk, dim=1).indices
    weights = torch.rand(t, topk, device=dev)
    _, order, _ = ref.moe_permute(x, ids, ex)
    y = torch.randn(t * topk, hid, device=dev, dtype=dtype)
    nbytes = (1 + topk) * x.numel() * x.element_size()
    return [row("moe_permute", f"T={t} H={hid} E={ex} k={topk}", timer(lambda: K.moe_permute(x, ids, ex)),
                timer(lambda: ref.moe_permute(x, ids, ex)), nbytes=nbytes),
            row("moe_unpermute", f"T={t} H={hid} E={ex} k={topk}",
                timer(lambda: K.moe_unpermute(y, order, weights, t)),
                timer(lambda: ref.moe_unpermute(y, order, weights, t)), nbytes=nbytes)]


def copy_bandwidth(torch, timer) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (counted as read + write)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (timer(lambda: b.copy_(a)) / 1e3)


def print_table(rows, peak, measured):
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    head = (f"{'kernel':<14}{'shape':<20}{'triton ms':>10}{'torch ms':>10}{'sdpa ms':>9}"
            f"{'x torch':>8}{'GB/s':>8}{'%peak':>7}{'%copy':>7}{'TFLOP/s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        base = r["torch_ms"] or r["sdpa_ms"]
        gbs = r["nbytes"] / r["ms"] / 1e6 if r["nbytes"] else None
        print(f"{r['kernel']:<14}{r['shape']:<20}{r['ms']:>10.3f}{fmt(r['torch_ms'], '.3f'):>10}"
              f"{fmt(r['sdpa_ms'], '.3f'):>9}{fmt(base and base / r['ms'], '.2f'):>8}"
              f"{fmt(gbs, '.0f'):>8}{fmt(gbs and peak and 100 * gbs / (peak * 1e3), '.0f'):>7}"
              f"{fmt(gbs and measured and 100 * gbs * 1e9 / measured, '.0f'):>7}"
              f"{fmt(r['flops'] and r['flops'] / r['ms'] / 1e9, '.1f'):>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: run tiny shapes on CPU under TRITON_INTERPRET=1 (timings meaningless)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default="decode,prefill,kv,pointwise,moe")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"     # before any kernels.triton_* import
    import torch
    cuda = torch.cuda.is_available() and not args.interpret
    if not cuda and not args.interpret:
        print("bench/kernels.py: no CUDA device here; the Triton kernels need a GPU to be timed. "
              "Use --interpret to run tiny shapes on CPU just to exercise the code.")
        return
    from kernels import triton_attention, triton_kv, triton_moe, triton_ops

    class K:      # the Triton twins, called directly (no dispatch)
        rms_norm, rotary_embedding, silu_and_mul = triton_ops.rms_norm, triton_ops.rotary_embedding, \
            triton_ops.silu_and_mul
        prefill_attention, paged_decode_attention = triton_attention.prefill_attention, \
            triton_attention.paged_decode_attention
        kv_pack, kv_unpack = triton_kv.kv_pack, triton_kv.kv_unpack
        moe_permute, moe_unpermute = triton_moe.moe_permute, triton_moe.moe_unpermute

    dev = torch.device("cuda" if cuda else "cpu")
    cfg = FULL if cuda else TINY
    timer = Timer(torch, cuda, args.warmup if cuda else 0, args.repeats if cuda else 1)
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((tb for key, tb in PEAK_TBPS if key in name), None)
        measured = copy_bandwidth(torch, timer)
        print(f"device: {name}; HBM peak {fmt_peak(peak)}; measured 1 GiB copy "
              f"{measured / 1e12:.2f} TB/s; bf16")
    else:
        peak = measured = None
        print("device: CPU under TRITON_INTERPRET=1 (tiny shapes, timings meaningless); bf16")
    benches = dict(decode=bench_decode, prefill=bench_prefill, kv=bench_kv,
                   pointwise=bench_pointwise, moe=bench_moe)
    rows = []
    for key in args.only.split(","):
        rows += benches[key](torch, K, cfg, dev, torch.bfloat16, timer)
    print_table(rows, peak, measured)


def fmt_peak(peak):
    return "unknown (not in PEAK_TBPS)" if peak is None else f"{peak:.2f} TB/s (table)"


if __name__ == "__main__":
    main()
