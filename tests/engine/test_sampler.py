"""Sampling rules and per-request reproducibility (engine/sampler.py)."""
from __future__ import annotations

import pytest
import torch

from cleave.v1.inference_pb2 import SamplingParams
from engine.sampler import SamplingConfig, sample_batch, sample_one, step_seed

pytestmark = pytest.mark.unit

VOCAB = 32


def _logits(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_greedy_is_argmax():
    for s in range(10):
        logits = _logits(s)
        assert sample_one(logits, SamplingConfig(), index=s) == int(torch.argmax(logits))


def test_top_k_one_is_greedy_even_when_hot():
    for s in range(10):
        logits = _logits(s)
        cfg = SamplingConfig(temperature=5.0, top_k=1, seed=s)
        assert cfg.greedy
        assert sample_one(logits, cfg, index=3) == int(torch.argmax(logits))


def test_same_seed_and_index_gives_same_token():
    logits = torch.zeros(VOCAB)  # uniform: the draw alone decides
    cfg = SamplingConfig(temperature=1.0, seed=1234)
    for index in range(5):
        first = sample_one(logits, cfg, index)
        assert all(sample_one(logits, cfg, index) == first for _ in range(3))
        assert sample_one(logits.clone(), SamplingConfig(temperature=1.0, seed=1234), index) == first


def test_different_indices_and_seeds_draw_independently():
    logits = torch.zeros(VOCAB)
    cfg = SamplingConfig(temperature=1.0, seed=7)
    by_index = [sample_one(logits, cfg, i) for i in range(64)]
    # a uniform draw over 32 tokens repeated for 64 indices would hit one value each time if
    # the index were ignored
    assert len(set(by_index)) > 10
    by_seed = [sample_one(logits, SamplingConfig(temperature=1.0, seed=s), 0) for s in range(64)]
    assert len(set(by_seed)) > 10
    assert len({step_seed(7, i) for i in range(1000)}) == 1000
    assert all(0 <= step_seed(s, i) < 2 ** 63 for s in (0, 1, 2 ** 64 - 1) for i in (0, 5, 10 ** 9))


def test_top_k_never_samples_outside_top_k():
    logits = _logits(3)
    k = 5
    allowed = set(torch.topk(logits, k).indices.tolist())
    seen = set()
    for s in range(300):
        tok = sample_one(logits, SamplingConfig(temperature=3.0, top_k=k, seed=s), index=s % 7)
        assert tok in allowed
        seen.add(tok)
    assert len(seen) >= 3  # high temperature spreads draws over the allowed set


def test_top_p_never_samples_outside_nucleus():
    # probabilities 0.5, 0.25, 0.125, ... : the nucleus for top_p=0.7 is the first two tokens
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = probs.log()[torch.tensor([3, 0, 4, 1, 2])]  # shuffle the order of the vocabulary
    # token ids of prob 0.5 and 0.25 after the shuffle: positions 1 and 3
    seen = set()
    for s in range(300):
        tok = sample_one(logits, SamplingConfig(temperature=1.0, top_p=0.7, seed=s), index=0)
        assert tok in {1, 3}
        seen.add(tok)
    assert seen == {1, 3}
    # a tiny top_p still keeps the single most likely token
    for s in range(50):
        assert sample_one(logits, SamplingConfig(temperature=1.0, top_p=0.01, seed=s), 0) == 1


def test_top_p_on_random_logits_stays_in_nucleus():
    for case in range(5):
        logits = _logits(100 + case)
        top_p = 0.6
        probs = torch.softmax(logits, -1)
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]
        nucleus = set(order[before < top_p].tolist())
        for s in range(100):
            assert sample_one(logits, SamplingConfig(temperature=1.0, top_p=top_p, seed=s), s) in nucleus


def test_top_k_and_top_p_combined():
    logits = _logits(9)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    for s in range(100):
        assert sample_one(logits, SamplingConfig(temperature=2.0, top_k=3, top_p=0.95, seed=s), 0) in allowed


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0, got -0.1"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(top_p=1.5), r"top_p must be in \[0, 1\], got 1.5"),
    (dict(top_p=-0.5), r"top_p must be in \[0, 1\], got -0.5"),
    (dict(top_k=-1), "top_k must be >= 0, got -1"),
])
def test_validation_errors_quote_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("top_p,expected", [(0.0, 1.0), (1.0, 1.0), (0.5, 0.5)])
def test_from_proto_maps_top_p_off(top_p, expected):
    cfg = SamplingConfig.from_proto(SamplingParams(temperature=0.5, top_p=top_p, top_k=4), seed=99)
    assert cfg.top_p == pytest.approx(expected)
    assert cfg.temperature == pytest.approx(0.5)
    assert cfg.top_k == 4
    assert cfg.seed == 99
    assert not cfg.greedy


def test_from_proto_default_is_greedy():
    assert SamplingConfig.from_proto(SamplingParams(), seed=0).greedy


def test_sample_batch_rows_independent_of_batch_composition():
    rows = torch.stack([_logits(s) for s in range(6)])
    cfgs = [SamplingConfig(), SamplingConfig(temperature=1.0, seed=11), SamplingConfig(temperature=0.7, top_k=4, seed=5),
            SamplingConfig(temperature=1.3, top_p=0.8, seed=2), SamplingConfig(), SamplingConfig(temperature=2.0, seed=11)]
    indices = [0, 3, 1, 7, 2, 3]
    batched = sample_batch(rows, cfgs, indices)
    alone = [sample_batch(rows[i:i + 1], [cfgs[i]], [indices[i]])[0] for i in range(6)]
    assert batched == alone
    assert batched == [sample_one(rows[i], cfgs[i], indices[i]) for i in range(6)]
    # reordering the batch permutes the output and nothing else
    perm = [5, 2, 0, 4, 1, 3]
    shuffled = sample_batch(rows[perm], [cfgs[i] for i in perm], [indices[i] for i in perm])
    assert shuffled == [batched[i] for i in perm]
    assert batched[0] == int(torch.argmax(rows[0])) and batched[4] == int(torch.argmax(rows[4]))
    assert all(isinstance(t, int) for t in batched)


