"""Mixtral-style MoE: the block vs ``transformers``, expert parallelism, expert counts, Redis.

- unit: :class:`engine.moe.MoEBlock` (one rank) equals ``MixtralSparseMoeBlock`` on the same
  weights, loaded from per-expert and from stacked tensors; counts equal a direct count of the
  router's top-k; the permutation reference round-trips.
- integration: a tiny saved Mixtral, greedy tokens (the serving path:
  ``engine.llm_engine.LLMEngine``) and last logits equal ``transformers`` at one rank and at
  EP 2, EP 4 (attention replicated) and EP 2 with TP 2 attention, and the engine's expert
  counts (``Executor.expert_counts``) equal one rank's; each layout's ranks are also spawned
  once (gloo) to check the MoE block alone and the logits against one rank; the same
  model converted to GGUF (llama.cpp layout) loads and matches; and ``ExpertStatsWriter``
  against a real ``redis-server``.

Floats of two code paths (ours vs ``transformers``, EP ranks vs one rank) agree within
``tests.tolerances`` for their reduction length; greedy tokens exactly (every reference step
is checked decisive, see ``tests.engine.test_parity``). Routing is discrete: counts compare
exactly where the router sees the same input through the same kernel, or where the top-k
choice is checked decisive.
"""
from __future__ import annotations


import pytest
import torch

from common.layout import ParallelConfig
from engine.llm_engine import LLMEngine
from engine.moe import MixtralForCausalLM, MoEBlock
from engine.runtime.spawn import spawn_ranks
from kernels.moe_permute import moe_permute, moe_unpermute
from services.experts.stats import ExpertStatsWriter
from tests.moe_models import (BLOCK_K, EXPERTS, HIDDEN, INTER, TOP_K, block_config, hf_block, our_block,
                              per_expert_state, stacked_block)
from tests.parity import engine_config, prefill_last_logits, reference_greedy
from tests.tolerances import assert_close, assert_decisive, model_reduction_length

PROMPTS = [[256, 72, 101, 108, 108, 111, 32, 119], [257, 10, 33, 64, 65, 66, 67, 68, 69, 70, 71, 1, 2]]
NEW_TOKENS = 16


def direct_counts(block, x) -> torch.Tensor:
    """Routed pairs per expert, counted from the router logits here (another matmul than the
    block's): every token's top-k choice checked decisive first, so the counts compare exactly."""
    logits = x @ block.gate.weight.detach().T
    for row in logits:
        assert_decisive(row, HIDDEN, top=TOP_K)
    ids = torch.topk(torch.softmax(logits.float(), -1), TOP_K, -1).indices
    return torch.bincount(ids.flatten(), minlength=EXPERTS)


