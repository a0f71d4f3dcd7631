"""Quantized weights (``engine.quant``, ``engine.gguf_blocks``, ``--weights-dtype``).

- GGUF blocks decode to the gguf package's own dequantization (Q8_0, Q4_0, Q4_1, Q4_K);
- each mode's matmul equals ``x`` times its own dequantized weight within ``tests.tolerances``
  (bf16 results, fp32 sums of ``K`` terms), and the stored weight is within half a
  quantization step of the original;
- GGUF Q4_1 codes are served by int4 as they are (no re-quantization);
- TP2 shards of a quantized column- and row-parallel layer equal the unsharded layer, and a
  row-parallel split that cuts a quantization group is refused; a tiny safetensors model
  quantized at load runs TP2 (gloo ranks) like one rank;
- SmolLM2 served int8 / int4 agrees with fp32 on >= 90% / 85% of 256 teacher-forced positions
  of held-out text, with perplexity within 10%;
- every mode runs, correctly, on a CPU without AMX or AVX-512 (oneDNN and ATen capped by
  ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` in a subprocess).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.gguf_blocks import decode
from engine.layers import MergedColumnLinear, RowLinear
from engine.quant import KERNEL_DTYPE, GroupQuant, quantize_int4_groups, quantize_int8_rows
from tests.tolerances import assert_close, model_matmuls, model_reduction_length

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

MODES = ("bf16", "int8", "int4")
# every mode's kernel: bf16 activations and results, fp32 sums (tests.tolerances)
KERNEL = dict(dtype=KERNEL_DTYPE, accumulate=torch.float32)


def _blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes ``[rows, bytes_per_row]`` of a random weight stored as ``type_name``."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name != "Q4_K":                        # the gguf package quantizes these itself
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qtype)
    raw = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)   # random codes and scales,
    for at in (0, 2):                                                       # sane fp16 d and dmin
        scales = rng.uniform(1e-3, 1e-2, raw.shape[:2]).astype(np.float16)
        raw[..., at: at + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def _group_quant(raw: np.ndarray, type_name: str, cols: int) -> GroupQuant:
    return GroupQuant(*(None if p is None else torch.from_numpy(np.ascontiguousarray(p))
                        for p in decode(raw, type_name, cols)))


@pytest.mark.unit
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_block_decode_matches_gguf_dequantize(type_name):
    raw = _blocks(type_name, 24, 512)
    ref = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(24, 512))
    got = _group_quant(raw, type_name, 512)
    assert got.codes.dtype == (torch.int8 if type_name == "Q8_0" else torch.uint8) and got.group == 32
    assert_close(got.dequantize(), ref, k=2)             # code * scale + offset, in other orders
    assert decode(raw, "Q6_K", 512) is None                         # not ours: the loader dequantizes


def _stored(layer) -> torch.Tensor:
    """The weight as the kernel sees it, dequantized in fp32 (scales as stored, in bf16)."""
    mode = layer.weights_dtype
    if mode == "int8":
        return layer.weight.float() * layer.weight_scale.float()[:, None]
    if mode == "bf16":
        return layer.weight.float()
    raise AssertionError(mode)


def _int4_reference(w, k: int) -> torch.Tensor:
    """What the int4 kernel multiplies by: ``(q - 8) s + z`` with ``s``, ``z`` rounded to bf16."""
    q = quantize_int4_groups(w)
    s = q.scale.to(KERNEL_DTYPE).float()
    z = (q.offset + 8 * q.scale).to(KERNEL_DTYPE).float()
    n = q.codes.shape[0]
    return ((q.codes.float().view(n, -1, 32) - 8) * s[..., None] + z[..., None]).view(n, k)


def _row_linear(mode: str, w, k: int, n: int, offset: int = 0, width: int | None = None) -> RowLinear:
    layer = RowLinear(width or k, n, torch.float32, full_input=k, input_offset=offset, weights=mode)
    layer.load("weight", w)
    return layer


@pytest.mark.unit
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_matmul_matches_its_dequantized_weight(mode, rows):
    torch.manual_seed(0)
    n, k = 100, 96                                   # n not a multiple of 16: int4 pads
    w = torch.randn(n, k) * 0.05
    layer = _row_linear(mode, w, k, n)
    x = torch.randn(rows, k)
    ref_w = _int4_reference(w, k) if mode == "int4" else _stored(layer)
    ref = x.to(KERNEL_DTYPE).float() @ ref_w.T
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert_close(y, ref, k=k, **KERNEL)
    step = {"bf16": w.abs() * 2 ** -8, "int4": None,
            "int8": layer.weight_scale.float()[:, None] / 2 if mode == "int8" else None}[mode]
    if step is not None:                             # quantization error: half a step
        assert ((ref_w - w).abs() <= step * 1.001 + 1e-7).all()
    else:
        q = quantize_int4_groups(w)
        half = q.scale.repeat_interleave(32, dim=1) / 2
        assert ((q.dequantize() - w).abs() <= half * 1.001 + 1e-6).all()


@pytest.mark.unit
def test_int4_serves_gguf_q4_1_codes_as_they_are():
    raw = _blocks("Q4_1", 48, 256)
    gq = _group_quant(raw, "Q4_1", 256)
    assert quantize_int4_groups(gq) is gq                           # no re-quantization
    layer = _row_linear("int4", gq, 256, 48)
    x = torch.randn(3, 256)
    w = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(48, 256))
    ref = x.to(KERNEL_DTYPE).float() @ w.T                 # w: fp32 d, m; the kernel's in bf16
    assert_close(layer(x), ref, k=256, **KERNEL, scale=float(x.abs().max() * w.abs().sum(1).max()))


@pytest.mark.unit
@pytest.mark.parametrize("mode", MODES)
def test_tp2_shards_of_a_quantized_layer_equal_the_unsharded_layer(mode):
    torch.manual_seed(1)
    n, k = 64, 128
    w = torch.randn(n, k) * 0.05
    x = torch.randn(4, k)
    # column-parallel (q | k like): each rank keeps its rows of each logical shard
    full = MergedColumnLinear(k, [n // 2, n // 2], False, torch.float32, weights=mode)
    full.load_shard(0, "weight", w[: n // 2])
    full.load_shard(1, "weight", w[n // 2:])
    ranks = []
    for r in range(2):
        layer = MergedColumnLinear(k, [n // 4, n // 4], False, torch.float32, full_sizes=[n // 2, n // 2],
                                   shard_offsets=[r * n // 4, r * n // 4], weights=mode)
        layer.load_shard(0, "weight", w[: n // 2])
        layer.load_shard(1, "weight", w[n // 2:])
        ranks.append(layer(x))
    y = full(x)
    q = n // 4
    got = torch.cat([ranks[0][:, :q], ranks[1][:, :q], ranks[0][:, q:], ranks[1][:, q:]], dim=1)
    assert_close(got, y, k=k, **KERNEL)          # the same sums; a kernel may block N differently
    # row-parallel: each rank multiplies its half of the columns, the partial sums add up
    whole = _row_linear(mode, w, k, n)
    halves = [_row_linear(mode, w, k, n, offset=r * k // 2, width=k // 2) for r in range(2)]
    # the rank's columns of the unsharded codes and scales: a shard copies them, bit for bit
    if mode == "int8":
        assert torch.equal(halves[1].weight, whole.weight[:, k // 2:])
        assert torch.equal(halves[1].weight_scale, whole.weight_scale)
    if mode == "int4":
        groups = k // 32 // 2
        assert torch.equal(halves[1].weight_scale_zeros, whole.weight_scale_zeros[groups:])
    y = whole(x)
    parts = [halves[0](x[:, : k // 2]), halves[1](x[:, k // 2:])]
    # each partial sum is rounded to bf16 at its own magnitude before they are added
    assert_close(parts[0] + parts[1], y, k=k, **KERNEL, scale=max(float(p.abs().max()) for p in parts + [y]))


@pytest.mark.unit
def test_quantized_layouts_the_kernels_cannot_take_are_refused():
    w = torch.randn(32, 128)
    with pytest.raises(ValueError, match="split a group"):
        _row_linear("int4", w, 128, 32, offset=16, width=64)          # columns [16, 80) cut groups
    _row_linear("int8", w, 128, 32, offset=16, width=64)              # one scale per row: any slice
    with pytest.raises(ValueError, match="divisible by 16"):
        RowLinear(40, 8, torch.float32, weights="int8")
    with pytest.raises(ValueError, match="divisible by 32"):
        RowLinear(48, 8, torch.float32, weights="int4")
    with pytest.raises(ValueError, match="weights dtype"):
        RowLinear(64, 8, torch.float32, weights="int3")
    from engine.loader import load_model
    for mode in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"CPU {mode} kernels"):
            load_model("", device="cuda", weights_dtype=mode)
    assert quantize_int8_rows(torch.zeros(2, 16)).dequantize().abs().max() == 0   # no 0/0


def _served_logits(path, weights_dtype, layout=None):
    """Prefill logits [3, vocab] of three prompts, served (``engine.llm_engine.LLMEngine``) on
    ``layout``'s ranks (default one rank in this process)."""
    from common.layout import ParallelConfig
    from engine.llm_engine import LLMEngine
    from tests.parity import engine_config

    cfg = engine_config(path, block_size=8, parallel=layout or ParallelConfig(), threads=1,
                        weights_dtype=weights_dtype)
    with LLMEngine(cfg) as engine:
        return engine.generate(PROMPTS, 1, return_logits=True)[1]


