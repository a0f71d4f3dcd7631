"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over the paged KV cache, TP/PP/CP-aware.

Who calls what: ``engine.loader.load_model`` (the whole model, or one rank's shard for
``engine.runtime.rank.RankRunner``) builds :class:`LlamaForCausalLM` from a
:class:`ModelConfig` and the rank's :class:`~engine.parallel.ParallelGroups`, and feed
``load_weights`` with full ``(hf_name, tensor)`` pairs from ``engine.loader.iter_weights``
(filtered with ``model.wants`` so a stage never reads another stage's weights); runners call
``forward(batch, kv_cache[, hidden])`` once per step with a :class:`ForwardBatch`.

Each attention layer rotates q/k, writes the new K/V into ``kv_cache[layer]`` at
``batch.slot_mapping``, then attends: prefill batches over the fresh q/k/v (causal within each
sequence; ring attention over the CP group when ``cp > 1``), prefill batches with a cached
prefix (``ForwardBatch.has_context``) and decode batches over each sequence's paged context.
All maths goes through ``kernels``; this file holds only the wiring.

Parallel layout of one rank (``groups=None``: one rank, the whole model):

- TP (Megatron pairing, see ``engine.layers``): rank ``r`` of ``tp`` keeps query heads
  ``[r*H/tp, (r+1)*H/tp)`` and the kv heads ``common.layout.kv_head_range(r, tp, KVH)``
  (a contiguous split when tp <= KVH, one replicated head when tp > KVH), and FFN columns
  ``[r*I/tp, (r+1)*I/tp)``; o_proj and down_proj end in one all-reduce each. Its query head
  ``j`` (global ``r*H/tp + j``) reads kv head ``(r*H/tp + j) // (H/KVH)``, which is local kv head
  ``j // (H/KVH)`` (tp <= KVH) or the single local head (tp > KVH), so the local GQA rule holds.
  Embedding, norms and LM head are replicated. The rank's KV cache holds only its kv heads.
- PP: stage ``s`` builds and loads only layers ``common.layout.layer_range(s, pp, L)``; the
  first stage embeds, the last applies the final norm and LM head, and the stages in between
  take and return ``(hidden, residual)`` (moved between stages by ``engine.runtime.rank.stage_step``). The KV
  cache of a stage holds only its layers (index ``i - start``).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

from common.layout import kv_head_range, layer_range
from common.model import CacheConfig, ModelConfig
from engine.batch import ForwardBatch, ForwardCancelled
from engine.layers import Embedding, MergedColumnLinear, RMSNorm, RowLinear, load_param
from engine.parallel import ParallelGroups
from kernels import (build_rope_cache, paged_decode_attention, paged_prefill_attention,
                     prefill_attention, rms_norm, rotary_embedding, silu_and_mul, store_kv)

# Hugging Face projection name -> (our merged module, shard index)
_MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LlamaAttention(nn.Module):
    """GQA self-attention of one TP rank: q|k|v (column-parallel), rotary, KV store, attention,
    o_proj (row-parallel, one all-reduce)."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        super().__init__()
        tp, d = groups.tp, config.head_dim
        self.num_heads = config.num_heads // tp.size                     # per rank
        kv_lo, kv_hi = kv_head_range(tp.rank, tp.size, config.num_kv_heads)
        self.num_kv_heads = kv_hi - kv_lo
        self.head_dim = d
        self.scale = d ** -0.5
        self.cp = groups.cp
        q, kv = self.num_heads * d, self.num_kv_heads * d
        q_off = tp.rank * q
        w = config.weights_dtype
        self.qkv_proj = MergedColumnLinear(
            config.hidden_size, [q, kv, kv], config.attention_bias, config.torch_dtype,
            full_sizes=[config.num_heads * d, config.num_kv_heads * d, config.num_kv_heads * d],
            shard_offsets=[q_off, kv_lo * d, kv_lo * d], weights=w)
        self.o_proj = RowLinear(q, config.hidden_size, config.torch_dtype, tp=tp,
                                full_input=config.num_heads * d, input_offset=q_off, weights=w)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_layer: torch.Tensor,
                rope: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary_embedding(q, k, batch.positions, rope)
        store_kv(k, v, kv_layer, batch.slot_mapping)
        if batch.is_prefill and self.cp.size > 1:
            if batch.has_context:
                raise ValueError(f"context parallelism (cp={self.cp.size}) prefills whole prompts, "
                                 f"not a batch with a cached prefix")
            from kernels.ring_attention import ring_prefill_attention  # context parallelism
            o = ring_prefill_attention(q, k, v, batch.positions, self.cp, self.scale)
        elif batch.has_context:                 # new tokens after a cached prefix: paged context
            o = paged_prefill_attention(q, kv_layer, batch.block_tables, batch.context_lens,
                                        batch.cu_seqlens, self.scale)
        elif batch.is_prefill:
            o = prefill_attention(q, k, v, batch.cu_seqlens, self.scale)
        else:
            o = paged_decode_attention(q, kv_layer, batch.block_tables, batch.context_lens, self.scale,
                                       batch.max_context_len)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``: gate|up column-parallel (rank ``r`` holds FFN
    columns ``[r*I/tp, (r+1)*I/tp)`` of each), down row-parallel with one all-reduce."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups | None = None, layer_index: int = 0):
        super().__init__()
        tp = (groups or ParallelGroups.single()).tp
        if config.intermediate_size % tp.size:
            raise ValueError(f"tp={tp.size} does not divide intermediate_size={config.intermediate_size}")
        i = config.intermediate_size // tp.size
        full, off = config.intermediate_size, tp.rank * i
        w = config.weights_dtype
        self.gate_up_proj = MergedColumnLinear(config.hidden_size, [i, i], False, config.torch_dtype,
                                               full_sizes=[full, full], shard_offsets=[off, off], weights=w)
        self.down_proj = RowLinear(i, config.hidden_size, config.torch_dtype, tp=tp,
                                   full_input=full, input_offset=off, weights=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


MlpFactory = Callable[[ModelConfig, ParallelGroups, int], nn.Module]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual add is fused into the next RMSNorm (``kernels.rms_norm``)."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups, mlp: nn.Module):
        super().__init__()
        dt = config.torch_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.self_attn = LlamaAttention(config, groups)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.mlp = mlp

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
    """Embedding (first stage only), this stage's layers, final norm (last stage only)."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups, mlp_factory: MlpFactory):
        super().__init__()
        dt = config.torch_dtype
        self.layer_start, self.layer_end = layer_range(groups.pp_rank, groups.pp.size, config.num_layers)
        self.embed_tokens = (Embedding(config.vocab_size, config.hidden_size, dt, config.weights_dtype)
                             if groups.is_first_stage else None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, groups, mlp_factory(config, groups, i))
            for i in range(self.layer_start, self.layer_end))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt) if groups.is_last_stage else None


