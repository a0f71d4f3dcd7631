"""The prefix cache and preemption (issue 21) on real tiny models, against ``transformers``.

One ``engine.llm_engine.LLMEngine`` per layout serves two turns: :data:`FIRST`, then
:data:`SECOND`, whose prompts share whole leading blocks with the first turn's (``A``, ``B``)
and with each other (``C``, first seen in this turn). The second turn must report exactly the
designed ``cached_tokens`` (:data:`SECOND_CACHED`, multiples of the block size), and its greedy
tokens must equal ``transformers``' (``tests.parity.reference_greedy``: every step's margin
checked, so token-exact parity is sound on any CPU) and an engine's with ``prefix_cache=False``
(which reports no cached tokens and keeps nothing). Seeded sampling (temperature > 0) with
prefix hits must give the no-cache engine's tokens. Layouts: one rank, TP 2, PP 2, TP2 x PP2,
the tiny Mixtral at EP 2 (with an EPLB placement change between turns, which must leave the
cached KV valid), and int8 weights on one rank (not token-exact with fp32, so the cached
prefill's logits are held to the no-cache engine's within the bf16 kernels' bound instead).

Preemption: an engine whose KV cache is too small for its concurrent long generations must
preempt (``scheduler.preemptions > 0``) and resume by recompute, and still produce exactly the
large-cache engine's tokens (greedy: also ``transformers``'; seeded sampling too), with every
block back (``used_blocks == 0``, ``BlockManager.check``). One rank with and without the prefix
cache, PP 2 (decode micro-batches), TP 2 (``slow``).

Seeded sampling across two code paths: the sampler draws token ``i`` of a request from a
generator seeded by ``(seed, i)`` only (``engine.sampler``); the cached and uncached paths'
logits differ by fp32 rounding (another attention kernel for the cached prefill), which could
change a draw only if it landed within that rounding of a boundary of the cumulative
distribution (about 1e-6 per token).
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from common.layout import ParallelConfig
from engine.llm_engine import LLMEngine
from engine.sampler import SamplingConfig
from engine.scheduler import FINISH_ERROR
from tests.parity import engine_config, reference_greedy
from tests.tolerances import assert_close, model_matmuls, model_reduction_length

BLOCK = 8
NEW_TOKENS = 10

_rng = random.Random(23)         # every reference step decisive (reference_greedy)


def _tokens(n: int) -> list[int]:
    return [_rng.randrange(1, 256) for _ in range(n)]


A, B, C = _tokens(5 * BLOCK), _tokens(4 * BLOCK + 3), _tokens(3 * BLOCK)
FIRST = [A + _tokens(5), B + _tokens(3)]
# each prompt's cached tokens are fixed by construction (whole blocks of the shared prefix,
# capped below the prompt's length), whatever its random tail
SECOND = [A[:4 * BLOCK] + _tokens(6),       # A's first 4 blocks (turn 1)
          A + _tokens(7),                   # all of A's 5 blocks (turn 1)
          B[:3 * BLOCK] + _tokens(4),       # B's first 3 blocks (turn 1)
          C + _tokens(5),                   # C: new
          C + _tokens(9),                   # C's 3 blocks (the prompt before it, this turn)
          # a near miss: A's first 4 blocks but for the 4th block's last token: 3 blocks hit
          A[:4 * BLOCK - 1] + [A[4 * BLOCK - 1] % 255 + 1, 7, 70, 7, 70]]
SECOND_CACHED = [4 * BLOCK, 5 * BLOCK, 3 * BLOCK, 0, 3 * BLOCK, 3 * BLOCK]
SAMPLED = [SamplingConfig(temperature=0.9, top_k=50, seed=100 + i) for i in range(len(SECOND))]

# preemption: 4 concurrent generations of 40 tokens (2 prompts sharing 2 blocks) need about
# 4 x 8 blocks; the small cache has 12
LONG_NEW = 40
LONG = [A[:2 * BLOCK] + _tokens(5), A[:2 * BLOCK] + _tokens(3), _tokens(19), _tokens(12)]
SMALL_BLOCKS = 13                   # block 0 is padding: 12 usable


def served(engine: LLMEngine, prompts, max_tokens, sampling=None, ignore_eos=False):
    """Serve ``prompts`` as one batch (``sampling``: one config, or one per prompt); each one's
    tokens and the ``cached_tokens`` its outputs reported. Checks that no request failed, every
    output of a request reported the same count, and every block came back."""
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    ids = [engine.add_request(p, s, max_tokens, ignore_eos=ignore_eos) for p, s in zip(prompts, samplings)]
    tokens = {i: [] for i in ids}
    cached: dict[str, set[int]] = {i: set() for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.finished != FINISH_ERROR, out.error
            tokens[out.request_id] += out.new_tokens
            cached[out.request_id].add(out.cached_tokens)
    assert all(len(c) == 1 for c in cached.values()), cached
    assert engine.blocks.used_blocks == 0
    engine.blocks.check()
    return [tokens[i] for i in ids], [cached[i].pop() for i in ids]


def expected_hits(prompts) -> list[int]:
    """A turn over prompts whose whole KV (and more) is already cached: all whole blocks but
    the one holding the last prompt token (at least one token is always computed)."""
    return [(len(p) - 1) // BLOCK * BLOCK for p in prompts]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(path, transformers' greedy tokens of every prompt of both turns)."""
    from engine.loader import load_reference_model
    from tests.models import make_tiny_llama

    path = make_tiny_llama(tmp_path_factory.mktemp("llama"), seed=1, num_hidden_layers=4, num_key_value_heads=4)
    ref = load_reference_model(path)
    return path, {tuple(p): reference_greedy(ref, p, NEW_TOKENS) for p in FIRST + SECOND}