# ---- numerics: nothing a client may send overflows to NaN (issue: sampling numerics) ---------

def _wide_logits(vocab=49152, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, generator=g) * 8).to(dtype)


@pytest.mark.parametrize("temperature", [6.2e-38, 1e-38, 1.4e-45, 1e-6, 1e-300])
def test_tiny_temperatures_sample_the_greedy_token(temperature):
    logits = _wide_logits()
    cfg = SamplingConfig(temperature=temperature, seed=1)
    assert [sample_one(logits, cfg, i) for i in range(4)] == [int(torch.argmax(logits))] * 4


@pytest.mark.parametrize("top_p", [1e-9, 1e-30, 1.4e-45])
def test_tiny_top_p_keeps_the_most_likely_token(top_p):
    logits = _wide_logits(seed=2)
    assert sample_one(logits, SamplingConfig(temperature=1.0, top_p=top_p, seed=3), 0) == int(torch.argmax(logits))


def test_top_k_above_the_vocabulary_keeps_every_token():
    logits = torch.zeros(8)
    drawn = {sample_one(logits, SamplingConfig(temperature=1.0, top_k=2**32 - 1, seed=s), 0) for s in range(200)}
    assert drawn == set(range(8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_sample_like_fp32(dtype):
    logits = _wide_logits(dtype=dtype, seed=4)
    for cfg in (SamplingConfig(), SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, seed=9)):
        assert sample_one(logits, cfg, 5) == sample_one(logits.float(), cfg, 5)


def test_huge_logits_do_not_overflow():
    logits = torch.tensor([3e38, -3e38, 1e38, float("-inf")])
    assert sample_one(logits, SamplingConfig(temperature=1e-3, seed=1), 0) == 0
    assert sample_one(logits, SamplingConfig(temperature=1e30, seed=1), 0) in (0, 1, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logits_fail_that_row_only(bad):
    from engine.sampler import SamplingError
    logits = _wide_logits(vocab=64).repeat(3, 1)
    logits[1, 7] = bad
    cfgs = [SamplingConfig(), SamplingConfig(), SamplingConfig(temperature=0.8, seed=2)]
    out = sample_batch(logits, cfgs, [0, 0, 0])
    assert isinstance(out[1], SamplingError) and "NaN or +inf" in str(out[1])
    assert out[0] == int(torch.argmax(logits[0]))
    assert out[2] == sample_one(logits[2], cfgs[2], 0)
    with pytest.raises(SamplingError):
        sample_one(logits[1], SamplingConfig(), 0)


def test_all_masked_row_is_a_sampling_error():
    from engine.sampler import SamplingError
    with pytest.raises(SamplingError, match="no token to sample"):
        sample_one(torch.full((5,), float("-inf")), SamplingConfig(temperature=1.0), 0)


def test_seeded_sampling_stays_reproducible_at_any_temperature():
    logits = _wide_logits(seed=5)
    for t in (1e-20, 0.5, 2.0, 1e20):
        cfg = SamplingConfig(temperature=t, seed=77)
        assert [sample_one(logits, cfg, i) for i in range(5)] == [sample_one(logits, cfg, i) for i in range(5)]


# ---- reduced steps (StepLogits): greedy rows never carry their whole logits (issue 25) -------

def _reduced_case():
    rows = torch.stack([_wide_logits(vocab=64, seed=s) for s in range(6)])
    rows[2, 9] = float("nan")                       # a greedy row that cannot be sampled
    rows[4] = float("-inf")                         # a greedy row with nothing to sample
    rows[5, 3] = float("inf")                       # a sampled row that cannot be sampled
    cfgs = [SamplingConfig(), SamplingConfig(temperature=0.9, seed=4), SamplingConfig(),
            SamplingConfig(logprobs=2), SamplingConfig(), SamplingConfig(temperature=1.1, top_k=5, seed=8)]
    return rows, cfgs, [0, 5, 1, 2, 3, 4]


def test_a_reduced_step_samples_exactly_what_the_whole_logits_sample():
    from engine.sampler import SamplingError, StepLogits, full_rows
    rows, cfgs, indices = _reduced_case()
    keep = full_rows(cfgs)
    assert keep == (1, 3, 5)                        # sampled or asking logprobs; greedy rows are not kept
    step = StepLogits.of(rows, keep)
    assert step.logits.shape == (3, 64) and torch.equal(step.row(3), rows[3]) and step.row(0) is None
    whole, reduced = sample_batch(rows, cfgs, indices), sample_batch(step, cfgs, indices)
    assert [type(t) for t in whole] == [type(t) for t in reduced]
    assert [t if isinstance(t, int) else str(t) for t in whole] == [t if isinstance(t, int) else str(t) for t in reduced]
    assert isinstance(reduced[2], SamplingError) and "NaN or +inf" in str(reduced[2])
    assert isinstance(reduced[4], SamplingError) and "-inf" in str(reduced[4])
    assert isinstance(reduced[5], SamplingError)
    assert reduced[0] == int(torch.argmax(rows[0])) and reduced[1] == sample_one(rows[1], cfgs[1], 5)


def test_a_reduced_step_missing_a_sampled_row_is_refused():
    from engine.sampler import StepLogits
    rows, cfgs, indices = _reduced_case()
    with pytest.raises(ValueError, match="row 1 samples with temperature"):
        sample_batch(StepLogits.of(rows, (3,)), cfgs, indices)
