"""Model shapes for planning: built-in configs (with sources) or a Hugging Face ``config.json``.

A :class:`ModelSpec` is the part of a model's config the cost model needs, and counts its
parameters and KV bytes. It reads ``config.json`` with ``json`` only (the engine's loader,
``engine.hf_loader``, imports torch and also demands weights and a tokenizer; planning needs
neither). Parameter counts (SwiGLU decoder, GQA):

    attention   h * (n_heads * d) * 2  +  h * (n_kv_heads * d) * 2       q, o  +  k, v
    dense MLP   3 * h * I                                               gate, up, down
    MoE         E * 3 * h * I_e  +  h * E                               experts + router
    embeddings  V * h  (+ V * h for an untied LM head)

KV per token and layer: ``2 * n_kv_heads * d`` elements (K and V).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a weight/KV dtype name; ValueError listing the known names."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer (Llama/Mistral/Qwen dense, Mixtral/Qwen3 MoE).

    ``intermediate``: the dense MLP width; ``moe_intermediate``: one expert's width (MoE models,
    every layer MoE). ``num_experts == 0`` means dense.
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {self.name!r}: {name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model {self.name!r}: heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.num_experts and not (0 < self.top_k <= self.num_experts and self.moe_intermediate > 0):
            raise ValueError(f"model {self.name!r}: MoE needs 0 < top_k={self.top_k} <= num_experts="
                             f"{self.num_experts} and moe_intermediate={self.moe_intermediate} > 0")
        if not self.num_experts and self.intermediate <= 0:
            raise ValueError(f"model {self.name!r}: intermediate must be positive, got {self.intermediate}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def attn_params(self) -> int:
        """q, k, v, o weights of one layer."""
        return 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim

    def expert_params(self) -> int:
        """One expert (gate, up, down); 0 for dense models."""
        return 3 * self.hidden * self.moe_intermediate if self.is_moe else 0

    def mlp_params(self) -> int:
        """Feed-forward weights of one layer (all experts and the router for MoE)."""
        if self.is_moe:
            return self.num_experts * self.expert_params() + self.hidden * self.num_experts
        return 3 * self.hidden * self.intermediate

    def embedding_params(self) -> int:
        """Token embedding plus LM head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def total_params(self) -> int:
        return self.layers * (self.attn_params() + self.mlp_params() + 2 * self.hidden) \
            + self.embedding_params() + self.hidden

    def active_params(self) -> int:
        """Parameters one token passes through (top-k experts for MoE)."""
        mlp = self.top_k * self.expert_params() + self.hidden * self.num_experts if self.is_moe else self.mlp_params()
        return self.layers * (self.attn_params() + mlp) + self.embedding_params()

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        """K and V of one token over all layers, whole model (no replication)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bytes


def _spec(name, source, **kw) -> ModelSpec:
    return ModelSpec(name=name, source=source, **kw)


_LLAMA31 = "config.json of meta-llama/Llama-3.1-{} on huggingface.co (Llama 3 Herd of Models, arXiv:2407.21783, Table 3)"
BUILTIN: dict[str, ModelSpec] = {m.name: m for m in (
    _spec("llama-3.1-8b", _LLAMA31.format("8B"), hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
          intermediate=14336, vocab=128256),
    _spec("llama-3.1-70b", _LLAMA31.format("70B"), hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128,
          intermediate=28672, vocab=128256),
    _spec("llama-3.1-405b", _LLAMA31.format("405B"), hidden=16384, layers=126, heads=128, kv_heads=8,
          head_dim=128, intermediate=53248, vocab=128256),
    _spec("mixtral-8x7b", "config.json of mistralai/Mixtral-8x7B-v0.1 on huggingface.co (arXiv:2401.04088)",
          hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=0, vocab=32000,
          num_experts=8, top_k=2, moe_intermediate=14336),
    _spec("qwen3-30b-a3b", "config.json of Qwen/Qwen3-30B-A3B on huggingface.co (Qwen3 Technical Report, arXiv:2505.09388)",
          hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, intermediate=0, vocab=151936,
          num_experts=128, top_k=8, moe_intermediate=768),
    _spec("qwen3-235b-a22b", "config.json of Qwen/Qwen3-235B-A22B on huggingface.co (arXiv:2505.09388)",
          hidden=4096, layers=94, heads=64, kv_heads=4, head_dim=128, intermediate=0, vocab=151936,
          num_experts=128, top_k=8, moe_intermediate=1536),
    _spec("smollm2-135m", "config.json of HuggingFaceTB/SmolLM2-135M-Instruct (Cleave's embedded default)",
          hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
          tied_embeddings=True),
)}


def from_hf_config(cfg: dict, name: str) -> ModelSpec:
    """A :class:`ModelSpec` from a parsed ``config.json`` (llama, mistral, qwen2/3, mixtral, qwen3_moe).

    MoE keys: ``num_local_experts`` (Mixtral) or ``num_experts`` (Qwen3 MoE), ``num_experts_per_tok``,
    ``moe_intermediate_size`` (Qwen3 MoE; Mixtral's experts use ``intermediate_size``).
    Raises ValueError naming a missing key.
    """
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        inter = int(cfg.get("intermediate_size") or 0)
        return ModelSpec(
            name=name, hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate=0 if experts else inter,
            vocab=int(cfg["vocab_size"]), tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=experts, top_k=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate=int(cfg.get("moe_intermediate_size") or inter) if experts else 0,
            source=f"config.json of {name}")
    except KeyError as exc:
        raise ValueError(f"model config {name!r} lacks the key {exc.args[0]!r}") from None


def get_model(spec: str) -> ModelSpec:
    """A built-in name (see :data:`BUILTIN`), a Hugging Face directory, or a ``config.json`` path."""
    key = spec.strip().lower()
    if key in BUILTIN:
        return BUILTIN[key]
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) "
                         f"nor a directory with a config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or spec
    return from_hf_config(cfg, name)
