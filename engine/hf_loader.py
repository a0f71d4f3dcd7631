"""Hugging Face model directories: ``config.json`` -> ModelConfig, ``*.safetensors`` -> weights.

Model types: llama, mistral, qwen2 (dense) and mixtral (``architecture="mixtral"``,
``num_experts`` / ``num_experts_per_tok`` from ``num_local_experts`` / ``num_experts_per_tok``).

Called by ``engine.source`` (the config) and ``engine.loader`` (the weights) only. Weights are
read lazily, tensor by tensor, with ``safetensors.safe_open``; ``want(name)`` skips tensors a
rank does not need (a TP rank will later read only its rows/columns through ``get_slice``).
Reading the config needs no torch (the router does it); the weights come as torch tensors
(``safetensors``' ``pt`` framework).
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Callable, Iterator

from common.model import ModelConfig

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def config_from_dir(path: str) -> ModelConfig:
    cfg = _read_json(os.path.join(path, "config.json"))
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported "
                         f"(supported: {SUPPORTED_MODEL_TYPES})")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise ValueError(f"{path}: {model_type} with attention_bias=true (biases on q/k/v and "
                         f"o_proj) is not supported; only Qwen2's q/k/v biases are")
    gen_path = os.path.join(path, "generation_config.json")
    gen = _read_json(gen_path) if os.path.exists(gen_path) else {}
    eos = _ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id"))
    heads = int(cfg["num_attention_heads"])
    max_pos = int(cfg["max_position_embeddings"])
    window = cfg.get("sliding_window")
    if window and (model_type != "qwen2" or cfg.get("use_sliding_window")):
        max_pos = min(max_pos, int(window))  # no sliding-window attention: cap context instead
    experts, top_k = _experts(cfg, path)
    return ModelConfig(
        architecture="mixtral" if experts else "llama",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rope_theta=_rope_theta(cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=(_ids(cfg.get("bos_token_id")) + _ids(gen.get("bos_token_id")) + [None])[0],
        attention_bias=model_type == "qwen2",   # Qwen2: q/k/v biases, none on o_proj
        num_experts=experts,
        num_experts_per_tok=top_k,
    )


def _experts(cfg: dict, path: str) -> tuple[int, int]:
    """``(num_experts, top_k)`` of a Mixtral config (``num_local_experts``,
    ``num_experts_per_tok``); ``(0, 0)`` for dense models."""
    if cfg.get("model_type") != "mixtral":
        return 0, 0
    experts, top_k = int(cfg.get("num_local_experts") or 0), int(cfg.get("num_experts_per_tok") or 0)
    if experts <= 0 or not 0 < top_k <= experts:
        raise ValueError(f"{path}: mixtral config has num_local_experts={experts}, "
                         f"num_experts_per_tok={top_k} (need 0 < top_k <= experts)")
    return experts, top_k


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def iter_dir_weights(path: str, config: ModelConfig,
                     want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor in config.dtype)``; ``want(hf_name)`` False skips the read."""
    from safetensors import safe_open
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (want is not None and not want(name)):
                    continue
                yield name, f.get_tensor(name).to(config.torch_dtype)
