"""The one dispatch point for compute kernels: the engine imports only from here.

``from kernels import rms_norm, rotary_embedding, ...`` gives functions that pick an
implementation per call from the tensor they are given (:func:`_pick`, the only dispatch
logic): for a CUDA tensor the Triton twin registered in ``_TRITON`` (``kernels/triton_*.py``),
for anything else the plain-PyTorch reference in ``_REFERENCE`` (``kernels.ops``,
``kernels.attention``, ``kernels.kv_copy``, ``kernels.moe_permute``), which is also the
correctness oracle the Triton kernels are tested against. Both have the same signatures,
return values and in-place effects. A kernel with no twin (``paged_prefill_attention``, for
now) runs its reference on CUDA tensors too. One exception: CPU paged decode attention is the batched
``kernels.attention.paged_decode_attention`` (one call for the whole batch); its per-sequence
loop, ``paged_decode_attention_reference``, is the oracle that both are tested against.

``_TRITON`` names each twin as ``"module:function"`` and the module is imported on the first
call with a CUDA tensor, never at ``import kernels``: importing this package stays cheap and
works without triton or a GPU. If triton is not installed, CUDA tensors fall back to the
references, with one logged warning (a torch CUDA wheel ships triton, so this is a degraded
setup, not an error); any other failure to import a Triton module is raised as is.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Callable

import torch

from kernels import attention as _attn
from kernels import kv_copy as _kv
from kernels import moe_permute as _moe
from kernels import ops as _ops

_REFERENCE: dict[str, Callable] = {
    "rms_norm": _ops.rms_norm,
    "rotary_embedding": _ops.rotary_embedding,
    "silu_and_mul": _ops.silu_and_mul,
    "store_kv": _attn.store_kv,
    "prefill_attention": _attn.prefill_attention,
    "prefill_attention_lse": _attn.prefill_attention_lse,
    "paged_decode_attention": _attn.paged_decode_attention,
    "paged_prefill_attention": _attn.paged_prefill_attention,   # no Triton twin yet
    "kv_pack": _kv.kv_pack,
    "kv_unpack": _kv.kv_unpack,
    "moe_permute": _moe.moe_permute,
    "moe_unpermute": _moe.moe_unpermute,
}
# name -> "module:function" of its Triton twin (same signature), imported on first CUDA use.
# Read-only: the imported functions are memoised by _triton_kernel, not stored here.
_TRITON: dict[str, str] = {
    "rms_norm": "kernels.triton_ops:rms_norm",
    "rotary_embedding": "kernels.triton_ops:rotary_embedding",
    "silu_and_mul": "kernels.triton_ops:silu_and_mul",
    "store_kv": "kernels.triton_attention:store_kv",
    "prefill_attention": "kernels.triton_attention:prefill_attention",
    "prefill_attention_lse": "kernels.triton_attention:prefill_attention_lse",
    "paged_decode_attention": "kernels.triton_attention:paged_decode_attention",
    "kv_pack": "kernels.triton_kv:kv_pack",
    "kv_unpack": "kernels.triton_kv:kv_unpack",
    "moe_permute": "kernels.triton_moe:moe_permute",
    "moe_unpermute": "kernels.triton_moe:moe_unpermute",
}

log = logging.getLogger(__name__)


@functools.cache
def _triton_available() -> bool:
    """Whether triton can be imported; logs the fallback once when it cannot."""
    if importlib.util.find_spec("triton") is None:
        log.warning("triton is not installed: CUDA tensors use the PyTorch reference kernels "
                    "(slow); install the triton that matches torch to get the Triton kernels")
        return False
    return True


@functools.cache
def _triton_kernel(name: str) -> Callable:
    """Import the Triton twin of ``name`` (its module on first use) and return it."""
    module, function = _TRITON[name].split(":")
    return getattr(importlib.import_module(module), function)


def _pick(name: str, tensor: torch.Tensor) -> Callable:
    """Triton version of ``name`` for CUDA tensors when one is registered and triton is
    installed, else the reference."""
    if tensor.is_cuda and name in _TRITON and _triton_available():
        return _triton_kernel(name)
    return _REFERENCE[name]


def rms_norm(x, weight, eps, residual=None):
    return _pick("rms_norm", x)(x, weight, eps, residual)


def rotary_embedding(q, k, positions, cos_sin_cache):
    return _pick("rotary_embedding", q)(q, k, positions, cos_sin_cache)


def silu_and_mul(x):
    return _pick("silu_and_mul", x)(x)


def store_kv(k, v, kv_layer, slot_mapping):
    return _pick("store_kv", kv_layer)(k, v, kv_layer, slot_mapping)


def prefill_attention(q, k, v, cu_seqlens, scale):
    return _pick("prefill_attention", q)(q, k, v, cu_seqlens, scale)


def prefill_attention_lse(q, k, v, cu_seqlens, scale, causal=True, cu_seqlens_k=None):
    return _pick("prefill_attention_lse", q)(q, k, v, cu_seqlens, scale, causal, cu_seqlens_k)


def paged_decode_attention(q, kv_layer, block_tables, context_lens, scale, max_context_len=None):
    return _pick("paged_decode_attention", q)(q, kv_layer, block_tables, context_lens, scale,
                                              max_context_len)


def paged_prefill_attention(q, kv_layer, block_tables, context_lens, cu_seqlens, scale):
    return _pick("paged_prefill_attention", q)(q, kv_layer, block_tables, context_lens, cu_seqlens,
                                               scale)


def kv_pack(kv_cache, block_table, token_start, token_end, layer_start, layer_end, head_start,
            head_end, out=None):
    return _pick("kv_pack", kv_cache)(kv_cache, block_table, token_start, token_end, layer_start,
                                      layer_end, head_start, head_end, out=out)


def kv_unpack(buf, kv_cache, block_table, token_start, layer_start, head_start):
    return _pick("kv_unpack", kv_cache)(buf, kv_cache, block_table, token_start, layer_start, head_start)


def moe_permute(x, topk_ids, num_experts):
    return _pick("moe_permute", x)(x, topk_ids, num_experts)


def moe_unpermute(y, order, topk_weights, num_tokens):
    return _pick("moe_unpermute", y)(y, order, topk_weights, num_tokens)


build_rope_cache = _ops.build_rope_cache    # setup helper, not a hot-path kernel
merge_attention = _attn.merge_attention

__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul", "store_kv", "prefill_attention",
           "prefill_attention_lse", "paged_decode_attention", "paged_prefill_attention", "kv_pack",
           "kv_unpack", "moe_permute", "moe_unpermute", "build_rope_cache", "merge_attention"]
