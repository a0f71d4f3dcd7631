"""Models to plan for: built-in configs (with sources) or a Hugging Face ``config.json``.

A :class:`ModelSpec` is the engine's model shape, :class:`common.model.ModelConfig` (the same
heads, layers, KV bytes per token and split rules the engine uses), with a name, where its
figures come from, and its parameter counts. ``config.json`` is read here (the engine's loaders
refuse the models the engine cannot run, such as Qwen3 MoE or scaled rope, and want weights and a
tokenizer; planning needs none of that). Parameter counts (SwiGLU decoder, GQA):

    attention   h * (n_heads * d) * 2  +  h * (n_kv_heads * d) * 2       q, o  +  k, v
    dense MLP   3 * h * I                                               gate, up, down
    MoE         E * 3 * h * I_e  +  h * E                               experts + router
    embeddings  V * h  (+ V * h for an untied LM head)

KV per token and layer: ``2 * n_kv_heads * d`` elements (K and V): ``ModelConfig.kv_bytes_per_token``.
Element formats and their bytes are ``common.model.DTYPE_BYTES``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from common.model import ModelConfig


@dataclass(frozen=True)
class ModelSpec(ModelConfig):
    """A decoder-only transformer to plan for (Llama/Mistral/Qwen dense, Mixtral/Qwen3 MoE, every
    layer MoE when ``num_experts`` > 0): its shape as the engine describes it, its name and source.

    ``moe_intermediate_size``: one expert's width where it differs from ``intermediate_size``
    (Qwen3 MoE); 0 = ``intermediate_size``, as in Mixtral.
    """

    name: str = ""
    source: str = ""
    moe_intermediate_size: int = 0

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise ValueError(f"model {self.name!r}: {exc}") from None
        if self.moe_intermediate_size < 0:
            raise ValueError(f"model {self.name!r}: moe_intermediate_size must be >= 0, "
                             f"got {self.moe_intermediate_size}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_intermediate_size(self) -> int:
        """One expert's MLP width (MoE models)."""
        return self.moe_intermediate_size or self.intermediate_size

    def attn_params(self) -> int:
        """q, k, v, o weights of one layer."""
        return 2 * self.hidden_size * self.head_dim * (self.num_heads + self.num_kv_heads)

    def expert_params(self) -> int:
        """One expert (gate, up, down); 0 for dense models."""
        return 3 * self.hidden_size * self.expert_intermediate_size if self.is_moe else 0

    def mlp_params(self) -> int:
        """Feed-forward weights of one layer (all experts and the router for MoE)."""
        if self.is_moe:
            return self.num_experts * self.expert_params() + self.hidden_size * self.num_experts
        return 3 * self.hidden_size * self.intermediate_size

    def embedding_params(self) -> int:
        """Token embedding plus LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def total_params(self) -> int:
        return self.num_layers * (self.attn_params() + self.mlp_params() + 2 * self.hidden_size) \
            + self.embedding_params() + self.hidden_size

    def active_params(self) -> int:
        """Parameters one token passes through (top-k experts for MoE)."""
        mlp = self.num_experts_per_tok * self.expert_params() + self.hidden_size * self.num_experts \
            if self.is_moe else self.mlp_params()
        return self.num_layers * (self.attn_params() + mlp) + self.embedding_params()


def model_spec(name: str, source: str = "", **shape) -> ModelSpec:
    """A :class:`ModelSpec` from ``ModelConfig``'s field names; the fields the plan does not read
    (rope, norm epsilon, context length, tied embeddings) default to ``transformers``' Llama defaults."""
    shape = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position": 2048, "tie_word_embeddings": False,
             **shape}
    return ModelSpec(architecture="mixtral" if shape.get("num_experts") else "llama", name=name, source=source,
                     **shape)


_LLAMA31 = "config.json of meta-llama/Llama-3.1-{} on huggingface.co (Llama 3 Herd of Models, arXiv:2407.21783, Table 3)"
_LLAMA31_REST = dict(num_kv_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                     max_position=131072, tie_word_embeddings=False)
_QWEN3_MOE_REST = dict(num_kv_heads=4, head_dim=128, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position=40960, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8)
BUILTIN: dict[str, ModelSpec] = {m.name: m for m in (
    model_spec("llama-3.1-8b", _LLAMA31.format("8B"), hidden_size=4096, num_layers=32, num_heads=32,
               intermediate_size=14336, **_LLAMA31_REST),
    model_spec("llama-3.1-70b", _LLAMA31.format("70B"), hidden_size=8192, num_layers=80, num_heads=64,
               intermediate_size=28672, **_LLAMA31_REST),
    model_spec("llama-3.1-405b", _LLAMA31.format("405B"), hidden_size=16384, num_layers=126, num_heads=128,
               intermediate_size=53248, **_LLAMA31_REST),
    model_spec("mixtral-8x7b", "config.json of mistralai/Mixtral-8x7B-v0.1 on huggingface.co (arXiv:2401.04088)",
               hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
               vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5, max_position=32768, tie_word_embeddings=False,
               num_experts=8, num_experts_per_tok=2),
    model_spec("qwen3-30b-a3b",
               "config.json of Qwen/Qwen3-30B-A3B on huggingface.co (Qwen3 Technical Report, arXiv:2505.09388)",
               hidden_size=2048, num_layers=48, num_heads=32, intermediate_size=6144, moe_intermediate_size=768,
               **_QWEN3_MOE_REST),
    model_spec("qwen3-235b-a22b", "config.json of Qwen/Qwen3-235B-A22B on huggingface.co (arXiv:2505.09388)",
               hidden_size=4096, num_layers=94, num_heads=64, intermediate_size=12288, moe_intermediate_size=1536,
               **_QWEN3_MOE_REST),
    model_spec("smollm2-135m", "config.json of HuggingFaceTB/SmolLM2-135M-Instruct (Cleave's embedded default)",
               hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
               vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, max_position=8192, tie_word_embeddings=True),
)}


def from_hf_config(cfg: dict, name: str) -> ModelSpec:
    """A :class:`ModelSpec` from a parsed ``config.json`` (llama, mistral, qwen2/3, mixtral, qwen3_moe).

    MoE keys: ``num_local_experts`` (Mixtral) or ``num_experts`` (Qwen3 MoE), ``num_experts_per_tok``,
    ``moe_intermediate_size`` (Qwen3 MoE; Mixtral's experts use ``intermediate_size``). Raises
    ValueError naming a missing key.
    """
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        inter = int(cfg.get("intermediate_size") or 0)
        moe_inter = int(cfg.get("moe_intermediate_size") or 0) if experts else 0
        given = {field: kind(cfg[key]) for field, key, kind in (          # else model_spec()'s defaults
            ("rope_theta", "rope_theta", float), ("rms_norm_eps", "rms_norm_eps", float),
            ("max_position", "max_position_embeddings", int)) if cfg.get(key)}
        return model_spec(
            name, f"config.json of {name}", hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate_size=inter or moe_inter,
            vocab_size=int(cfg["vocab_size"]), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=experts, num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=moe_inter, **given)
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
