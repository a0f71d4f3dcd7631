"""Tiny, seeded Mixtral (mixture-of-experts) model directories for tests.

``make_tiny_mixtral(path, seed=0, **overrides)`` is the MoE sibling of
``tests.models.make_tiny_llama``: a complete Hugging Face directory (``config.json``,
``model.safetensors``, ``generation_config.json``, the byte-level tokenizer of
``tests.models.write_byte_tokenizer``) built with ``transformers``' ``MixtralForCausalLM``, which
``engine.loader.resolve_model(path)`` accepts and ``transformers`` loads as the reference.
Same seed and overrides -> the same weights. Head counts divide by 2 and 4; the expert count
(default 8, top-2) divides by 2 and 4 for EP tests.
"""
from __future__ import annotations

import os

import torch

from common.model import ModelConfig
from engine.moe import MoEBlock
from tests.models import BOS_ID, EOS_ID, SPECIAL_TOKENS, write_byte_tokenizer

TINY_MIXTRAL_DEFAULTS = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, intermediate_size=96, max_position_embeddings=512,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
    router_jitter_noise=0.0, output_router_logits=False,
    initializer_range=0.1,        # peaked logits, no near-ties in argmax
)


def make_tiny_mixtral(path: str | os.PathLike, seed: int = 0, hot_experts: dict[int, float] | None = None,
                      **overrides) -> str:
    """Build and save a random tiny Mixtral causal LM into ``path``; returns the path.

    ``overrides`` are ``MixtralConfig`` fields on top of :data:`TINY_MIXTRAL_DEFAULTS`
    (e.g. ``num_local_experts=4``, ``num_experts_per_tok=1``). ``hot_experts`` ``{expert:
    bias}`` skews routing (see :func:`_bias_router`): e.g. ``{6: 0.5, 7: 0.3}`` sends most
    tokens to experts 6 and 7 in every layer, which the default EP split puts on one rank.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    path = os.fspath(path)
    fields = {**TINY_MIXTRAL_DEFAULTS, **overrides}
    if fields["vocab_size"] < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={fields['vocab_size']} cannot hold the 259 tokenizer ids")
    config = MixtralConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=BOS_ID, **fields)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    if hot_experts:
        _bias_router(model, hot_experts)
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)
    return path


def _bias_router(model, hot_experts: dict[int, float]) -> None:
    """Make every token prefer the ``hot_experts`` while the text stays varied: hidden
    dimension 0 becomes a routing-only channel. Every token embedding holds 1.0 there and no
    layer writes to it (row 0 of o_proj and of every expert's down projection is zeroed) or
    reads it (column 0 of q/k/v, of the experts' gate/up projections and of the LM head is
    zeroed), so the residual stream keeps exactly 1.0 in it. The MoE input norm scales it by 8
    (``post_attention_layernorm.weight[0]``): each router sees ``8 / rms(residual)`` there,
    and router row ``e`` gets ``bias`` on it, raising expert ``e``'s logit in proportion."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[:, 0] = 0.0
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.experts.gate_up_proj[:, :, 0] = 0.0
            layer.mlp.experts.down_proj[:, 0, :] = 0.0
            layer.post_attention_layernorm.weight[0] = 8.0
            gate = layer.mlp.gate.weight
            gate[:, 0] = 0.0
            for e, bias in hot_experts.items():
                gate[e, 0] = bias


def write_tiny_mixtral_gguf(hf_dir: str, out_path: str) -> str:
    """Convert a :func:`make_tiny_mixtral` directory into an F32 GGUF file the way llama.cpp
    does for Mixtral (architecture "llama", ``expert_count``, q/k rows permuted for interleaved
    rope, experts stacked as ``ffn_{gate,up,down}_exps``). No tokenizer: ``llama.vocab_size``."""
    import json

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(hf_dir, "config.json"), encoding="utf-8"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(out_path, "llama")
    for add, value in [(w.add_block_count, cfg["num_hidden_layers"]),
                       (w.add_context_length, cfg["max_position_embeddings"]),
                       (w.add_embedding_length, cfg["hidden_size"]),
                       (w.add_feed_forward_length, cfg["intermediate_size"]),
                       (w.add_head_count, heads), (w.add_head_count_kv, kv_heads),
                       (w.add_layer_norm_rms_eps, cfg["rms_norm_eps"]),
                       (w.add_rope_freq_base, cfg["rope_parameters"]["rope_theta"]),
                       (w.add_vocab_size, cfg["vocab_size"]),
                       (w.add_expert_count, cfg["num_local_experts"]),
                       (w.add_expert_used_count, cfg["num_experts_per_tok"]),
                       (w.add_bos_token_id, BOS_ID), (w.add_eos_token_id, EOS_ID)]:
        add(value)
    state = {k: v.numpy() for k, v in load_file(os.path.join(hf_dir, "model.safetensors")).items()}

    def permute(x, n):                                    # llama.cpp's rope row permutation
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "block_sparse_moe.gate": "ffn_gate_inp"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for ours, theirs in per_layer.items():
            tensors[f"blk.{i}.{theirs}.weight"] = state[f"{p}{ours}.weight"]
        tensors[f"blk.{i}.attn_q.weight"] = permute(state[f"{p}self_attn.q_proj.weight"], heads)
        tensors[f"blk.{i}.attn_k.weight"] = permute(state[f"{p}self_attn.k_proj.weight"], kv_heads)
        for proj, name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            tensors[f"blk.{i}.{name}.weight"] = np.stack(
                [state[f"{p}block_sparse_moe.experts.{j}.{proj}.weight"] for j in range(cfg["num_local_experts"])])
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


# ---- one MoE block (tests/engine/test_moe.py, tests/engine/test_eplb.py) ------------------------

HIDDEN, INTER, EXPERTS, TOP_K = 64, 96, 8, 2
BLOCK_K = 2 * HIDDEN + INTER + TOP_K    # router and gate/up (hidden), down (intermediate), top-k sum


def block_config(**kw) -> ModelConfig:
    base = dict(architecture="mixtral", vocab_size=384, hidden_size=HIDDEN, num_layers=1, num_heads=8,
                num_kv_heads=4, head_dim=8, intermediate_size=INTER, rope_theta=1e4, rms_norm_eps=1e-5,
                max_position=64, tie_word_embeddings=False, num_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return ModelConfig(**{**base, **kw})


def hf_block(seed: int = 0):
    """A ``transformers`` MixtralSparseMoeBlock with seeded weights (std 0.1)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS,
                        num_experts_per_tok=TOP_K, router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return block


def per_expert_state(block) -> dict[str, torch.Tensor]:
    """The block's weights under the saved-checkpoint names (``block_sparse_moe.<suffix>``)."""
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    state = {"gate.weight": block.gate.weight.detach().clone()}
    for j in range(EXPERTS):
        state[f"experts.{j}.w1.weight"] = gate_up[j, :INTER].clone()
        state[f"experts.{j}.w3.weight"] = gate_up[j, INTER:].clone()
        state[f"experts.{j}.w2.weight"] = down[j].clone()
    return state


def our_block(state, groups=None) -> MoEBlock:
    block = MoEBlock(block_config(), groups, layer_index=0)
    for suffix, tensor in state.items():
        block.load_weight(suffix, tensor)
    if block.missing_weights():
        raise ValueError(f"missing {block.missing_weights()}")
    return block


def stacked_block(ref) -> MoEBlock:
    """Our block loaded from ``transformers``' stacked expert tensors."""
    return our_block({"gate.weight": ref.gate.weight.detach(),
                      "experts.gate_up_proj": ref.experts.gate_up_proj.detach(),
                      "experts.down_proj": ref.experts.down_proj.detach()})
