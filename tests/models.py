"""Tiny, seeded Hugging Face model directories for tests (no downloads, a second to build).

``make_tiny_llama(path, seed=0, **overrides)`` writes a complete Llama model directory
(``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` with a
ChatML chat template) that ``engine.loader.resolve_model(path)`` accepts and that
``transformers`` loads as the reference. Same seed and overrides -> the same weights.

The tokenizer is byte-level BPE with no merges: every byte is one token (ids 0..255) and the
special tokens follow (``<|endoftext|>`` 256 = bos/pad, ``<|im_start|>`` 257,
``<|im_end|>`` 258 = eos), so any text round-trips and ids stay below any ``vocab_size >= 259``.
"""
from __future__ import annotations

import os

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, IM_START_ID, EOS_ID = 256, 257, 258
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_LLAMA_DEFAULTS = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, intermediate_size=128, max_position_embeddings=512,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    initializer_range=0.1,        # larger than HF's 0.02: peaked logits, no near-ties in argmax
)


def write_byte_tokenizer(path: str) -> None:
    """Save a byte-level tokenizer (``tokenizer.json`` + config, chat template) into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = [c for _, c in sorted((_byte_of(c), c) for c in alphabet)]
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[0], additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHATML_TEMPLATE)
    fast.save_pretrained(path)


def _byte_of(char: str) -> int:
    """GPT-2 byte-level mapping: the byte a printable stand-in character represents."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[char]


def make_tiny_llama(path: str | os.PathLike, seed: int = 0, family: str = "llama", **overrides) -> str:
    """Build and save a random tiny Llama-family causal LM into ``path``; returns the path.

    ``family`` is "llama" (``LlamaConfig``) or "qwen2" (``Qwen2Config``: q/k/v biases).
    ``overrides`` are config fields on top of :data:`TINY_LLAMA_DEFAULTS`
    (e.g. ``num_key_value_heads=2``, ``rope_theta=500000.0``, ``tie_word_embeddings=True``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    families = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if family not in families:
        raise ValueError(f"family={family!r} is not one of {sorted(families)}")
    config_cls, model_cls = families[family]
    path = os.fspath(path)
    fields = {**TINY_LLAMA_DEFAULTS, **overrides}
    if fields["vocab_size"] < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={fields['vocab_size']} cannot hold the 259 tokenizer ids")
    config = config_cls(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=BOS_ID, **fields)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)
    return path
