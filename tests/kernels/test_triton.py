"""Triton kernels (``kernels/triton_*.py``) against their PyTorch references, plus the dispatch.

Every check is written once and parametrised over the device: ``cpu`` (marked ``unit``) runs
the kernels under the Triton interpreter, ``cuda`` (marked ``gpu``) runs them compiled.

Interpreter or compiled: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel,
i.e. when ``kernels.triton_*`` is imported, and an interpreted kernel runs even CUDA tensors
through NumPy on the host. So this module picks one mode for the whole process *before* it
imports them (``_import_kernels``):

* no CUDA device, or ``TRITON_INTERPRET=1`` already set: the interpreter (it sets
  ``TRITON_INTERPRET=1`` in ``os.environ``, for this process); ``cpu`` cases run, ``cuda`` skip;
* a CUDA device, or ``TRITON_INTERPRET=0``: compiled kernels; ``cuda`` cases run and ``cpu``
  ones skip (run ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton.py`` to check the
  interpreter there).

Compiling needs no GPU: ``test_kernels_compile_for_sm90`` (slow) builds every kernel as it is
launched, bf16 and fp32, down to an sm_90 cubin in a fresh ``TRITON_INTERPRET=0`` process, which
catches what the interpreter does not check (types, layouts, shared memory).

Nothing else in the test suite imports triton or ``kernels.triton_*`` (``kernels/__init__``
imports them lazily, on the first call with a CUDA tensor). Should one of our modules have been
imported earlier in the other mode, ``_import_kernels`` reloads it; should triton itself have
been (its own helpers are decorated then too), the in-process cases skip and
``test_kernels_in_a_fresh_process`` runs them in a new interpreter instead.

The interpreter is ~1000x slower than torch, so the default shapes are tiny but cover the edges
(lengths off the block size, one token, GQA groups 1/3/8, partial last blocks, several KV
splits, head_dim 24 that pads to 32, strided inputs, fp32 and bf16); bigger shapes are
``slow``. A Triton kernel and its reference are two code paths: they agree within
``tests.tolerances`` for each check's reduction length and the intermediate bf16 roundings
(the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest even, see
``kernels.triton_util``: at most one ulp, within the bound). Copies (store_kv in the cache's
dtype, KV pack/unpack, the MoE permutation) move values and compare bit for bit.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

_ENV = os.environ.get("TRITON_INTERPRET", "")
INTERPRET = _ENV == "1" if _ENV in ("0", "1") else not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")    # a requirement; without it there is nothing to check here

import kernels  # noqa: E402  (cheap: imports no Triton module)
from kernels import attention as attn_ref  # noqa: E402
from kernels import kv_copy as kv_ref  # noqa: E402
from kernels import ops as ops_ref  # noqa: E402
from tests.tolerances import assert_close, attention_length  # noqa: E402

moe_ref = importlib.import_module("kernels.moe_permute")   # `kernels.moe_permute` is the function
_TRITON_MODULES = ("kernels.triton_util", "kernels.triton_ops", "kernels.triton_attention",
                   "kernels.triton_kv", "kernels.triton_moe")


def _import_kernels() -> list[types.ModuleType] | None:
    """The Triton modules built in this module's mode (reloaded if they were imported in the
    other one), or None when triton itself was: its own jit helpers (``tl.zeros``...) were then
    decorated in that mode for good, and only a fresh process can check the kernels."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(standard.zeros, InterpretedFunction) != INTERPRET:
        return None
    mods = [importlib.import_module(name) for name in _TRITON_MODULES]
    if mods[0].INTERPRETED != INTERPRET:
        mods = [importlib.reload(m) for m in mods]
        kernels._triton_kernel.cache_clear()
    return mods


_, T_OPS, T_ATTN, T_KV, T_MOE = _import_kernels() or [None] * len(_TRITON_MODULES)
WRONG_MODE = T_OPS is None