@pytest.fixture(scope="module")
def llama_long(llama):
    """transformers' greedy tokens of the preemption prompts (:data:`LONG_NEW` each)."""
    from engine.loader import load_reference_model

    ref = load_reference_model(llama[0])
    want = [reference_greedy(ref, p, LONG_NEW) for p in LONG]
    assert min(map(len, want)) >= LONG_NEW // 2           # long runs, or the test means little
    return want


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from engine.loader import load_reference_model
    from tests.moe_models import make_tiny_mixtral

    path = make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"), seed=0)
    ref = load_reference_model(path)
    return path, {tuple(p): reference_greedy(ref, p, NEW_TOKENS) for p in FIRST + SECOND}


def _config(path, layout: ParallelConfig, **kw):
    return engine_config(path, block_size=BLOCK, parallel=layout, threads=1, **kw)


def two_turns(engine: LLMEngine, between=None) -> dict:
    """Turn 1 (greedy), ``between(engine)``, turn 2 greedy, turn 2 again seeded-sampled."""
    first, first_cached = served(engine, FIRST, NEW_TOKENS)
    if between is not None:
        between(engine)
    second, second_cached = served(engine, SECOND, NEW_TOKENS)
    sampled, sampled_cached = served(engine, SECOND, NEW_TOKENS, SAMPLED, ignore_eos=True)
    return dict(first=first, first_cached=first_cached, second=second, second_cached=second_cached,
                sampled=sampled, sampled_cached=sampled_cached)


def check_two_turns(path, want: dict, layout: ParallelConfig, between=None) -> dict:
    """:func:`two_turns` with the prefix cache off, then on; both against ``transformers``.
    The two engines drive the same ranks (one spawn), one after the other: the second's block
    manager starts empty, so every block it reuses holds KV it computed itself."""
    from engine.runtime.executor import make_executor

    cfg = _config(path, layout)
    with make_executor(cfg) as executor:
        engine = LLMEngine(dataclasses.replace(cfg, prefix_cache=False), executor=executor)
        off = two_turns(engine)
        assert engine.blocks.cached_blocks == 0 and engine.blocks.stats.hit_tokens == 0   # nothing kept
        on = two_turns(LLMEngine(cfg, executor=executor), between)
    assert off["first_cached"] + off["second_cached"] + off["sampled_cached"] == [0] * (2 * len(SECOND) + 2)
    assert on["first_cached"] == [0, 0]
    assert on["second_cached"] == SECOND_CACHED
    assert on["sampled_cached"] == expected_hits(SECOND)
    for run in (off, on):
        assert run["first"] == [want[tuple(p)] for p in FIRST]
        assert run["second"] == [want[tuple(p)] for p in SECOND]
    assert on["sampled"] == off["sampled"]
    assert on["sampled"] != [t[:len(s)] for t, s in zip(on["second"], on["sampled"])]   # it did sample
    return on


# ---- 1, 2, 5: prefix hits on every layout, greedy and seeded ---------------------------------
@pytest.mark.unit
def test_one_rank_prefix_hits_match_transformers_and_the_uncached_engine(llama):
    check_two_turns(*llama, ParallelConfig())


MULTI = [ParallelConfig(tp=2), ParallelConfig(pp=2), ParallelConfig(tp=2, pp=2)]


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", MULTI, ids=lambda p: f"tp{p.tp}-pp{p.pp}")
def test_layout_prefix_hits_match_transformers_and_the_uncached_engine(llama, layout):
    check_two_turns(*llama, layout)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_moe_ep2_prefix_hits_match_transformers_and_the_uncached_engine(mixtral):
    check_two_turns(*mixtral, ParallelConfig(ep=2))


