"""Tensor and pipeline parallel engine (gloo ranks on CPU) vs Hugging Face ``transformers``.

Each layout runs in one spawn of ``engine.runtime.spawn.spawn_ranks``: every rank loads its shard
(TP slice of its stage's layers), runs prefill + greedy decode through
``engine.pipeline.PipelineRunner`` and returns its tokens and (last stage) last-position
prefill logits. Checked against ``transformers`` on the same weights: logits within the fp32
bound of ``tests.tolerances`` for the model's reduction length (TP and PP sum in another order
than one process), greedy tokens equal to ``generate(do_sample=False)`` token for token (sound
on any CPU: ``reference_greedy`` checks every step's margin), every rank agreeing. Two tiny random models cover both GQA cases and both head kinds:

- ``llama``: 4 layers, 8 query / 4 kv heads, untied head: TP 2, TP2 x PP2, PP 2 with and
  without micro-batching (one spawn);
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
from engine.parallel import Group, ParallelGroups
from engine.runtime.spawn import RankFailure, spawn_ranks
from engine.pipeline import split_micro_batches
from tests.models import make_tiny_llama
from tests.test_engine_parity import reference_greedy, reference_last_logits
from tests.tolerances import assert_close, model_reduction_length

NEW_TOKENS = 24
PROMPTS = [list(b"The quick brown fox jumps over the lazy dog"), [257, 117, 115, 101, 114, 10, 72],
           list(range(40, 57))]
MODELS = {
    "llama": dict(seed=1, num_hidden_layers=4, num_key_value_heads=4),
    "qwen2": dict(seed=2, family="qwen2", num_hidden_layers=5, num_key_value_heads=2,
                  tie_word_embeddings=True),
}


def _rank_modes(groups, path, prompts, max_new_tokens, modes):
    """On one rank: load the shard once, generate once per micro-batching flag in ``modes``."""
    from engine.loader import load_model
    from engine.pipeline import PipelineRunner

    _, model = load_model(path, groups=groups)
    out = []
    for micro in modes:
        runner = PipelineRunner(model, groups, block_size=8, micro_batching=micro)
        out.append(runner.generate(prompts, max_new_tokens))
    return out


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


def check(results, want_logits, want_tokens, k):
    """Every rank's tokens equal the reference; the last stage's logits are close to it."""
    for per_rank in zip(*results):                  # one mode at a time, all ranks
        for tokens, _ in per_rank:
            assert tokens == want_tokens
        logits = per_rank[-1][1]                     # the last rank is on the last stage
        for got, want in zip(logits, want_logits):
            assert_close(got, want, k=k)


LAYOUTS = [
    ("llama", ParallelConfig(tp=2), (True,)),
    ("llama", ParallelConfig(pp=2), (True, False)),  # micro-batched and stages in turn
    ("llama", ParallelConfig(tp=2, pp=2), (True,)),
    ("qwen2", ParallelConfig(tp=4), (True,)),
    ("qwen2", ParallelConfig(pp=3), (True,)),
]


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model,layout,modes", LAYOUTS,
                         ids=[f"{m}-tp{l.tp}-pp{l.pp}" for m, l, _ in LAYOUTS])
def test_layout_matches_transformers(tiny_models, model, layout, modes):
    path, want_logits, want_tokens, k = tiny_models[model]
    assert any(len(t) >= 16 for t in want_tokens)   # long enough runs to mean something
    results = spawn_ranks(layout, _rank_modes, path, PROMPTS, NEW_TOKENS, modes, timeout_s=240)
    check(results, want_logits, want_tokens, k)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_smollm2_tp3_matches_transformers():
    from engine.loader import load_tokenizer, resolve_model

    source = resolve_model("")
    tok = load_tokenizer(source)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                   add_generation_prompt=True, tokenize=False)
    prompts = [tok.encode(chat), tok.encode("The capital of France is")]
    results = spawn_ranks(ParallelConfig(tp=3), _rank_modes, source, prompts, 8, (True,),
                          timeout_s=240)
    check(results, *reference(source, prompts, 8))


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


@pytest.mark.unit
def test_split_micro_batches():
    assert split_micro_batches(5, 2) == [[0, 1], [2, 3, 4]]
    assert split_micro_batches(2, 4) == [[0], [1]]
    with pytest.raises(ValueError, match="got 0"):
        split_micro_batches(3, 0)


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