def _default_mlp(config: ModelConfig, groups: ParallelGroups, layer_index: int) -> nn.Module:
    return LlamaMLP(config, groups, layer_index)


class LlamaForCausalLM(nn.Module):
    """One rank's part of the model; parameter names follow Hugging Face except the merged
    projections (and, under PP, layer indices local to the stage).

    ``groups=None``: one rank. ``mlp_factory(config, groups, layer_index) -> nn.Module`` builds
    the feed-forward block of global layer ``layer_index`` (default :class:`LlamaMLP`; the MoE
    model passes its sparse block). Raises ``ValueError`` when the layout cannot split the model.
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups | None = None,
                 mlp_factory: MlpFactory | None = None):
        super().__init__()
        groups = groups or ParallelGroups.single()
        groups.layout.validate_for(config, config.num_experts)
        self.config, self.groups = config, groups
        self.model = LlamaModel(config, groups, mlp_factory or _default_mlp)
        if not groups.is_last_stage:
            self.lm_head = None
        elif config.tie_word_embeddings and groups.is_first_stage:
            self.lm_head = self.model.embed_tokens          # shares the one weight
        else:                                                # own head, or the tied table on a later stage
            self.lm_head = Embedding(config.vocab_size, config.hidden_size, config.torch_dtype,
                                     config.weights_dtype)
        rope = build_rope_cache(config.head_dim, config.max_position, config.rope_theta)
        self.register_buffer("rope_cache", rope, persistent=False)

    # ---- shapes of this rank's share -------------------------------------------------------
    @property
    def num_local_kv_heads(self) -> int:
        return self.model.layers[0].self_attn.num_kv_heads

    def allocate_kv_cache(self, cache: CacheConfig, device: str | torch.device = "cpu") -> torch.Tensor:
        """This rank's cache: its layers, its kv heads (``engine.kv_cache.allocate_kv_cache``)."""
        from engine.kv_cache import allocate_kv_cache
        return allocate_kv_cache(self.config, cache, num_kv_heads=self.num_local_kv_heads,
                                 num_layers=len(self.model.layers), device=device)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor,
                hidden: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Run this stage over ``batch``; writes K/V into ``kv_cache`` (this stage's layers).

        First stage: embeds ``batch.input_ids``; later stages take ``hidden = (h, residual)``
        from the previous stage. Last stage returns fp32 logits
        ``[len(batch.logits_indices), vocab]``; other stages return ``(h, residual)`` ``[T, hidden]``.
        """
        if kv_cache.shape[0] != len(self.model.layers):
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, model has {len(self.model.layers)}")
        if self.model.embed_tokens is not None:
            h, residual = self.model.embed_tokens(batch.input_ids), None
        elif hidden is None:
            raise ValueError(f"pipeline stage {self.groups.pp_rank} needs the previous stage's hidden states")
        else:
            h, residual = hidden
        for i, layer in enumerate(self.model.layers):
            if batch.cancelled is not None and batch.cancelled.is_set():
                raise ForwardCancelled(f"forward pass stopped before layer {self.model.layer_start + i}")
            h, residual = layer(h, residual, batch, kv_cache[i], self.rope_cache)
        if self.lm_head is None:
            return h, residual
        idx = batch.logits_indices                            # norm is per row: select first
        norm = self.model.norm
        h, _ = rms_norm(h[idx], norm.weight, norm.eps, residual[idx])
        return self.lm_head.project(h).float()

    # ---- weights ----------------------------------------------------------------------------
    def wants(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs on this rank (pass as ``iter_weights(want=)``).
        TP ranks read the whole tensor and keep their slice; PP stages skip other stages' tensors."""
        m = _LAYER.match(name)
        if m:
            return self.model.layer_start <= int(m.group(1)) < self.model.layer_end
        if name == "model.embed_tokens.weight":
            return self.model.embed_tokens is not None or (
                self.lm_head is not None and self.config.tie_word_embeddings)
        if name == "model.norm.weight":
            return self.model.norm is not None
        if name == "lm_head.weight":
            return self.lm_head is not None and not self.config.tie_word_embeddings
        return True                                          # unknown names fail in load_weights

    def _local_name(self, name: str) -> str:
        m = _LAYER.match(name)
        if m and self.model.layer_start:
            return f"model.layers.{int(m.group(1)) - self.model.layer_start}.{name[m.end():]}"
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full ``(hf_name, tensor)`` pairs in, each layer keeping this rank's shard;
        tensors of other stages are skipped; raise ``ValueError`` on unknown or missing names."""
        params = dict(self.named_parameters())
        pending = set(params)
        shards = {name: len(mod.output_sizes) for name, mod in self.named_modules()
                  if isinstance(mod, MergedColumnLinear)}
        got_shard: dict[str, set[int]] = {}
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue                                     # tied: the embedding is the head
            if not self.wants(name):
                continue                                     # another stage's tensor
            if (name == "model.embed_tokens.weight" and self.model.embed_tokens is None):
                name = "lm_head.weight"                      # tied head on a later stage
            local = self._local_name(name)
            prefix, _, leaf = local.rpartition(".")           # leaf: weight | bias
            mod_path, _, proj = prefix.rpartition(".")
            if proj in _MERGED:
                merged, index = _MERGED[proj]
                target = f"{mod_path}.{merged}"
                if f"{target}.{leaf}" not in params:
                    raise ValueError(f"unexpected checkpoint weight {name!r}")
                self.get_submodule(target).load_shard(index, leaf, tensor)
                got_shard.setdefault(f"{target}.{leaf}", set()).add(index)
                continue
            if local not in params:
                raise ValueError(f"unexpected checkpoint weight {name!r}")
            module = self.get_submodule(prefix)
            if callable(getattr(module, "load", None)):      # sharded layer: keeps its slice
                module.load(leaf, tensor)
            else:
                load_param(params[local], tensor, name)
            pending.discard(local)
        for name, indices in got_shard.items():
            if len(indices) == shards[name.rpartition(".")[0]]:
                pending.discard(name)
        if pending:
            raise ValueError(f"checkpoint is missing {len(pending)} weights, e.g. {sorted(pending)[:5]}")
