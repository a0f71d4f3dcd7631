"""Expert load balancing through the whole stack, on a tiny Mixtral built to route most tokens to
experts 6 and 7 (both on EP rank 1 of the default placement).

Decode runs EP 2 with 2 redundant slots. Phase 1 measures the per-rank computed pairs under the
default placement; then four long streams start, and while they are all running ``cleave
rebalance`` publishes a placement computed from the windowed statistics in Redis; the decode
instance switches to it at a step boundary (weights moved between its ranks). Every stream
is token-identical to ``transformers``, nothing is dropped, the placement version and the
switch are visible (``ExpertLoad``, ``GetModelInfo``), and the hotspot ratio measured from the
pairs each rank actually computed is lower after the switch than before.
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from cleave.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

HOT = {6: 0.3, 7: 0.2}
PROMPTS = [[256, 72, 101, 108, 108, 111], [257, 10, 33, 64, 65, 66, 67], [5, 17, 99, 3], list(range(40, 52))]


def greedy_no_eos(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from ``transformers`` (KV cache), never stopping at EOS."""
    out = []
    with torch.inference_mode():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def measured_hotspot(before: worker_pb2.ExpertLoadInfo, after: worker_pb2.ExpertLoadInfo) -> float:
    """Mean over layers of max/mean of the pairs each EP rank computed between two snapshots."""
    ratios = []
    for a, b in zip(before.layers, after.layers):
        delta = [y - x for x, y in zip(a.rank_pairs, b.rank_pairs)]
        ratios.append(max(delta) * len(delta) / sum(delta))
    return sum(ratios) / len(ratios)


def test_rebalance_mid_generation_keeps_tokens_and_lowers_the_hotspot(tmp_path):
    from services.experts.stats import stats_model_id
    from services.cli import main as cli
    from common.grpc_util import token_metadata
    from services.launcher import StackConfig, workers
    from tests.moe_models import make_tiny_mixtral
    from tests.stack import RunningStack, request
    from transformers import AutoModelForCausalLM

    make_tiny_mixtral(str(tmp_path), seed=0, hot_experts=HOT)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    n_short, n_long = 12, 240
    want_short = [greedy_no_eos(reference, p, n_short) for p in PROMPTS]
    want_long = [greedy_no_eos(reference, p, n_long) for p in PROMPTS]

    stack = RunningStack(StackConfig(
        port=0, http_port=0, model=str(tmp_path), log_level="WARNING",
        **workers(transport="tcp", num_blocks=256, block_size=8, threads=1,
                  decode=dict(ep=2, redundant_experts=2, expert_stats_interval_s=1, expert_window_s=120.0))))
    try:
        decode = next(w for w in stack.workers() if w.pool == "decode")
        channel = grpc.insecure_channel(decode.address)
        stub = worker_pb2_grpc.DecodeStub(channel)

        def expert_load(req, timeout):
            return stub.ExpertLoad(req, timeout=timeout, metadata=token_metadata(stack.stack.token))
        blocks_before = stack.free_blocks()

        def phase(tag):
            snap = expert_load(worker_pb2.ExpertLoadRequest(), timeout=10)
            for ids, want in zip(PROMPTS, want_short):
                assert stack.generate(token_ids=ids, max_tokens=n_short, ignore_eos=True).token_ids == want, tag
            return measured_hotspot(snap, expert_load(worker_pb2.ExpertLoadRequest(), timeout=10))

        first = expert_load(worker_pb2.ExpertLoadRequest(), timeout=10)
        assert (first.placement_version, first.ep, first.slots_per_rank) == (1, 2, 5)
        hot_before = phase("default placement")

        results, ended = [None] * len(PROMPTS), [0.0] * len(PROMPTS)
        started = threading.Barrier(len(PROMPTS) + 1)

        def stream(i):
            ids, chunks = [], stack.stub.Generate(
                request(token_ids=PROMPTS[i], max_tokens=n_long, ignore_eos=True), timeout=300)
            for k, msg in enumerate(chunks):
                ids.extend(msg.token_ids)
                if k == 1:
                    started.wait(timeout=120)
                last = msg
            results[i], ended[i] = (ids, last.finish_reason), time.time()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        started.wait(timeout=120)                 # every stream is decoding
        time.sleep(1.2)                           # the phase-1 counts are flushed to the window
        assert cli(["rebalance", "--redis-url", stack.stack.redis_url, "--model-id",
                    stats_model_id(decode.model_id)]) == 0
        deadline, switched_at = time.time() + 30, None
        while time.time() < deadline:
            info = expert_load(worker_pb2.ExpertLoadRequest(), timeout=10)
            if info.placement_version == 2:
                switched_at = time.time()
                break
            time.sleep(0.05)
        for t in threads:
            t.join(timeout=300)
        assert switched_at is not None, "the decode instance did not switch to version 2"
        assert all(e > switched_at for e in ended), "a stream ended before the switch: lengthen it"
        for (ids, reason), want in zip(results, want_long):
            assert reason == inference_pb2.FINISH_REASON_LENGTH
            assert ids == want

        sw = info.switches[-1]
        assert sw.version == 2 and sw.transfers > 0 and sw.bytes > 0
        assert list(info.layers[0].slot_experts) != list(first.layers[0].slot_experts)
        hot_after = phase("rebalanced placement")
        assert hot_after < hot_before, (hot_before, hot_after)
        assert hot_before > 1.5 and hot_after < 1.3, (hot_before, hot_after)

        model_info = stack.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        assert model_info.expert_placement_version == 2 and model_info.expert_slots_per_rank == 5
        assert len(model_info.expert_layers) == reference.config.num_hidden_layers
        assert all(1.0 <= layer.hotspot_ratio < 1.3 for layer in model_info.expert_layers)
        assert stack.wait_free_blocks(blocks_before) == blocks_before
        channel.close()
    finally:
        stack.close()
