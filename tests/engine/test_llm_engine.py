"""The in-process engine (``engine.llm_engine.LLMEngine``) on one rank: requests, steps, outputs.

Its tokens against ``transformers`` are checked in ``tests/engine/test_parity.py`` (one rank),
``tests/engine/test_parallel_llama.py`` (TP, PP, TP x PP), ``tests/engine/test_moe.py`` (EP) and
``tests/engine/test_quant.py`` (quantized weights); here the API around them: a step prefills every
waiting request or decodes every running one, each request ends by EOS or length, its blocks
return to the block manager (held by nobody, cached), and requests added between steps join the running batch.
"""
from __future__ import annotations

import pytest

from engine.llm_engine import LLMEngine
from engine.sampler import SamplingConfig
from engine.scheduler import FINISH_LENGTH, FINISH_STOP
from tests.parity import engine_config

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    with LLMEngine(engine_config(tiny_llama_dir, block_size=8, num_blocks=64)) as e:
        yield e


def test_steps_prefill_then_decode_and_free_every_block(engine):
    free = engine.blocks.available_blocks
    a = engine.add_request([5, 6, 7], max_tokens=3, ignore_eos=True)
    first = engine.step()                                   # the prefill: token 1 of each
    assert [(o.request_id, len(o.new_tokens), o.finished) for o in first] == [(a, 1, None)]
    assert engine.blocks.available_blocks < free
    b = engine.add_request(list(range(20, 37)), max_tokens=1, ignore_eos=True)
    assert [(o.request_id, o.finished) for o in engine.step()] == [(b, FINISH_LENGTH)]   # prefill only
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [len(o.new_tokens) for o in outs] == [1, 1] and outs[-1].finished == FINISH_LENGTH
    assert engine.blocks.available_blocks == free and engine.blocks.used_blocks == 0
    tokens = first[0].new_tokens + [t for o in outs for t in o.new_tokens]
    assert engine.generate([[5, 6, 7]], 3, ignore_eos=True) == [tokens]   # alone or joined: the same


def test_eos_ends_a_request_and_batches_equal_alone(engine):
    prompts = [[5, 6, 7], list(range(40, 57)), [9]]
    alone = [engine.generate([p], 6, ignore_eos=True)[0] for p in prompts]
    assert engine.generate(prompts, 6, ignore_eos=True) == alone
    stop = alone[1][2]                                      # make its third token an EOS
    rid = engine.add_request(prompts[1], max_tokens=6, eos_token_ids=[stop])
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert [t for o in outs for t in o.new_tokens] == alone[1][:alone[1].index(stop) + 1]
    assert outs[-1].finished == FINISH_STOP


def test_seeded_sampling_is_reproducible_and_logits_come_back(engine):
    sampling = SamplingConfig(temperature=0.8, top_k=20, seed=7)
    one = engine.generate([[5, 6, 7], [8, 9]], 5, sampling=sampling, ignore_eos=True)
    tokens, logits = engine.generate([[5, 6, 7], [8, 9]], 5, sampling=sampling, ignore_eos=True,
                                     return_logits=True)
    assert tokens == one and logits.shape == (2, engine.model_config.vocab_size)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([1], max_tokens=0)
    with pytest.raises(ValueError, match="exceeds the context length"):
        engine.add_request([1] * engine.model_config.max_position, max_tokens=1)
