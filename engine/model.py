"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over the paged KV cache.

Who calls what: ``engine.loader.load_model`` builds :class:`LlamaForCausalLM` from a
:class:`ModelConfig` and feeds ``load_weights`` with ``(hf_name, tensor)`` pairs from
``engine.loader.iter_weights``; the model runner / ``engine.offline`` calls
``forward(batch, kv_cache)`` once per step with a :class:`ForwardBatch`.

Each attention layer rotates q/k, writes the new K/V into ``kv_cache[layer]`` at
``batch.slot_mapping``, then attends: prefill batches over the fresh q/k/v (causal within each
sequence), decode batches over each sequence's paged context. All maths goes through
``kernels`` (the dispatch point); this file holds only the wiring. Under tensor parallelism
(next issue) q|k|v and gate|up are column-parallel, o_proj and down_proj row-parallel, so each
rank keeps ``num_heads / tp`` query heads and ``num_kv_heads / tp`` kv heads (see
``engine.layers``); the KV cache of a rank then holds only its kv heads.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.layers import Embedding, MergedColumnLinear, RMSNorm, RowLinear, load_param
from kernels import (build_rope_cache, paged_decode_attention, prefill_attention, rms_norm,
                     rotary_embedding, silu_and_mul, store_kv)

# Hugging Face projection name -> (our merged module, shard index)
_MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaAttention(nn.Module):
    """GQA self-attention: q|k|v projection, rotary, KV store, paged attention, o_proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads  # per rank
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedColumnLinear(config.hidden_size, [q, kv, kv], config.attention_bias,
                                           config.torch_dtype)
        self.o_proj = RowLinear(q, config.hidden_size, config.torch_dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_layer: torch.Tensor,
                rope: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary_embedding(q, k, batch.positions, rope)
        store_kv(k, v, kv_layer, batch.slot_mapping)
        if batch.is_prefill:
            o = prefill_attention(q, k, v, batch.cu_seqlens, self.scale)
        else:
            o = paged_decode_attention(q, kv_layer, batch.block_tables, batch.context_lens, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate|up as one column-parallel matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = MergedColumnLinear(config.hidden_size, [i, i], False, config.torch_dtype)
        self.down_proj = RowLinear(i, config.hidden_size, config.torch_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual add is fused into the next RMSNorm (``kernels.rms_norm``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dt = config.torch_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.mlp = LlamaMLP(config)

    def forward(self, h, residual, batch, kv_layer, rope):
        norm = self.input_layernorm
        if residual is None:
            residual, x = h, rms_norm(h, norm.weight, norm.eps)
        else:
            x, residual = rms_norm(h, norm.weight, norm.eps, residual)
        x = self.self_attn(x, batch, kv_layer, rope)
        norm = self.post_attention_layernorm
        x, residual = rms_norm(x, norm.weight, norm.eps, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.torch_dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.torch_dtype)


class LlamaForCausalLM(nn.Module):
    """The whole model; parameter names follow Hugging Face except the merged projections."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens          # shares the one weight
        else:
            self.lm_head = Embedding(config.vocab_size, config.hidden_size, config.torch_dtype)
        rope = build_rope_cache(config.head_dim, config.max_position, config.rope_theta)
        self.register_buffer("rope_cache", rope, persistent=False)

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[len(batch.logits_indices), vocab]``; writes K/V into ``kv_cache``."""
        if kv_cache.shape[0] != len(self.model.layers):
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, model has {len(self.model.layers)}")
        h, residual = self.model.embed_tokens(batch.input_ids), None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, batch, kv_cache[i], self.rope_cache)
        idx = batch.logits_indices                            # norm is per row: select first
        norm = self.model.norm
        h, _ = rms_norm(h[idx], norm.weight, norm.eps, residual[idx])
        return torch.nn.functional.linear(h, self.lm_head.weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(hf_name, tensor)`` pairs in; raise ``ValueError`` on unknown or missing names."""
        params = dict(self.named_parameters())
        pending = set(params)
        shards = {name: len(mod.output_sizes) for name, mod in self.named_modules()
                  if isinstance(mod, MergedColumnLinear)}
        got_shard: dict[str, set[int]] = {}
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue                                     # tied: the embedding is the head
            prefix, _, leaf = name.rpartition(".")            # leaf: weight | bias
            mod_path, _, proj = prefix.rpartition(".")
            if proj in _MERGED:
                merged, index = _MERGED[proj]
                target = f"{mod_path}.{merged}"
                module = self.get_submodule(target) if f"{target}.{leaf}" in params else None
                if module is None:
                    raise ValueError(f"unexpected checkpoint weight {name!r}")
                module.load_shard(index, leaf, tensor)
                got_shard.setdefault(f"{target}.{leaf}", set()).add(index)
                continue
            if name not in params:
                raise ValueError(f"unexpected checkpoint weight {name!r}")
            load_param(params[name], tensor, name)
            pending.discard(name)
        for name, indices in got_shard.items():
            if len(indices) == shards[name.rpartition(".")[0]]:
                pending.discard(name)
        if pending:
            raise ValueError(f"checkpoint is missing {len(pending)} weights, e.g. {sorted(pending)[:5]}")
