"""Trends the field agrees on, predicted by the capacity planner on datasheet GPU profiles."""
from __future__ import annotations

from dataclasses import replace

import pytest

from services.capacity.cost import CostOptions, Layout, decode_step_time, decode_throughput, prefill_time
from services.capacity.memory import max_decode_batch, memory_per_gpu
from services.capacity.hardware import BUILTIN as GPUS
from services.capacity.models import BUILTIN as MODELS
from services.capacity.search import PlanRequest, plan

pytestmark = pytest.mark.unit

L70, H100, BF16 = MODELS["llama-3.1-70b"], GPUS["h100"], CostOptions()


def test_more_tp_lowers_ttft_and_tpot_of_70b_until_communication_dominates():
    ttft = {t: prefill_time(L70, H100, Layout(tp=t), BF16, 1, 2048) for t in (1, 2, 4, 8, 16)}
    tpot = {t: decode_step_time(L70, H100, Layout(tp=t), BF16, 16, 2048) for t in (1, 2, 4, 8, 16)}
    for times in (ttft, tpot):
        assert times[1].total_s > times[2].total_s > times[4].total_s > times[8].total_s
        assert times[1].comm_share < times[2].comm_share < times[4].comm_share < times[8].comm_share
        # TP16 spans two 8-GPU nodes: its all-reduces go over the NIC and outweigh the compute
        assert times[16].total_s > times[8].total_s
        assert times[16].over_parallelised and times[16].comm_share > 0.5
        assert not times[8].over_parallelised


MOE = MODELS["mixtral-8x7b"]
PP_CASES = [(L70, Layout(tp=t, pp=p)) for t in (1, 2, 4, 8) for p in (2, 4)] + \
           [(MOE, Layout(tp=t, pp=p, ep=e)) for t, e in ((1, 2), (2, 2), (1, 4), (4, 4)) for p in (2, 4)]


@pytest.mark.parametrize("hw", sorted(GPUS), ids=str)
def test_pp_never_lowers_the_per_token_latency_at_equal_batch(hw):
    """A token passes every stage in turn: TPOT(TP x PP) >= TPOT(TP) at the same step batch, for
    dense and MoE models, however many micro-batches are in flight (they raise throughput)."""
    hw = GPUS[hw]
    for model, lay in PP_CASES:
        assert lay.problem(model) is None
        flat = Layout(tp=lay.tp, ep=lay.ep)
        for m in (0, 1, 2, 8):
            opt = CostOptions(micro_batches=m)
            for batch in (1, 16, 256):
                for ctx in (512, 9400):
                    pp = decode_step_time(model, hw, lay, opt, batch, ctx)
                    one = decode_step_time(model, hw, flat, opt, batch, ctx)
                    assert pp.total_s >= one.total_s, (model.name, lay.label(), m, batch, ctx)
                    assert pp.sequences == batch * (m or lay.pp) and one.sequences == batch
                    if (m or lay.pp) >= lay.pp:      # every stage busy: more tokens/s, not faster tokens
                        assert decode_throughput(pp) > decode_throughput(one), (model.name, lay.label(), m, batch)


@pytest.mark.parametrize("hw", sorted(GPUS), ids=str)
def test_pp_raises_throughput_at_large_batch_through_kv_room(hw):
    """Where KV room limits the TP layout's batch, TP x PP2 holds more sequences (half the layers
    per GPU) in two micro-batches and makes more tokens/s per instance, at a TPOT no lower."""
    hw, ctx = GPUS[hw], 2304
    for tp in (2, 4):
        flat, pp = Layout(tp=tp), Layout(tp=tp, pp=2)
        kv_flat = memory_per_gpu(L70, hw, flat, BF16, 0, 0).kv_room_tokens
        kv_pp = memory_per_gpu(L70, hw, pp, BF16, 0, 0).kv_room_tokens
        assert kv_pp * pp.gpus > 2 * kv_flat * flat.gpus          # > 2x the KV room per instance
        b_flat, b_pp = (max_decode_batch(L70, hw, lay, BF16, ctx) for lay in (flat, pp))
        if not 0 < b_flat < 4096:
            continue                                              # does not fit / not KV-limited
        t_flat = decode_step_time(L70, hw, flat, BF16, b_flat, ctx - 100)
        t_pp = decode_step_time(L70, hw, pp, BF16, b_pp, ctx - 100)
        assert t_pp.sequences > t_flat.sequences
        assert decode_throughput(t_pp) > decode_throughput(t_flat)
        assert decode_step_time(L70, hw, pp, BF16, b_flat, ctx - 100).total_s >= t_flat.total_s
    assert prefill_time(L70, hw, Layout(tp=4, pp=2), BF16, 1, 2048).total_s >= \
        prefill_time(L70, hw, Layout(tp=4), BF16, 1, 2048).total_s


