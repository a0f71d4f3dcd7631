"""The model's shape and its paged KV cache: the descriptions every package shares.

Each dataclass validates itself on construction and raises ``ValueError`` quoting the
offending values. Loaders (``engine.source``) build :class:`ModelConfig` from a GGUF file or
a Hugging Face directory; services build :class:`CacheConfig` from their flags; the router and
the KV handoff read both. Importing this module does not import torch (the router reads a
:class:`ModelConfig` without it); only :attr:`ModelConfig.torch_dtype` does. How a parallel
layout splits the model is ``common.layout``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Element formats by their one name -> bytes per element (an int where whole, so byte counts stay
# exact), for weights, activations and the KV cache alike: the engine's --weights-dtype and
# cleave plan's --weight-dtype / --kv-dtype.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
# The formats torch computes in, by torch's name for them -> their name above. ModelConfig.dtype
# (the model and KV cache dtype: --dtype, ModelInfo.dtype, the KV compatibility hash) is one of these.
TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# --weights-dtype values (engine.quant holds the weights; listed here so the router needs no torch)
WEIGHTS_DTYPES = ("fp32", "bf16", "int8", "int4")


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of format ``dtype`` (a :data:`DTYPE_BYTES` name); ValueError listing them."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2; Mixtral later)."""

    architecture: str            # "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int               # query heads
    num_kv_heads: int            # key/value heads (GQA when < num_heads)
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int            # context length: prompt + new tokens must fit
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    dtype: str = "float32"        # model and KV cache dtype, as torch names it (TORCH_DTYPES)
    num_experts: int = 0          # Mixtral-style MoE: experts per layer (0 = dense MLP)
    num_experts_per_tok: int = 0  # top-k experts each token is routed to
    weights_dtype: str = "fp32"   # how linear/embedding weights are held (engine.quant): fp32 = in
                                  # dtype (exact), bf16, int8, int4 (weight-only; MoE experts stay in dtype)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype={self.weights_dtype!r} is not one of {WEIGHTS_DTYPES}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"1..num_experts={self.num_experts}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch
        return getattr(torch, self.dtype)

    def kv_bytes_per_token(self, dtype: str = "") -> float:
        """Bytes of K and V for one token across all layers of the whole model (no TP
        replication), held in format ``dtype`` (a :data:`DTYPE_BYTES` name; "" = :attr:`dtype`):
        an int for whole-byte formats, which the cache is sized by (:meth:`CacheConfig.blocks_for`)."""
        element = dtype_bytes(dtype or TORCH_DTYPES[self.dtype])
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots.

    Layout (one tensor per instance rank, see ``engine.kv_cache``)::

        kv[layer, 0 (K) | 1 (V), block, slot_in_block, kv_head, head_dim]

    A token at position ``p`` of a sequence with block table ``bt`` lives at
    ``block = bt[p // block_size]``, ``slot_in_block = p % block_size``; the flat
    slot index used by ``slot_mapping`` is ``block * block_size + slot_in_block``.
    """

    block_size: int = 16
    num_blocks: int = 0          # 0: derive from memory_bytes
    memory_bytes: int = 1 << 30  # used when num_blocks == 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.num_blocks == 0 and self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive when num_blocks is 0, got {self.memory_bytes}")

    def blocks_for(self, model: ModelConfig) -> int:
        """Number of blocks this config gives for ``model`` (at least 1)."""
        if self.num_blocks:
            return self.num_blocks
        per_block = model.kv_bytes_per_token() * self.block_size
        return max(1, self.memory_bytes // per_block)