# ---- 4: an EPLB placement change between turns keeps the cached KV valid ---------------------
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_moe_placement_change_between_turns_keeps_the_cache(mixtral):
    from engine.expert_placement import Placement

    moves = []

    def rebalance(engine):                  # experts 0-3 <-> 4-7, and a redundant copy of 0 and 7
        experts = engine.model_config.num_experts
        layers = sorted(engine.executor.expert_counts())
        for table in [(4, 5, 6, 7, 0, 1, 2, 3), (0, 1, 2, 3, 7, 4, 5, 6, 7, 0)]:
            placement = Placement.from_list(table, experts, 2)
            moves.append(engine.executor.apply_placement({layer: placement for layer in layers}))
        cached = engine.blocks.cached_blocks
        assert cached > 0                   # turn 1's KV is cached across the switch
        moves.append(cached)

    check_two_turns(*mixtral, ParallelConfig(ep=2), between=rebalance)
    assert all(m["moved"] > 0 for m in moves[:2])               # weights did travel


# ---- a quantized weights format ------------------------------------------------------------
@pytest.mark.unit
def test_int8_prefix_hits_stay_within_the_kernel_bound_of_the_uncached_engine(llama):
    """int8 weights (bf16 kernels): not token-exact with fp32, and a rounding difference (the
    cached prefill's attention) can move a bf16-rounded matmul result by an ulp, so the second
    turn's prefill logits are held to the no-cache engine's within the bound of
    ``tests.engine.test_quant`` (bf16 results, fp32 sums, one rounding per weight matmul)."""
    from engine.loader import load_model_config, resolve_model
    from engine.quant import KERNEL_DTYPE

    path = llama[0]
    logits, cached = {}, {}
    for on in (False, True):
        with LLMEngine(_config(path, ParallelConfig(), prefix_cache=on, weights_dtype="int8")) as engine:
            engine.generate(FIRST, NEW_TOKENS)
            ids = [engine.add_request(p, max_tokens=1) for p in SECOND]
            reqs = [engine._requests[i] for i in ids]
            outs = {}
            while engine.has_unfinished():
                outs.update({o.request_id: o.cached_tokens for o in engine.step()})
            logits[on] = torch.stack([r.prefill_logits for r in reqs])
            cached[on] = [outs[i] for i in ids]
            assert engine.blocks.used_blocks == 0
            engine.blocks.check()
    assert cached == {False: [0] * len(SECOND), True: SECOND_CACHED}
    config = load_model_config(resolve_model(path))
    for got, want, p in zip(logits[True], logits[False], SECOND):
        assert_close(got, want, k=model_reduction_length(config, len(p)), dtype=KERNEL_DTYPE,
                     accumulate=torch.float32, roundings=model_matmuls(config))


# ---- 3: preemption ---------------------------------------------------------------------------
LONG_SAMPLED = [SamplingConfig(temperature=0.9, top_k=50, seed=200 + i) for i in range(len(LONG))]


def check_preemption(path, want_greedy, layout: ParallelConfig, prefix_cache: bool = True) -> None:
    """Greedy, then seeded-sampled, runs of :data:`LONG` on a cache of :data:`SMALL_BLOCKS`
    that must preempt, equal to the runs on a large cache (and greedy to ``transformers``)."""
    runs = {}
    for blocks in (256, SMALL_BLOCKS):
        with LLMEngine(_config(path, layout, num_blocks=blocks, prefix_cache=prefix_cache)) as engine:
            greedy, _ = served(engine, LONG, LONG_NEW, ignore_eos=True)
            after_greedy = engine.scheduler.preemptions
            sampled, _ = served(engine, LONG, LONG_NEW, LONG_SAMPLED, ignore_eos=True)
            runs[blocks] = (greedy, sampled, after_greedy, engine.scheduler.preemptions - after_greedy)
            if not prefix_cache:
                assert engine.blocks.cached_blocks == 0
    big, small = runs[256], runs[SMALL_BLOCKS]
    assert big[2] == big[3] == 0
    assert small[2] > 0 and small[3] > 0, f"no preemption with {SMALL_BLOCKS} blocks: {small[2:]}"
    assert all(len(t) == LONG_NEW for t in small[0] + small[1])
    assert small[0] == big[0]
    assert [t[:len(w)] for t, w in zip(small[0], want_greedy)] == want_greedy   # transformers stops at EOS
    assert small[1] == big[1]
    assert small[1] != small[0]                                                   # it did sample


@pytest.mark.unit
@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_one_rank_preemption_changes_no_token(llama, llama_long, prefix_cache):
    check_preemption(llama[0], llama_long, ParallelConfig(), prefix_cache)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [ParallelConfig(pp=2),
                                    pytest.param(ParallelConfig(tp=2), marks=pytest.mark.slow, id="tp2-pp1")],
                         ids=lambda p: f"tp{p.tp}-pp{p.pp}")
def test_layout_preemption_changes_no_token(llama, llama_long, layout):
    check_preemption(llama[0], llama_long, layout)
