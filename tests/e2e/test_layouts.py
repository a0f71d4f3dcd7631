"""Parallel layouts through the whole stack: any prefill layout hands KV to any decode layout.

Each case starts a stack whose instances are groups of ranks (``services.instance``) and
checks greedy output against transformers, the layouts GetModelInfo reports, and that every
block is free again afterwards.
"""
from __future__ import annotations

import pytest
import torch

from cleave.v1 import inference_pb2
from tests.conftest import hf_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PAIRS = [  # (prefill flags, decode flags, transport)
    (("--tp=2", "--cp=2"), ("--tp=2", "--pp=2"), "ucx"),
    (("--tp=4",), (), "tcp"),
    ((), ("--tp=4",), "ucx"),
    (("--cp=2",), ("--pp=3",), "ucx"),
]


def _layout(flags) -> dict:
    out = {"tp": 1, "pp": 1, "cp": 1, "ep": 1}
    out.update({f[2:4]: int(f[5:]) for f in flags})
    return out


def _run_pair(model_dir, prefill, decode, transport, prompts, reference, n=16):
    from services.launcher import StackConfig, workers
    from tests.stack import RunningStack

    stack = RunningStack(StackConfig(
        port=0, model=model_dir, log_level="WARNING",
        **workers(transport=transport, num_blocks=64, block_size=8, threads=1,
                  prefill=_layout(prefill), decode=_layout(decode))))
    try:
        before = stack.free_blocks()
        for ids in prompts:
            assert stack.generate(token_ids=ids, max_tokens=n).token_ids == hf_greedy(reference, ids, n)
        info = stack.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        pools = {p.pool: {k: getattr(p.layout, k) for k in ("tp", "pp", "cp", "ep")} for p in info.pools}
        assert pools == {"prefill": _layout(prefill), "decode": _layout(decode)}
        assert stack.wait_free_blocks(before) == before
    finally:
        stack.close()


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("prefill, decode, transport", PAIRS,
                         ids=[f"prefill{''.join(p) or '-tp=1'}-decode{''.join(d) or '-tp=1'}-{t}"
                              for p, d, t in PAIRS])
def test_layout_pair_matches_transformers(tiny_llama_dir, tiny_reference, prefill, decode, transport):
    _run_pair(tiny_llama_dir, prefill, decode, transport, [[5, 17, 99, 3], list(range(40, 77))],
              tiny_reference)


@pytest.mark.slow
def test_smollm2_prefill_tp3_to_decode_pp2(smollm2_reference):
    model, tokenizer = smollm2_reference
    from tests.stack import RunningStack  # noqa: F401  (imported for the helper's stack)

    _run_pair("", ("--tp=3",), ("--pp=2",), "ucx", [tokenizer.encode("The capital of France is")], model, n=8)


def test_moe_prefill_tp2_to_decode_ep2_and_expert_counts_in_redis(tmp_path):
    """Mixtral: prefill TP2 hands KV to decode EP2; decode writes expert counts to Redis."""
    import time

    from services.launcher import StackConfig, workers
    from tests.moe_models import make_tiny_mixtral
    from tests.stack import RunningStack
    from transformers import AutoModelForCausalLM

    make_tiny_mixtral(str(tmp_path), seed=0)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    stack = RunningStack(StackConfig(
        port=0, model=str(tmp_path), log_level="WARNING",
        **workers(transport="ucx", num_blocks=64, block_size=8, threads=1, prefill={"tp": 2}, decode={"ep": 2})))
    try:
        prompts, n = [[5, 17, 99, 3], list(range(40, 60))], 12
        for ids in prompts:
            got = stack.generate(token_ids=ids, max_tokens=n, ignore_eos=True)
            assert got.token_ids == hf_greedy(reference, ids, n)
        # decode ran n - 1 steps per request (token 1 comes from prefill), top-2 routing
        expected_pairs = len(prompts) * (n - 1) * reference.config.num_experts_per_tok
        model_id = stack.workers()[0].model_id
        deadline, totals = time.time() + 10, None
        while time.time() < deadline:
            totals = [sum(int(v) for v in stack.redis.hgetall(f"cleave:experts:{model_id}:{layer}").values())
                      for layer in range(reference.config.num_hidden_layers)]
            if totals == [expected_pairs] * len(totals):
                break
            time.sleep(0.2)
        assert totals == [expected_pairs] * reference.config.num_hidden_layers
    finally:
        stack.close()
