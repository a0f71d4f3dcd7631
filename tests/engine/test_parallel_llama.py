"""Tensor and pipeline parallel engine (gloo ranks on CPU) vs Hugging Face ``transformers``.

Each layout runs in one ``engine.llm_engine.LLMEngine`` (the serving path: the local executor
spawns the layout's ranks, each loads its shard, the TP slice of its stage's layers; prefill
through ``Executor.prefill``, decode through the decode scheduler, PP decode batches as
micro-batches), which returns the greedy tokens and the last-position prefill logits. Checked
against ``transformers`` on the same weights: logits within the fp32 bound of
``tests.tolerances`` for the model's reduction length (TP and PP sum in another order than one
process), greedy tokens equal to ``generate(do_sample=False)`` token for token (sound on any
CPU: ``reference_greedy`` checks every step's margin). Two tiny random models cover both GQA
cases and both head kinds:

- ``llama``: 4 layers, 8 query / 4 kv heads, untied head: TP 2, PP 2, TP2 x PP2;
- ``qwen2``: 5 layers, 8 query / 2 kv heads, q/k/v biases, tied embeddings: TP 4 (kv heads
  replicated), PP 3 (uneven 2/2/1, the tied head on a stage without the embedding).

Plus SmolLM2 (GGUF) with TP 3, layout validation and a dying rank.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from common.layout import ParallelConfig
from common.model import ModelConfig
from engine.llm_engine import LLMEngine
from engine.parallel import Group, ParallelGroups
from engine.runtime.spawn import RankFailure, spawn_ranks
from tests.models import make_tiny_llama
from tests.parity import engine_config, reference_greedy, reference_last_logits
from tests.tolerances import assert_close, model_reduction_length

NEW_TOKENS = 24
PROMPTS = [list(b"The quick brown fox jumps over the lazy dog"), [257, 117, 115, 101, 114, 10, 72],
           list(range(40, 57))]
MODELS = {
    "llama": dict(seed=1, num_hidden_layers=4, num_key_value_heads=4),
    "qwen2": dict(seed=2, family="qwen2", num_hidden_layers=5, num_key_value_heads=2,
                  tie_word_embeddings=True),
}


def generate(source, layout: ParallelConfig, prompts, max_new_tokens):
    """``(greedy tokens, last-position prefill logits)`` of ``prompts`` on ``layout``'s ranks."""
    with LLMEngine(engine_config(source, block_size=8, parallel=layout, threads=1)) as engine:
        return engine.generate(prompts, max_new_tokens, return_logits=True)


def reference(path, prompts, n):
    """transformers' last-position logits and greedy tokens, each prompt alone, and the
    reduction length ``k`` that bounds the logits' rounding (the longest prompt's)."""
    from engine.loader import load_reference_model

    ref = load_reference_model(path)
    logits = torch.stack([reference_last_logits(ref, p) for p in prompts])
    k = model_reduction_length(ref.config, max(map(len, prompts)))
    return logits, [reference_greedy(ref, p, n) for p in prompts], k


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    built = {}
    for name, kw in MODELS.items():
        kw = dict(kw)
        path = make_tiny_llama(tmp_path_factory.mktemp(name), seed=kw.pop("seed"), **kw)
        built[name] = (path, *reference(path, PROMPTS, NEW_TOKENS))
    return built


def check(got, want_logits, want_tokens, k):
    """The tokens equal the reference; the prefill logits are close to it."""
    tokens, logits = got
    assert tokens == want_tokens
    for g, w in zip(logits, want_logits):
        assert_close(g, w, k=k)


LAYOUTS = [
    ("llama", ParallelConfig(tp=2)),
    ("llama", ParallelConfig(pp=2)),
    ("llama", ParallelConfig(tp=2, pp=2)),
    ("qwen2", ParallelConfig(tp=4)),
    ("qwen2", ParallelConfig(pp=3)),
]


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model,layout", LAYOUTS, ids=[f"{m}-tp{l.tp}-pp{l.pp}" for m, l in LAYOUTS])
def test_layout_matches_transformers(tiny_models, model, layout):
    path, want_logits, want_tokens, k = tiny_models[model]
    assert any(len(t) >= 16 for t in want_tokens)   # long enough runs to mean something
    check(generate(path, layout, PROMPTS, NEW_TOKENS), want_logits, want_tokens, k)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_smollm2_tp3_matches_transformers():
    from engine.loader import load_tokenizer, resolve_model

    source = resolve_model("")
    tok = load_tokenizer(source)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                   add_generation_prompt=True, tokenize=False)
    prompts = [tok.encode(chat), tok.encode("The capital of France is")]
    check(generate("smollm2", ParallelConfig(tp=3), prompts, 8), *reference(source, prompts, 8))


def _groups(layout: ParallelConfig) -> ParallelGroups:
    """Rank 0's groups of ``layout`` without torch.distributed (enough to build a model)."""
    def g(n):
        return Group(tuple(range(n)), 0)
    return ParallelGroups(layout, 0, g(layout.tp), g(layout.pp), g(layout.cp), g(layout.ep))


@pytest.mark.unit
def test_layout_the_model_cannot_take_raises():
    from engine.model import LlamaForCausalLM

    config = ModelConfig("llama", vocab_size=300, hidden_size=64, num_layers=4, num_heads=8,
                         num_kv_heads=4, head_dim=8, intermediate_size=96, rope_theta=1e4,
                         rms_norm_eps=1e-5, max_position=64, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tp=3 does not divide the 8 attention heads"):
        LlamaForCausalLM(config, _groups(ParallelConfig(tp=3)))
    with pytest.raises(ValueError, match="pp=5 stages is more than the model's 4 layers"):
        LlamaForCausalLM(config, _groups(ParallelConfig(pp=5)))
    with pytest.raises(ValueError, match="tp=4 does not divide intermediate_size=90"):
        LlamaForCausalLM(config.replace(intermediate_size=90), _groups(ParallelConfig(tp=4)))
    stage = LlamaForCausalLM(config, _groups(ParallelConfig(tp=4, pp=2)))   # shapes of rank 0
    attn = stage.model.layers[0].self_attn
    assert (len(stage.model.layers), attn.num_heads, attn.num_kv_heads) == (2, 2, 1)
    assert stage.lm_head is None and stage.model.norm is None
    assert stage.wants("model.layers.1.mlp.up_proj.weight")
    assert not stage.wants("model.layers.2.mlp.up_proj.weight") and not stage.wants("lm_head.weight")


def _die_mid_pipeline(groups):
    """Rank 1 exits abruptly while rank 0 waits on it for activations."""
    if groups.pp_rank == 1:
        time.sleep(0.5)
        os._exit(3)
    return groups.pp.recv(torch.empty(4), 1)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_dead_rank_ends_the_instance():
    start = time.time()
    # either the parent sees rank 1 die first, or rank 0's receive fails on the lost peer
    with pytest.raises(RankFailure, match="rank 1 .*died|rank 0 failed.*(closed|reset)"):
        spawn_ranks(ParallelConfig(pp=2), _die_mid_pipeline, timeout_s=60)
    assert time.time() - start < 30