PROMPTS = [list(b"The quick brown fox"), [257, 117, 115, 101, 114, 10, 72], list(range(40, 57))]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_hf_model_quantized_at_load_serves_tp2_like_one_rank(mode, tmp_path):
    """A safetensors model quantized at load: TP2 ranks' logits equal one rank's (bf16 rounding
    of the partial sums apart); int8 stays near fp32 (int4's quality is measured on SmolLM2
    below: on random weights 4 bits are far from fp32).

    Bounds (``tests.tolerances``, fp32 sums of the model's reduction length): TP2 and one rank
    differ in each matmul's bf16-rounded result (``roundings = model_matmuls``); int8 and fp32
    also in the bf16 input and the int8 weight, whose step (``max|w_row| / 127``) is about
    bf16's eps relative to the row (``roundings = 3 x``). No argmax
    check: these random logits' top two are 1-3 % of max|logit| apart, as close as bf16 rounding
    moves them; int8's top-1 agreement is measured on SmolLM2 below."""
    from common.layout import ParallelConfig
    from engine.loader import load_model_config, resolve_model
    from tests.models import make_tiny_llama

    path = make_tiny_llama(tmp_path / "m", seed=3)   # hidden 64, 8 heads: TP2 o_proj shards are 32 columns
    config = load_model_config(resolve_model(path))
    k, matmuls = model_reduction_length(config, max(map(len, PROMPTS))), model_matmuls(config)
    one = _served_logits(path, mode)
    two = _served_logits(path, mode, ParallelConfig(tp=2))
    for got, want in zip(two, one):
        assert_close(got, want, k=k, **KERNEL, roundings=matmuls)
    if mode == "int8":
        ref = _served_logits(path, "fp32")
        for got, want in zip(one, ref):
            assert_close(got, want, k=k, **KERNEL, roundings=3 * matmuls)


