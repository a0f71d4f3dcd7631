"""``--fake-engine`` (the serving-path benchmark's engine): the fake model in the served model's
shape, exact for large vocabularies, and a worker built from the flag alone."""
import random

import pytest

from common.flags import replace
from engine.runtime.config import RuntimeConfig
from engine.runtime.fake import FakeExecutor, tiny_config
from engine.scheduler import DecodeScheduler, Sequence
from engine.block_manager import BlockManager
from engine.sampler import SamplingConfig
from engine.source import DEFAULT_MODEL_ID


def test_the_flag_is_one_rank_only():
    with pytest.raises(ValueError, match="--fake-engine runs one rank"):
        replace(RuntimeConfig(), fake_engine=True, tp=2)


def test_a_worker_on_the_flag_serves_the_default_models_shape_without_weights():
    from services.config import WorkerConfig
    from services.worker import WorkerHost
    cfg = replace(WorkerConfig(pool="decode"), fake_engine=True, transport="tcp", num_blocks=64)
    host = WorkerHost(cfg)
    try:
        assert isinstance(host.executor, FakeExecutor)
        assert host.model_id == DEFAULT_MODEL_ID
        assert host.model_config.vocab_size == 49152 and host.model_config.num_layers == 30
    finally:
        host.executor.close()


def test_decode_over_long_contexts_of_large_ids_is_exact():
    """Context sums past 2**24 (float32's exact integers): the fake must still be exact."""
    vocab, bs = 49152, 16
    cfg = replace(RuntimeConfig(), transport="tcp", num_blocks=200, block_size=bs)
    ex = FakeExecutor(cfg, model_config=tiny_config(vocab=vocab))
    try:
        blocks = BlockManager(ex.num_blocks, bs, b"root", prefix_cache=False)
        rng = random.Random(3)
        prompts = [[rng.randrange(vocab - 200, vocab) for _ in range(n)] for n in (500, 37, 400)]
        got = {i: [] for i in range(len(prompts))}
        sched = DecodeScheduler(ex.forward, blocks, max_batch=8,
                                prefill_fn=lambda t, table, c: ex.prefill(t, table, num_cached=c))
        for i, p in enumerate(prompts):
            blocks.allocate(f"s{i}", None, len(p) + 1)
            sched.add(Sequence(seq_id=f"s{i}", tokens=list(p), num_cached=0, prefilling=True, generated=0,
                               max_tokens=6, sampling=SamplingConfig(), eos_token_ids=frozenset(),
                               ignore_eos=True, emit=lambda t, r, lp, i=i: got[i].append(t) if t is not None
                               else None, release=lambda: None))
        for _ in range(20):                  # a prefill step and 5 decode steps are enough
            sched.step()
        for i, p in enumerate(prompts):
            assert sum(p) > 2 ** 24 or i == 1
            assert got[i] == FakeExecutor.expected(p, 6, vocab)
    finally:
        ex.close()
