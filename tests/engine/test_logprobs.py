"""Logprobs: the engine's entries against ``transformers``, through every executor kind, and the
router's path for them (first token from prefill, the rest from decode, kept across a failover).

The reference is ``log_softmax`` of ``transformers``' fp32 logits of the same weights at each
position. Two code paths compute those logits, so values compare within the fp32 bound of
``tests.tolerances`` for the model's reduction length: a logit is off by at most ``atol``, and
``log_softmax(x)_i = x_i - logsumexp(x)`` moves by at most twice that. Top-k id lists compare
equal where the k-th and (k+1)-th values are further apart than the bound.
"""
from __future__ import annotations

import asyncio
import math

import pytest
import torch

from cleave.v1 import inference_pb2 as pb
from engine.logprobs import TokenLogprob, assemble_prompt_logprobs, logprobs_of, prompt_logprobs_of
from engine.runtime.fake import PEAK
from tests.parity import reference_logprobs

PROMPT = [5, 17, 33, 2, 101, 7, 9, 64, 3, 12, 250, 8, 8, 1, 77]


def assert_entry_matches(entry: TokenLogprob, want_row: torch.Tensor, k: int, tol: float) -> None:
    assert entry.logprob == pytest.approx(float(want_row[entry.token_id]), abs=tol)
    values, ids = torch.topk(want_row, k + 1)
    assert [v for _, v in entry.top] == pytest.approx(values[:k].tolist(), abs=tol)
    for i in range(k):  # ids equal where the neighbours are not near-tied
        if (i == 0 or values[i - 1] - values[i] > 2 * tol) and values[i] - values[i + 1] > 2 * tol:
            assert entry.top[i][0] == int(ids[i])


# ---- the pure functions --------------------------------------------------------------------------