DTYPES = [torch.float32, torch.bfloat16]
GQA = [(2, 2), (6, 2), (8, 1)]        # (query heads, kv heads): groups 1, 3, 8
ATTN_ROUNDINGS = 2    # bf16: each path rounds the softmax probabilities to bf16 before P V


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.unit),
                        pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if WRONG_MODE:
        pytest.skip("triton was imported in the other TRITON_INTERPRET mode before this module: "
                    "test_kernels_in_a_fresh_process runs these checks")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if INTERPRET:
            pytest.skip("TRITON_INTERPRET=1: the kernels were built for the interpreter")
    elif not INTERPRET:
        pytest.skip("kernels compiled for the GPU; set TRITON_INTERPRET=1 for the CPU cases")
    return torch.device(request.param)


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def close(got, want, dtype, k=1, roundings=0):
    """Two paths' results in ``dtype`` within ``tests.tolerances``: sums of ``k`` terms in
    fp32 (every kernel here and its reference accumulate in fp32); in bf16, ``roundings``
    intermediate values rounded on the way (the reference's bf16 ops, the kernels' casts)."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert_close(got, want, k=k, dtype=dtype, accumulate=torch.float32,
                 roundings=roundings if dtype != torch.float32 else 0)


# ----------------------------------------------------------------------------- pointwise ops

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, with_residual):
    x, w = rand(2, 3, 40, dtype=dtype, device=device), rand(40, dtype=dtype, device=device, seed=1)
    res = rand(2, 3, 40, dtype=dtype, device=device, seed=2) if with_residual else None
    got, want = T_OPS.rms_norm(x, w, 1e-6, res), ops_ref.rms_norm(x, w, 1e-6, res)
    if with_residual:
        assert isinstance(got, tuple) and len(got) == 2
        close(got[1], want[1], dtype, k=2)             # x + residual
        got, want = got[0], want[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    close(got, want, dtype, k=40, roundings=2)       # mean of 40 squares; residual sum, normed


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_on_fused_qkv_views(device, dtype):
    t, h, kvh, d = 7, 6, 2, 24                       # head_dim 24: the half (12) pads to 16
    qkv = rand(t, (h + 2 * kvh) * d, dtype=dtype, device=device)
    q, k, _ = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, kvh, d)        # strided, as engine.model makes them
    cache = ops_ref.build_rope_cache(d, 64, 10000.0, device=device)
    positions = torch.tensor([0, 5, 63, 1, 2, 40, 7], device=device)
    before = qkv.clone()
    (gq, gk), (wq, wk) = (T_OPS.rotary_embedding(q, k, positions, cache),
                          ops_ref.rotary_embedding(q, k, positions, cache))
    close(gq, wq, dtype, k=2, roundings=2)           # x1 cos - x2 sin: the reference's bf16 ops
    close(gk, wk, dtype, k=2, roundings=2)
    assert torch.equal(qkv, before)                  # not in place, like the reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(device, dtype):
    x = rand(4, 3, 66, dtype=dtype, device=device)
    close(T_OPS.silu_and_mul(x), ops_ref.silu_and_mul(x), dtype, roundings=1)   # silu(gate) rounded


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_skips_negative_slots(device, dtype):
    kv = rand(2, 5, 4, 2, 16, dtype=dtype, device=device)
    kvw = rand(6, 2 * 2 * 16, device=device, seed=1)
    slots = torch.tensor([0, 5, -1, 19, 7, 2], device=device)   # 19: last slot of block 4
    for source in (kvw.to(dtype), kvw):                          # same dtype, then cast on store
        k, v = (x.view(6, 2, 16) for x in source.split(32, dim=-1))   # strided views
        got, want = kv.clone(), kv.clone()
        T_ATTN.store_kv(k, v, got, slots)
        attn_ref.store_kv(k, v, want, slots)
        if source.dtype == dtype:
            assert torch.equal(got, want)                 # a copy: bit for bit
        else:                       # the interpreter rounds fp32 -> bf16 toward zero
            close(got, want, dtype)
            assert torch.equal(got[:, 2:4], kv[:, 2:4])       # blocks 2 and 3: untouched


def varlen(lengths, h, kvh, d, dtype, device, seed=0):
    t = sum(lengths)
    q, k, v = (rand(t, n, d, dtype=dtype, device=device, seed=seed + i)
               for i, n in enumerate((h, kvh, kvh)))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    return q, k, v, cu


PREFILL = [pytest.param([1, 5, 19], 16, id="small"),
           pytest.param([70, 1, 129], 64, id="multi-block", marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,kvh", GQA)
@pytest.mark.parametrize("lengths,d", PREFILL)
def test_prefill_attention(device, dtype, h, kvh, lengths, d):
    q, k, v, cu = varlen(lengths, h, kvh, d, dtype, device)
    n = attention_length(d, max(lengths))
    close(T_ATTN.prefill_attention(q, k, v, cu, d ** -0.5),
          attn_ref.prefill_attention(q, k, v, cu, d ** -0.5), dtype, k=n, roundings=ATTN_ROUNDINGS)
    (out, lse), (want, want_lse) = (T_ATTN.prefill_attention_lse(q, k, v, cu, d ** -0.5),
                                    attn_ref.prefill_attention_lse(q, k, v, cu, d ** -0.5))
    close(out, want, dtype, k=n, roundings=ATTN_ROUNDINGS)
    close(lse, want_lse, torch.float32, k=n)         # fp32 both, from the same bf16 inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_attention_lse_ring_blocks(device, dtype, causal):
    """Key blocks unlike the queries, as ring attention hands them over: Lk > Lq, an empty
    query sequence, an empty key block, and Lk < Lq (causal: early queries see no key)."""
    q, _, _, cu = varlen([3, 0, 9, 4], 6, 2, 24, dtype, device)
    cu_k = torch.tensor([0, 5, 7, 7, 9], dtype=torch.int32, device=device)
    k, v = (rand(9, 2, 24, dtype=dtype, device=device, seed=s) for s in (5, 6))
    (out, lse), (want, want_lse) = (
        T_ATTN.prefill_attention_lse(q, k, v, cu, 0.3, causal, cu_k),
        attn_ref.prefill_attention_lse(q, k, v, cu, 0.3, causal, cu_k))
    n = attention_length(24, 9)
    close(out, want, dtype, k=n, roundings=ATTN_ROUNDINGS)
    assert torch.equal(lse.isinf(), want_lse.isinf())      # a query that sees no key: -inf both
    close(lse, want_lse, torch.float32, k=n)


def paged(lengths, h, kvh, d, page, dtype, device):
    """A cache with shuffled block tables (rows may share blocks), one query per sequence."""
    g = torch.Generator().manual_seed(3)
    width = max(-(-n // page) for n in lengths) + 1              # one spare column
    num_blocks = 2 * width
    kv = rand(2, num_blocks, page, kvh, d, dtype=dtype, device=device, seed=4)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lengths])
    q = rand(len(lengths), h, d, dtype=dtype, device=device, seed=7)
    return (q, kv, tables.to(device=device, dtype=torch.int32),
            torch.tensor(lengths, dtype=torch.int32, device=device))


DECODE = [pytest.param([1, 37, 100, 64], 16, 1, id="1-split"),
          pytest.param([1, 37, 100, 64], 16, 4, id="4-splits"),
          pytest.param([700, 3, 513], 64, 8, id="8-splits-long", marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,kvh,page", [(2, 2, 16), (6, 2, 4), (8, 1, 8)])
@pytest.mark.parametrize("lengths,d,splits", DECODE)
def test_paged_decode_attention(device, dtype, h, kvh, page, lengths, d, splits):
    q, kv, tables, lens = paged(lengths, h, kvh, d, page, dtype, device)
    want = attn_ref.paged_decode_attention_reference(q, kv, tables, lens, d ** -0.5)
    n = attention_length(d, max(lengths)) + splits  # + merging the splits
    close(T_ATTN.paged_decode_attention_splits(q, kv, tables, lens, d ** -0.5, splits), want, dtype,
          k=n, roundings=ATTN_ROUNDINGS)
    if splits == 1:      # the public entry point with its own split count
        close(T_ATTN.paged_decode_attention(q, kv, tables, lens, d ** -0.5), want, dtype,
              k=n, roundings=ATTN_ROUNDINGS)


def test_decode_matches_last_row_of_prefill(device):
    """Decode of the last token over the stored prompt equals causal prefill's last row."""
    h, kvh, d, page, n = 8, 1, 16, 4, 13
    q, k, v, cu = varlen([n], h, kvh, d, torch.float32, device)
    kv = torch.zeros(2, 8, page, kvh, d, device=device)
    tables = torch.tensor([[5, 0, 7, 2]], dtype=torch.int32, device=device)
    slots = (tables[0].long()[torch.arange(n, device=device) // page] * page
             + torch.arange(n, device=device) % page)
    T_ATTN.store_kv(k, v, kv, slots)
    out = T_ATTN.paged_decode_attention_splits(q[-1:], kv, tables, torch.tensor([n], device=device),
                                               d ** -0.5, 2)
    close(out[0], T_ATTN.prefill_attention(q, k, v, cu, d ** -0.5)[-1], torch.float32,
          k=attention_length(d, n) + 2)


# ----------------------------------------------------------------------------- KV pack / unpack

@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_pack_unpack(device, dtype):
    cache = rand(3, 2, 10, 4, 3, 8, dtype=dtype, device=device)   # 10 blocks of 4 slots
    table = [7, 2, 9, 0]
    args = (table, 3, 14, 1, 3, 1, 3)        # tokens 3..13 (partial first/last block), layers 1-2, heads 1-2
    piece = T_KV.kv_pack(cache, *args)                  # pack and unpack copy: bit for bit
    assert torch.equal(piece, kv_ref.kv_pack(cache, *args))
    out = torch.empty_like(piece)
    assert T_KV.kv_pack(cache, *args, out=out) is out and torch.equal(out, piece)
    one = T_KV.kv_pack(cache, torch.tensor(table, device=device), 13, 14, 0, 3, 0, 3)
    assert torch.equal(one, kv_ref.kv_pack(cache, table, 13, 14, 0, 3, 0, 3))      # a single token
    buf = rand(*piece.shape, dtype=dtype, device=device, seed=9)
    got, want = cache.clone(), cache.clone()
    assert T_KV.kv_unpack(buf, got, table, 3, 1, 1) is None
    kv_ref.kv_unpack(buf, want, table, 3, 1, 1)
    assert torch.equal(got, want)
    assert torch.equal(T_KV.kv_pack(got, *args), buf)       # round trip


# ----------------------------------------------------------------------------- MoE permutation

@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_permute_unpermute(device, dtype):
    g = torch.Generator().manual_seed(0)
    t, k, e = 9, 2, 6                                    # expert 5 gets no token
    x = rand(t, 40, dtype=dtype, device=device)
    ids = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(t)]).to(device)
    weights = torch.rand(t, k, generator=g).to(device)
    got, want = T_MOE.moe_permute(x, ids, e), moe_ref.moe_permute(x, ids, e)
    for a, b in zip(got, want):                          # a permutation moves rows: bit for bit
        assert a.dtype == b.dtype and torch.equal(a, b)
    y = rand(t * k, 40, dtype=dtype, device=device, seed=1)
    # a weighted sum of each token's k rows
    close(T_MOE.moe_unpermute(y, want[1], weights, t), moe_ref.moe_unpermute(y, want[1], weights, t), dtype,
          k=k, roundings=1)
    mine = want[1][3:11]                                 # expert parallelism: a slice of rows
    close(T_MOE.moe_unpermute(y[3:11], mine, weights, t),
          moe_ref.moe_unpermute(y[3:11], mine, weights, t), dtype, k=k, roundings=1)


