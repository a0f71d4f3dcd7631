"""Trends the field agrees on, predicted by the capacity planner on datasheet GPU profiles."""
from __future__ import annotations

import pytest

from services.capacity.cost import CostOptions, Layout, decode_step_time, memory_per_gpu, prefill_time
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


def _max_batch(lay: Layout, ctx: int) -> int:
    b = 1
    while memory_per_gpu(L70, H100, lay, BF16, 2 * b * ctx, 2 * b).fits:
        b *= 2
    return b


def test_pp_raises_throughput_at_large_batch_through_kv_room_but_not_latency():
    ctx = 2304
    tp4, pp2 = Layout(tp=4), Layout(tp=4, pp=2)
    kv4 = memory_per_gpu(L70, H100, tp4, BF16, 0, 0).kv_room_tokens
    kv8 = memory_per_gpu(L70, H100, pp2, BF16, 0, 0).kv_room_tokens
    assert kv8 * 8 > 2 * kv4 * 4                 # half the layers per GPU: > 2x the KV room per instance
    b4, b8 = _max_batch(tp4, ctx), _max_batch(pp2, ctx)
    assert b8 > b4
    thr4 = b4 / decode_step_time(L70, H100, tp4, BF16, b4, ctx).total_s
    thr8 = b8 / decode_step_time(L70, H100, pp2, BF16, b8, ctx).total_s
    assert thr8 > thr4
    # one request's latency: PP adds stages in turn, never lowering TPOT or TTFT; nor does it at any
    # batch without micro-batches (how a served PP decode instance runs today)
    assert decode_step_time(L70, H100, pp2, BF16, 1, ctx).total_s >= decode_step_time(L70, H100, tp4, BF16, 1, ctx).total_s
    one_mb = CostOptions(micro_batches=1)
    for b in (16, b4):
        assert decode_step_time(L70, H100, pp2, one_mb, b, ctx).total_s >= decode_step_time(L70, H100, tp4, one_mb, b, ctx).total_s
    assert prefill_time(L70, H100, pp2, BF16, 1, 2048).total_s >= prefill_time(L70, H100, tp4, BF16, 1, 2048).total_s


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
