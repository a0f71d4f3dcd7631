"""Memory per GPU of a layout: does it fit, and how much KV room is left.

The fullest GPU of an instance holds its stage's weight shards (+ the embedding on the first
stage, the LM head on the last: ``common.layout.layer_range`` splits the layers), the KV of
every cached token of its layers and KV heads (one whole KV head per rank when TP exceeds the
KV heads; CP ranks keep their own tokens), activations of one pass, plus a reserve (a share of
device memory) that must stay free. Units: bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.model import dtype_bytes
from services.capacity.cost import CostOptions, Layout, decode_micro_batches, kv_heads_per_rank
from services.capacity.hardware import Hardware
from services.capacity.models import ModelSpec


@dataclass
class Memory:
    """Bytes on the fullest GPU of an instance."""

    weights: float
    kv: float
    activations: float
    reserve: float
    capacity: float
    stage: int = 0
    kv_per_token: float = field(default=0.0)   # KV bytes one cached token costs this GPU

    @property
    def used(self) -> float:
        return self.weights + self.kv + self.activations

    @property
    def fits(self) -> bool:
        return self.used + self.reserve <= self.capacity

    @property
    def kv_room_tokens(self) -> int:
        """Cached tokens this GPU could still hold beyond ``kv`` (negative when over)."""
        free = self.capacity - self.reserve - self.weights - self.activations - self.kv
        return int(free // self.kv_per_token) if self.kv_per_token else 0


def stage_weight_bytes(model: ModelSpec, lay: Layout, opt: CostOptions, stage: int) -> float:
    """Weight bytes one GPU of pipeline stage ``stage`` holds (common.layout.layer_range split)."""
    base, extra = divmod(model.num_layers, lay.pp)
    layers = base + (1 if stage < extra else 0)
    h, d = model.hidden_size, model.head_dim
    attn = 2 * h * model.num_heads * d / lay.tp + 2 * h * kv_heads_per_rank(model, lay.tp) * d
    if model.is_moe:
        mlp = model.num_experts / lay.ep * model.expert_params() + h * model.num_experts
    else:
        mlp = 3 * h * model.intermediate_size / lay.tp
    params = layers * (attn + mlp + 2 * h)
    if stage == 0:
        params += model.vocab_size * h
    if stage == lay.pp - 1 and (not model.tie_word_embeddings or lay.pp > 1):
        params += model.vocab_size * h + h
    return params * dtype_bytes(opt.weight_dtype)


def memory_per_gpu(model: ModelSpec, hw: Hardware, lay: Layout, opt: CostOptions, cached_tokens: float,
                   pass_tokens: float) -> Memory:
    """The fullest GPU: weights + KV of ``cached_tokens`` (all sequences) + activations of a
    ``pass_tokens``-token forward, against ``hw.memory_bytes`` less the reserve."""
    best = None
    base, extra = divmod(model.num_layers, lay.pp)
    for stage in range(lay.pp):
        layers = base + (1 if stage < extra else 0)
        per_tok = 2 * layers * kv_heads_per_rank(model, lay.tp) * model.head_dim * dtype_bytes(opt.kv_dtype) / lay.cp
        inter = model.num_experts_per_tok * model.expert_intermediate_size if model.is_moe \
            else model.intermediate_size / lay.tp
        act = pass_tokens / lay.cp * (6 * model.hidden_size + 3 * inter) * hw.act_bytes
        mem = Memory(stage_weight_bytes(model, lay, opt, stage), cached_tokens * per_tok, act,
                     hw.memory_bytes * opt.reserve, hw.memory_bytes, stage, per_tok)
        if best is None or mem.used > best.used:
            best = mem
    return best


def max_decode_batch(model: ModelSpec, hw: Hardware, lay: Layout, opt: CostOptions, tokens_per_seq: float,
                     limit: int = 4096) -> int:
    """The largest power-of-two decode step batch (<= ``limit``) whose sequences, ``micro_batches``
    steps of it in flight with ``tokens_per_seq`` cached tokens each, fit; 0 when none does."""
    m, b = decode_micro_batches(opt, lay), 0
    while 2 * b <= limit if b else True:
        nxt = 2 * b or 1
        if not memory_per_gpu(model, hw, lay, opt, m * nxt * tokens_per_seq, nxt).fits:
            break
        b = nxt
    return b