def test_the_issue_example_pp_decode_is_not_faster_per_token():
    """405B int4 on MI355X, 9,400-token prompts, batch 256: TP4xPP2's TPOT was 0.56x TP4's."""
    mi, l405 = GPUS["mi355x"], MODELS["llama-3.1-405b"]
    int4 = CostOptions(weight_dtype="int4", kv_dtype="int4")
    ctx = 9400 + 680 / 2
    tp4, pp2, tp8 = (decode_step_time(l405, mi, lay, int4, 256, ctx) for lay in (Layout(tp=4), Layout(tp=4, pp=2),
                                                                                 Layout(tp=8)))
    assert pp2.total_s >= tp4.total_s > tp8.total_s
    assert decode_throughput(pp2) > 1.9 * decode_throughput(tp4)     # two micro-batches of 256 in flight


def _ttfts(model, hw, prompt=16384):
    return {t: prefill_time(model, hw, Layout(tp=t), BF16, 1, prompt).total_s for t in (1, 2, 4, 8)}


@pytest.mark.parametrize("hw", [n for n in sorted(GPUS) if GPUS[n].topology == "mesh"], ids=str)
def test_on_a_mesh_some_tp_degree_is_slower_than_the_one_below_but_not_on_a_switch(hw):
    """All-to-all node, batch 1, long prompts: a TP2 all-reduce crosses one link (1/7 of the
    GPU's bandwidth) and outweighs the halved compute; TP8's spreads over all seven and wins. A
    switch node with the same per-GPU bandwidth gives a pair all of it: no negative returns."""
    mesh = GPUS[hw]
    twin = replace(mesh, topology="switch")                       # same links, same 7 x link per GPU
    assert twin.gpu_link_bw == mesh.gpu_link_bw
    worse = []
    for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"):
        on_mesh, on_switch = _ttfts(MODELS[name], mesh), _ttfts(MODELS[name], twin)
        worse += [(name, t) for t in (2, 4, 8) if on_mesh[t] > on_mesh[t // 2]]
        assert all(on_switch[t] < on_switch[t // 2] for t in (2, 4, 8)), (name, on_switch)
        assert on_mesh[8] < on_mesh[1] and on_mesh[8] == pytest.approx(on_switch[8])
    assert ("llama-3.1-8b", 2) in worse, worse
    assert all(t == 2 for _, t in worse)                          # more GPUs spread over more links


def test_tp_across_nodes_is_worse_than_tp_inside_and_pp_across():
    for phase in ("prefill", "decode"):
        if phase == "prefill":
            cross, split = (prefill_time(L70, H100, lay, BF16, 4, 2048) for lay in (Layout(tp=16), Layout(tp=8, pp=2)))
        else:
            cross, split = (decode_step_time(L70, H100, lay, BF16, 64, 2048) for lay in (Layout(tp=16), Layout(tp=8, pp=2)))
        assert split.total_s < cross.total_s
        assert split.comm_s < cross.comm_s


def test_a_model_that_fits_one_gpu_is_recommended_as_replicas():
    req = PlanRequest(model=MODELS["llama-3.1-8b"], hardware=H100, gpus=16, prompt=1024, output=256, rate=100,
                      ttft_s=1.0, tpot_s=0.05)
    rec = plan(req)["recommendation"]
    for pool in ("prefill", "decode"):
        assert (rec[pool]["tp"], rec[pool]["pp"], rec[pool]["cp"]) == (1, 1, 1), rec[pool]
    assert rec["decode"]["instances"] >= 2 and rec["within_budget"]
    # while a model that does not fit one GPU is sharded
    big = plan(PlanRequest(model=L70, hardware=H100, gpus=16, prompt=1024, output=256, rate=2, ttft_s=1.0,
                           tpot_s=0.05))["recommendation"]
    assert big["decode"]["gpus_per_instance"] > 1


def test_moe_prefers_expert_parallelism_for_its_experts():
    mix = MODELS["mixtral-8x7b"]
    one = memory_per_gpu(mix, H100, Layout(tp=2), BF16, 0, 0)        # experts replicated over TP ranks
    ep = memory_per_gpu(mix, H100, Layout(tp=2, ep=2), BF16, 0, 0)
    assert ep.weights < 0.6 * one.weights
    worse = prefill_time(mix, H100, Layout(ep=2), CostOptions(expert_imbalance=2.0), 1, 2048)
    better = prefill_time(mix, H100, Layout(ep=2), CostOptions(expert_imbalance=1.0), 1, 2048)
    assert worse.ep_s > better.ep_s and worse.total_s > better.total_s