# ----------------------------------------------------------------------------- errors and dispatch

def test_kernels_in_a_fresh_process():
    """Only when triton was imported in the wrong mode before this module (see the module
    docstring): the default-tier checks of this file, in a new interpreter."""
    if not WRONG_MODE:
        pytest.skip("the kernels were imported in the right mode: the checks run in-process")
    env = dict(os.environ, TRITON_INTERPRET="1" if INTERPRET else "0")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "not slow", __file__], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


ERRORS = {
    "paged_decode_attention": lambda m, dev: m.paged_decode_attention(
        torch.zeros(2, 4, 8, device=dev), torch.zeros(2, 3, 4, 2, 8, device=dev),
        torch.zeros(2, 2, dtype=torch.int32, device=dev), torch.tensor([3, 9], device=dev), 1.0),
    "kv_pack": lambda m, dev: m.kv_pack(torch.zeros(1, 2, 3, 4, 1, 8, device=dev), [0, 5], 0, 6,
                                        0, 1, 0, 1),
    "moe_permute": lambda m, dev: m.moe_permute(torch.zeros(2, 4, device=dev),
                                                torch.tensor([[0], [7]], device=dev), 4),
    "prefill_attention": lambda m, dev: m.prefill_attention(
        torch.zeros(3, 5, 8, device=dev), torch.zeros(3, 2, 8, device=dev),
        torch.zeros(3, 2, 8, device=dev), torch.tensor([0, 3], device=dev), 1.0),
}