# ---- unit ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_block_matches_transformers_both_weight_layouts():
    ref = hf_block()
    x = torch.randn(37, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref(x[None])[0]
        ours = our_block(per_expert_state(ref))(x)
        stacked = stacked_block(ref)(x)
    assert_close(ours, want, k=BLOCK_K)
    # both layouts load the same weights (bit for bit: a load moves them) into the same
    # parameters, and the same forward runs on them: the same kernels twice, bit for bit
    for name in ("gate_weight", "gate_up_proj", "down_proj"):
        a, b = (getattr(m, name) for m in (our_block(per_expert_state(ref)), stacked_block(ref)))
        assert a.stride() == b.stride() and torch.equal(a, b), name
    assert torch.equal(stacked, ours)


@pytest.mark.unit
def test_counts_equal_routed_pairs():
    ref = hf_block()
    block = our_block(per_expert_state(ref))
    x1, x2 = torch.randn(2, 29, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        block(x1)
        assert block.expert_counts.tolist() == direct_counts(ref, x1).tolist()
        assert int(block.expert_counts.sum()) == 29 * TOP_K
        block(x2)                                       # cumulative
    assert block.expert_counts.tolist() == (direct_counts(ref, x1) + direct_counts(ref, x2)).tolist()


@pytest.mark.unit
def test_permute_roundtrip_and_errors():
    x = torch.randn(5, 4)
    ids = torch.tensor([[0, 2], [2, 1], [1, 0], [2, 3], [3, 0]])
    xs, order, counts = moe_permute(x, ids, 4)
    assert counts.tolist() == [3, 2, 3, 2]
    assert ids.flatten()[order].tolist() == sorted(ids.flatten().tolist())
    torch.testing.assert_close(moe_unpermute(xs, order, torch.full((5, 2), 0.5), 5), x)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        moe_permute(x, ids, 3)


@pytest.mark.unit
def test_load_errors_quote_values():
    block = MoEBlock(block_config())
    with pytest.raises(ValueError, match="unexpected MoE weight"):
        block.load_weight("experts.0.w4.weight", torch.zeros(INTER, HIDDEN))
    with pytest.raises(ValueError, match="expert 9 is outside"):
        block.load_weight("experts.9.w1.weight", torch.zeros(INTER, HIDDEN))
    assert "gate" in block.missing_weights()
    with pytest.raises(ValueError, match="ep=3 does not divide the 8 experts"):
        ParallelConfig(ep=3).validate_for(block_config(), EXPERTS)


# ---- integration: whole model, EP layouts --------------------------------------------------
def _rank_run(groups, path, state, x):
    """One rank: the MoE block alone on ``x`` and the whole tiny Mixtral's prefill logits."""
    from engine.loader import iter_weights, load_model_config, resolve_model
    block = our_block(state, groups)
    with torch.inference_mode():
        block_out = block(x)
    src = resolve_model(path)
    config = load_model_config(src)
    model = MixtralForCausalLM(config, groups)
    model.load_weights(iter_weights(src, config, want=model.wants))
    model.eval()
    local = config.replace(num_kv_heads=model.num_local_kv_heads)   # this rank's KV heads
    logits = prefill_last_logits(model, local, PROMPTS)
    return {"block": block_out, "block_counts": block.expert_counts.clone(),
            "experts_held": block.gate_up_proj.shape[0], "logits": logits}


def _engine_run(path, layout: ParallelConfig) -> dict:
    """The tiny Mixtral served on ``layout``: greedy tokens of each prompt alone, and the
    instance's expert counts after them (``{layer: [pairs per expert]}``)."""
    with LLMEngine(engine_config(path, parallel=layout, threads=1)) as engine:
        tokens = [engine.generate([p], NEW_TOKENS)[0] for p in PROMPTS]
        return {"tokens": tokens, "counts": engine.executor.expert_counts()}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(path, block state, x, single-rank results, transformers greedy tokens and logits, the
    logits' reduction length)."""
    from engine.loader import load_reference_model
    from engine.parallel import ParallelGroups
    from tests.moe_models import make_tiny_mixtral
    from tests.parity import reference_last_logits
    path = make_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"), seed=0)
    ref = load_reference_model(path)
    want_tokens = [reference_greedy(ref, p, NEW_TOKENS) for p in PROMPTS]
    want_logits = torch.stack([reference_last_logits(ref, p) for p in PROMPTS])
    state = per_expert_state(hf_block(seed=3))
    x = torch.randn(23, HIDDEN, generator=torch.Generator().manual_seed(4))
    single = {**_rank_run(ParallelGroups.single(), path, state, x), **_engine_run(path, ParallelConfig())}
    k = model_reduction_length(ref.config, max(map(len, PROMPTS)))
    return path, state, x, single, want_tokens, want_logits, k


def _assert_logits(ours, want, k):
    for got, w in zip(ours, want):
        assert_close(got, w, k=k)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_single_rank_matches_transformers(mixtral):
    _, _, _, single, want_tokens, want_logits, k = mixtral
    assert single["tokens"] == want_tokens
    _assert_logits(single["logits"], want_logits, k)
    assert sorted(single["counts"]) == list(range(4))
    for counts in single["counts"].values():          # every layer saw every token of every step
        assert sum(counts) == sum(single["counts"][0]) > 0


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [ParallelConfig(ep=2), ParallelConfig(ep=4), ParallelConfig(ep=2, tp=2)],
                         ids=["ep2", "ep4", "ep2-tp2"])
def test_expert_parallel_matches_one_rank(mixtral, layout):
    path, state, x, single, want_tokens, want_logits, k = mixtral
    results = spawn_ranks(layout, _rank_run, path, state, x, timeout_s=240)
    for r in results:
        assert r["experts_held"] == EXPERTS // layout.ep           # a rank holds only its experts
        # EP sums the experts' outputs across ranks: another order than one rank
        assert_close(r["block"], single["block"], k=BLOCK_K)
        # every rank routes with the replicated router on the same x, the same kernel as one rank
        assert r["block_counts"].tolist() == single["block_counts"].tolist()
        _assert_logits(r["logits"], want_logits, k)
    served = _engine_run(path, layout)
    assert served["tokens"] == want_tokens
    # every layer's routing: a token whose 2nd and 3rd expert were within rounding could
    # flip (TP attention feeds the routers other roundings); it would also move the
    # logits far outside the bound checked above, so it cannot pass unseen
    assert served["counts"] == single["counts"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_gguf_mixtral_loads_and_matches(mixtral, tmp_path):
    from engine.loader import iter_weights, load_model_config, resolve_model
    from engine.moe import build_model
    from tests.moe_models import write_tiny_mixtral_gguf
    path, _, _, single, _, want_logits, k = mixtral
    src = resolve_model(write_tiny_mixtral_gguf(path, str(tmp_path / "tiny-mixtral.gguf")))
    config = load_model_config(src)
    assert (config.architecture, config.num_experts, config.num_experts_per_tok) == ("mixtral", EXPERTS, TOP_K)
    model = build_model(config)
    model.load_weights(iter_weights(src, config))
    _assert_logits(prefill_last_logits(model.eval(), config, PROMPTS), want_logits, k)


# ---- integration: Redis ---------------------------------------------------------------------
@pytest.fixture
def redis_client(redis_url):
    import redis

    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


@pytest.mark.integration
def test_expert_counts_written_to_redis(redis_client):
    ref = hf_block()
    block = our_block(per_expert_state(ref))
    x1, x2 = torch.randn(2, 31, HIDDEN, generator=torch.Generator().manual_seed(5))
    writer = ExpertStatsWriter(redis_client, "tiny-mixtral", every_n_steps=2)
    with torch.inference_mode():
        block(x1)
    writer.flush({0: block.expert_counts, 3: block.expert_counts})
    first = direct_counts(ref, x1)
    for layer in (0, 3):
        got = redis_client.hgetall(f"cleave:experts:tiny-mixtral:{layer}")
        assert {int(k): int(v) for k, v in got.items()} == {e: int(c) for e, c in enumerate(first) if c}
    with torch.inference_mode():
        block(x2)
    assert writer.on_step(lambda: {0: block.expert_counts}) == 0      # step 1 of 2: no write
    writer.on_step(lambda: {0: block.expert_counts})                  # step 2: increments only
    total = first + direct_counts(ref, x2)
    got = redis_client.hgetall("cleave:experts:tiny-mixtral:0")
    assert {int(k): int(v) for k, v in got.items()} == {e: int(c) for e, c in enumerate(total) if c}
    assert sum(int(v) for v in got.values()) == (31 + 31) * TOP_K
    assert writer.flush({0: block.expert_counts}) == 0                # nothing new, nothing sent
    with pytest.raises(ValueError, match="counts went down"):
        writer.flush({0: torch.zeros(EXPERTS, dtype=torch.int64)})