@pytest.mark.unit
def test_logprobs_of_is_log_softmax_with_the_chosen_token_and_top_k():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 4
    chosen = [7, int(logits[1].argmin()), 0]                       # one chosen token far outside the top
    out = logprobs_of(logits, chosen, 4)
    want = torch.log_softmax(logits, -1)
    for row, (entry, tok) in enumerate(zip(out, chosen)):
        assert entry.token_id == tok and entry.logprob == pytest.approx(float(want[row, tok]), abs=1e-6)
        assert [t for t, _ in entry.top] == torch.topk(want[row], 4).indices.tolist()
        assert all(a[1] >= b[1] for a, b in zip(entry.top, entry.top[1:]))
    assert all(e.top == () for e in logprobs_of(logits, chosen, 0))
    assert math.fsum(math.exp(v) for v in want[0].tolist()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0..20"):
        logprobs_of(logits, chosen, 21)
    with pytest.raises(ValueError, match="N chosen"):
        logprobs_of(logits, chosen[:2], 1)


@pytest.mark.unit
def test_prompt_logprobs_assemble_the_same_from_split_positions():
    """Rows split across ranks in any order (context parallelism) give the one-rank answer."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(PROMPT), 40, generator=gen)
    prompt = [t % 40 for t in PROMPT]
    whole = assemble_prompt_logprobs(prompt, [prompt_logprobs_of(logits, list(range(len(prompt))), prompt, 2)])
    assert whole[0] == TokenLogprob(prompt[0], None) and len(whole) == len(prompt)
    split = [[0, 1, 2, 12, 13, 14], [3, 4, 5, 9, 10, 11], [6, 7, 8]]
    parts = [prompt_logprobs_of(logits[pos], pos, prompt, 2) for pos in split]
    assert assemble_prompt_logprobs(prompt, parts[::-1]) == whole
    with pytest.raises(ValueError, match="missing"):
        assemble_prompt_logprobs(prompt, parts[:2])


# ---- executors against transformers ----------------------------------------------------------------

def _runtime(model_dir: str, **layout):
    from common.layout import ParallelConfig
    from engine.runtime.config import RuntimeConfig
    return RuntimeConfig(model=model_dir, device="cpu", transport="tcp", num_blocks=16, block_size=8, threads=1,
                         parallel=ParallelConfig(**layout))


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_prompt_logprobs_equal_transformers_on_one_rank_and_context_parallel(tiny_llama_dir):
    """One rank in process and CP2 (two ranks, each with its own positions, merged on rank 0)."""
    from engine.runtime.executor import InProcessExecutor, LocalExecutor
    want, tol = reference_logprobs(tiny_llama_dir, PROMPT)
    blocks = [0, 1]
    with InProcessExecutor(_runtime(tiny_llama_dir)) as one:
        plain = one.prefill(PROMPT, blocks)
        out = one.prefill(PROMPT, blocks, prompt_logprobs=3)
    with LocalExecutor(_runtime(tiny_llama_dir, cp=2)) as cp:
        split = cp.prefill(PROMPT, blocks, prompt_logprobs=3)
    assert plain.prompt_logprobs is None
    for res in (out, split):
        torch.testing.assert_close(res.logits, plain.logits, rtol=0, atol=tol / 2)
        assert [e.token_id for e in res.prompt_logprobs] == PROMPT and res.prompt_logprobs[0].logprob is None
        for i, entry in enumerate(res.prompt_logprobs[1:], start=1):
            assert_entry_matches(entry, want[i - 1], 3, tol)


# ---- the router's path, on fake workers ------------------------------------------------------------

def _peaked(vocab: int) -> float:
    """The fake model's log-probability of its predicted token (PEAK against zeros)."""
    return PEAK - math.log(math.exp(PEAK) + vocab - 1)


@pytest.mark.integration
def test_every_token_keeps_its_logprob_through_a_decode_failover(redis_url):
    """Token 1's entry comes from prefill, the rest from decode; after decode-0 dies mid-stream
    the retry continues with entries for exactly the tokens not yet sent."""
    import threading

    from tests.fake_stack import FakeStack

    async def main():
        async with FakeStack(redis_url, prefill=1, decode=2, max_attempts=3) as stack:
            gate = threading.Event()
            stack.executor("decode", 0).fail_after(5, RuntimeError("decode-0 died"), gate)
            prompt, n = [3, 1, 4, 1, 5], 14
            out = await stack.generate(prompt, n, request_id="lp-failover", logprobs=True, top_logprobs=2,
                                       prompt_logprobs=True,
                                       on_tokens=lambda ids: len(ids) >= 6 and gate.set())
            assert out.error is None and out.token_ids == stack.expected(prompt, n)
            assert out.record["attempts"] == "2"
            entries = [e for m in out.messages for e in m.logprobs]
            assert [e.token_id for e in entries] == out.token_ids
            for e in entries:
                assert e.logprob == pytest.approx(_peaked(stack.model.vocab_size), abs=1e-5)
                assert e.top[0].token_id == e.token_id and len(e.top) == 2
            lead = out.messages[0].prompt_logprobs
            assert [e.token_id for e in lead] == prompt and not lead[0].HasField("logprob")
            assert all(not m.prompt_logprobs for m in out.messages[1:])      # the retry asked none
            want = stack.expected(prompt[:1], 1)[0]
            assert lead[1].top[0].token_id == want                           # token 0 predicts this
            assert await stack.settle() == {k: (t, t) for k, (_, t) in stack.free_blocks().items()}

    asyncio.run(main())


@pytest.mark.integration
def test_max_tokens_zero_scores_the_prompt_only(redis_url):
    from tests.fake_stack import FakeStack

    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1) as stack:
            out = await stack.generate([9, 8, 7, 6], 0, prompt_logprobs=True, top_logprobs=1)
            assert out.error is None and out.token_ids == [] and len(out.messages) == 1
            msg = out.messages[0]
            assert msg.finish_reason == pb.FINISH_REASON_LENGTH and msg.usage.completion_tokens == 0
            assert [e.token_id for e in msg.prompt_logprobs] == [9, 8, 7, 6]
            assert out.record["state"] == "finished" and out.record.get("decode_worker", "") == ""
            refused = await stack.generate([9, 8], 0)
            assert "0 only with prompt_logprobs" in str(refused.error)
            for bad, match in ((dict(logprobs=True, top_logprobs=21), "0..20"),
                               (dict(top_logprobs=3), "needs sampling.logprobs")):
                out = await stack.generate([1, 2], 2, **bad)
                assert match in str(out.error)
            assert await stack.settle() == {k: (t, t) for k, (_, t) in stack.free_blocks().items()}

    asyncio.run(main())