def compile_all(arch: int = 90) -> None:
    """Compile every kernel for ``sm_<arch>`` with the block sizes and options the wrappers
    launch it with (d=128, 32/8 heads). Needs compiled mode (``TRITON_INTERPRET=0``), no GPU."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for dt, tdt, fp32 in (("bf16", tl.bfloat16, False), ("fp32", tl.float32, True)):
        ptr, att = f"*{dt}", dict(lse_ptr="*fp32", po_ptr="*fp32", plse_ptr="*fp32")
        cases = [
            (T_OPS._rms_norm_kernel, {}, dict(HAS_RES=True, BLOCK=8192), dict(num_warps=16)),
            (T_OPS._rope_kernel, dict(pos_ptr="*i64", cache_ptr="*fp32"),
             dict(COS_DTYPE=tdt, BLOCK_H=16, BLOCK_HALF=64), {}),
            (T_OPS._silu_and_mul_kernel, {}, dict(BLOCK=1024), {}),
            (T_ATTN._store_kv_kernel, dict(slot_ptr="*i64"), dict(BLOCK_H=8, BLOCK_D=128), {}),
            (T_ATTN._prefill_kernel, dict(att, cu_q_ptr="*i32", cu_k_ptr="*i32"),
             dict(GROUP=4, CAUSAL=True, BLOCK_M=32 if fp32 else 64, BLOCK_N=32, BLOCK_D=128,
                  FP32=fp32), dict(num_warps=4 if fp32 else 8)),
            (T_ATTN._decode_split_kernel, dict(att, bt_ptr="*i32", ctx_ptr="*i32"),
             dict(GROUP=4, BLOCK_G=16, BLOCK_N=32, BLOCK_D=128, FP32=fp32), dict(num_stages=2)),
            (T_ATTN._decode_merge_kernel, dict(att), dict(BLOCK_S=64, BLOCK_D=128), {}),
            (T_KV._kv_rows_kernel, dict(slot_ptr="*i64"), dict(PACK=True, BLOCK_T=2, BLOCK=1024), {}),
            (T_MOE._count_kernel, dict(ids_ptr="*i64", counts_ptr="*i64"), dict(BLOCK=1024), {}),
            (T_MOE._order_kernel, dict(ids_ptr="*i32", offsets_ptr="*i64", order_ptr="*i64"),
             dict(BLOCK=1024), {}),
            (T_MOE._gather_kernel, dict(order_ptr="*i64"), dict(TOPK=2, BLOCK=1024), {}),
            (T_MOE._inverse_kernel, dict(order_ptr="*i64", inv_ptr="*i64"), dict(BLOCK=1024), {}),
            (T_MOE._combine_kernel, dict(inv_ptr="*i64", w_ptr="*fp32"), dict(TOPK=2, BLOCK=1024), {}),
        ]
        for kernel, ptrs, consts, options in cases:
            sig = {n: "constexpr" if n in consts else ptrs.get(n, ptr) if n.endswith("_ptr")
                   else "fp32" if n in ("eps", "qk_scale") else "i32"
                   for n in inspect.signature(kernel.fn).parameters}
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm["cubin"], kernel.fn.__name__


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", "import tests.kernels.test_triton as t; t.compile_all(90)"],
                         cwd=root, env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_same_validation_errors(device, name):
    ref = {"paged_decode_attention": attn_ref, "prefill_attention": attn_ref, "kv_pack": kv_ref,
           "moe_permute": moe_ref}[name]
    tri = {attn_ref: T_ATTN, kv_ref: T_KV, moe_ref: T_MOE}[ref]
    with pytest.raises(ValueError) as want:
        ERRORS[name](ref, device)
    with pytest.raises(ValueError) as got:
        ERRORS[name](tri, device)
    assert str(got.value) == str(want.value)


@pytest.mark.unit
def test_dispatch_picks_reference_for_cpu_tensors():
    x = torch.zeros(2, 4)
    for name, ref in kernels._REFERENCE.items():
        assert kernels._pick(name, x) is ref
    out = kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
    # the dispatch calls the reference itself: the same function twice, bit for bit
    assert torch.equal(out, ops_ref.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6))


@pytest.mark.unit
def test_dispatch_picks_triton_twins_for_cuda_tensors():
    """Every registered twin resolves, has the reference's exact signature, and is picked; a
    kernel with no twin (paged prefill attention) gives CUDA tensors its PyTorch reference."""
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    assert set(kernels._TRITON) <= set(kernels._REFERENCE)
    for name in set(kernels._REFERENCE) - set(kernels._TRITON):
        assert kernels._pick(name, fake_cuda) is kernels._REFERENCE[name]
    for name in kernels._TRITON:
        ref = kernels._REFERENCE[name]
        twin = kernels._pick(name, fake_cuda)
        assert twin is not ref and twin.__module__.startswith("kernels.triton_")
        params = [[(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
                  for f in (twin, ref)]
        assert params[0] == params[1], name


@pytest.mark.unit
def test_dispatch_falls_back_once_without_triton(monkeypatch, caplog):
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    kernels._triton_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kernels"):
            for name, ref in kernels._REFERENCE.items():
                assert kernels._pick(name, fake_cuda) is ref
        assert sum("triton is not installed" in r.message for r in caplog.records) == 1
    finally:
        monkeypatch.undo()
        kernels._triton_available.cache_clear()