@pytest.mark.integration
def test_smollm2_quantized_agrees_with_fp32_on_held_out_text():
    from bench.quant import score_text, text_tokens
    from engine.loader import load_model, load_tokenizer, resolve_model

    source = resolve_model("")                                      # the embedded SmolLM2 Q4_1 GGUF
    tokens = text_tokens(load_tokenizer(source))[:257]               # 256 scored positions
    scores = {}
    for mode in ("fp32", "int8", "int4"):
        config, model = load_model(source, weights_dtype=mode)
        scores[mode] = score_text(model, config, tokens, window=256)
    top1, nll = scores["fp32"]
    assert top1.numel() == 256
    for mode, bound in (("int8", 0.90), ("int4", 0.85)):
        agree = (scores[mode][0] == top1).float().mean().item()
        ppl, ref_ppl = scores[mode][1].mean().exp().item(), nll.mean().exp().item()
        assert agree >= bound, f"{mode}: top-1 agreement {agree:.1%} with fp32 < {bound:.0%}"
        assert ppl <= 1.1 * ref_ppl, f"{mode}: perplexity {ppl:.2f} vs fp32 {ref_ppl:.2f}"


# A CPU without AMX (AMD EPYC: AVX-512 with VNNI and BF16) and one without AVX-512 (AVX2 only):
# oneDNN, ATen's vector kernels and MKL capped to their instruction sets.
NO_AMX = {"avx512-vnni": dict(ONEDNN_MAX_CPU_ISA="AVX512_CORE_VNNI"),
          "avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")}


@pytest.mark.unit
@pytest.mark.parametrize("isa", sorted(NO_AMX))
def test_every_weight_format_runs_correctly_without_amx(isa):
    """The bf16/int8/int4 kernels (fp32 is ``F.linear``, which every parity test runs) match
    their dequantized weights, unsharded and as TP2 shards, in a process whose kernels may
    not use AMX (or AVX-512): the checks above, rerun there."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU's capability is {torch.backends.cpu.get_cpu_capability()}")
    env = {**os.environ, **NO_AMX[isa]}
    checks = [f"{__file__}::{name}" for name in ("test_quantized_matmul_matches_its_dequantized_weight",
                                                  "test_tp2_shards_of_a_quantized_layer_equal_the_unsharded_layer")]
    want_capability = "AVX2" if isa == "avx2" else torch.backends.cpu.get_cpu_capability()
    script = ("import sys, torch, pytest; "
              f"assert torch.backends.cpu.get_cpu_capability() == {want_capability!r}, "
              "torch.backends.cpu.get_cpu_capability(); "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))")
    run = subprocess.run([sys.executable, "-c", script, *checks], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
