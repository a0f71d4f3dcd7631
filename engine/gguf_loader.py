"""GGUF files (llama.cpp format): model config and weights under Hugging Face names.

Called by ``engine.source`` (the config) and ``engine.loader`` (the weights) only. One
:class:`gguf.GGUFReader` (memory-mapped, ~3.5 s for SmolLM2 because the tokenizer lives in its
metadata) serves both the config and the weights; tensors are dequantized one at a time, on
demand, so a rank can read only what it wants. Reading the config needs no torch (the router
does it); only reading weights imports it.

GGUF quirks handled here:
- tensor dims are listed innermost-first; the reader's ``data`` array is already in numpy
  (row-major) order, and ``gguf.quants.dequantize`` returns ``[out_features, in_features]``;
- llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` for its interleaved
  rope (architecture "llama" only, Mistral included; Qwen2 is stored as is); we undo it;
- a missing ``output.weight`` means the LM head is tied to ``token_embd``;
- served with ``weights_dtype`` int8 or int4, 2-D tensors stored as Q8_0, Q4_0, Q4_1 or Q4_K
  come as ``engine.quant.GroupQuant`` (the file's own codes and scales, ``engine.gguf_blocks``)
  instead of fp32; the layers re-quantize them only where their kernel's layout differs;
- Mixtral is architecture "llama" with ``llama.expert_count`` / ``llama.expert_used_count``
  (-> ``ModelConfig.architecture="mixtral"``, ``num_experts``, ``num_experts_per_tok``); its
  router is ``ffn_gate_inp`` and its experts are stacked ``ffn_{gate,up,down}_exps``
  ``[E, out, in]``, named ``block_sparse_moe.experts.w1|w3|w2.weight`` for ``engine.moe``.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from common.model import ModelConfig
from engine.gguf_blocks import BLOCK_TYPES, decode

if TYPE_CHECKING:
    import torch

_PERMUTED_ROPE_ARCHS = ("llama",)
SUPPORTED_ARCHS = ("llama", "qwen2")

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_PER_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate_exps": "block_sparse_moe.experts.w1",
              "ffn_up_exps": "block_sparse_moe.experts.w3", "ffn_down_exps": "block_sparse_moe.experts.w2"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_reader(path: str):
    import gguf
    return gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m or m.group(2) not in _PER_LAYER:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama-family counterpart")
    return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"


def config_from_reader(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHS})")
    key = lambda k: _field(reader, f"{arch}.{k}")           # noqa: E731
    names = {t.name for t in reader.tensors}
    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    vocab = key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = [_field(reader, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    experts, top_k = int(key("expert_count") or 0), int(key("expert_used_count") or 0)
    if experts and not 0 < top_k <= experts:
        raise ValueError(f"GGUF {arch}.expert_count={experts} with expert_used_count={top_k} "
                         f"(need 0 < used <= count)")
    return ModelConfig(
        architecture="mixtral" if experts else "llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv") or heads),
        head_dim=int(key("attention.key_length") or hidden // heads),
        intermediate_size=int(key("feed_forward_length")),
        rope_theta=float(key("rope.freq_base") or 10000.0),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position=int(key("context_length")),
        tie_word_embeddings="output.weight" not in names,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        bos_token_id=None if bos is None else int(bos),
        attention_bias="blk.0.attn_q.bias" in names,
        num_experts=experts,
        num_experts_per_tok=top_k if experts else 0,
    )


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> rotate_half order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _group_quant(t, arch: str, name: str, config: ModelConfig):
    """One block-quantized 2-D tensor as ``GroupQuant`` (q/k rows un-permuted like the floats)."""
    import torch

    from engine.quant import GroupQuant
    parts = decode(t.data, t.tensor_type.name, int(t.shape[0]))
    if arch in _PERMUTED_ROPE_ARCHS and (".q_proj." in name or ".k_proj." in name):
        heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
        parts = [None if p is None else unpermute_rope(p, heads) for p in parts]
    return GroupQuant(*(None if p is None else torch.from_numpy(np.ascontiguousarray(p)) for p in parts))


def iter_reader_weights(reader, config: ModelConfig,
                        want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor in config.dtype)``; ``want(hf_name)`` False skips the read.
    With ``config.weights_dtype`` int8 / int4, block-quantized 2-D tensors come as
    ``engine.quant.GroupQuant`` (see the module doc)."""
    import torch
    from gguf.quants import dequantize
    arch = _field(reader, "general.architecture")
    blocks = config.weights_dtype in ("int8", "int4")
    for t in reader.tensors:
        name = hf_name(t.name)
        if want is not None and not want(name):
            continue
        if blocks and len(t.shape) == 2 and t.tensor_type.name in BLOCK_TYPES:
            yield name, _group_quant(t, arch, name, config)
            continue
        w = dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if arch in _PERMUTED_ROPE_ARCHS and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_rope(w, config.num_heads if ".q_proj." in name else config.num_kv_heads)
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:                          # F32/F16 tensors are mmap views
            w = w.copy()
        yield name, torch.from_numpy(w).to(config.torch_dtype)
