"""Prefill with context (prefix caching, issue 21): a prompt whose leading whole blocks are
already in the KV cache computes only the rest (``Executor.prefill(..., num_cached=k)``).

Prompt A is prefilled whole into its blocks; prompt B shares A's first ``CACHED`` tokens, so
its block table reuses A's leading block ids and only B's tail is prefilled, attending to the
cached prefix through the paged cache. Its last-position logits must be within the fp32 bound
of ``tests.tolerances`` of a full prefill of B on the same layout (a different attention
kernel: never bit for bit), and greedy decoding from there must give ``transformers``' tokens
exactly (``tests.parity.reference_greedy`` checks every step's margin, so that is sound on any
CPU). One rank in process, TP 2 and PP 2 on local gloo ranks; the batch layout, the argument
checks, and the fake executor (whose token reads the cached prefix back from the cache).
"""
from __future__ import annotations

import pytest
import torch

from common.layout import ParallelConfig
from engine.batch import ForwardBatch, check_num_cached
from engine.runtime.config import RuntimeConfig
from tests.parity import reference_greedy
from tests.tolerances import assert_close, model_reduction_length

BLOCK = 8
CACHED = 2 * BLOCK                                      # B's tokens already cached (A's first two blocks)
PROMPT_A = [5, 17, 33, 2, 101, 7, 9, 64, 3, 12, 250, 8, 8, 1, 30, 2, 7, 11, 4, 4, 4, 9, 1, 77, 40]
PROMPT_B = PROMPT_A[:CACHED] + [90, 91, 13, 200, 6, 6, 31, 140, 2, 19, 55]
NEW_TOKENS = 8
# block ids, scattered: B's context table reuses A's two leading blocks
BLOCKS_A = [5, 2, 9, 4]
BLOCKS_B_CTX = BLOCKS_A[:2] + [11, 7, 14]
BLOCKS_B_FULL = [13, 1, 15, 3, 10]


def _config(model_dir: str, layout: ParallelConfig | None = None) -> RuntimeConfig:
    return RuntimeConfig(model=model_dir, device="cpu", dtype="float32", transport="tcp",
                         num_blocks=24, block_size=BLOCK, threads=1,
                         **({"parallel": layout} if layout else {}))


def _greedy(ex, first: torch.Tensor, prompt: list[int], blocks: list[int]) -> list[int]:
    """``NEW_TOKENS`` greedy tokens: the prefill's argmax, then decode steps over ``blocks``."""
    tokens = [int(first.argmax())]
    for step in range(NEW_TOKENS - 1):
        batch = ForwardBatch.decode([tokens[-1]], [len(prompt) + step], [blocks], BLOCK)
        tokens.append(int(ex.forward(batch)[0].argmax()))
    return tokens


def run_cached_vs_full(ex) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """``(B's logits with context, B's logits of a full prefill, greedy tokens of each)``."""
    ex.prefill(PROMPT_A, BLOCKS_A)
    cached = ex.prefill(PROMPT_B, BLOCKS_B_CTX, num_cached=CACHED).logits[0]
    full = ex.prefill(PROMPT_B, BLOCKS_B_FULL).logits[0]
    return (cached, full, _greedy(ex, cached, PROMPT_B, BLOCKS_B_CTX),
            _greedy(ex, full, PROMPT_B, BLOCKS_B_FULL))


def check(model_dir: str, got) -> None:
    from engine.loader import load_model_config, load_reference_model, resolve_model

    cached, full, cached_tokens, full_tokens = got
    config = load_model_config(resolve_model(model_dir))
    assert_close(cached, full, k=model_reduction_length(config, len(PROMPT_B)))
    want = reference_greedy(load_reference_model(model_dir), PROMPT_B, NEW_TOKENS)
    assert cached_tokens == want
    assert full_tokens == want


# ---- the batch -------------------------------------------------------------------------------
@pytest.mark.unit
def test_context_batch_holds_only_the_new_tokens():
    prompts, tables = [list(range(10, 21)), list(range(30, 35))], [[3, 0], [1]]
    batch = ForwardBatch.prefill(prompts, tables, 8, num_cached=[8, 0])
    assert batch.has_context and batch.is_prefill
    assert batch.input_ids.tolist() == prompts[0][8:] + prompts[1]
    assert batch.positions.tolist() == [8, 9, 10, 0, 1, 2, 3, 4]
    assert batch.slot_mapping.tolist() == [0, 1, 2, 8, 9, 10, 11, 12]   # block 0 of prompt 0, block 1
    assert batch.cu_seqlens.tolist() == [0, 3, 8]
    assert batch.logits_indices.tolist() == [2, 7]
    assert batch.block_tables.dtype == torch.int32 and batch.block_tables.tolist() == [[3, 0], [1, 0]]
    assert batch.context_lens.dtype == torch.int32 and batch.context_lens.tolist() == [11, 5]


@pytest.mark.unit
def test_nothing_cached_is_todays_batch():
    prompts, tables = [list(range(10, 21)), list(range(30, 35))], [[3, 0], [1]]
    today = ForwardBatch.prefill(prompts, tables, 8)
    for zero in (None, [0, 0]):
        batch = ForwardBatch.prefill(prompts, tables, 8, num_cached=zero)
        assert not batch.has_context and batch.block_tables is None and batch.context_lens is None
        for name in ("input_ids", "positions", "slot_mapping", "logits_indices", "cu_seqlens"):
            assert torch.equal(getattr(batch, name), getattr(today, name)), name   # same ops: exact


@pytest.mark.unit
def test_cached_prefix_checks_quote_the_values():
    check_num_cached(9, 0, 8, prompt_logprobs=2, cp=2)           # nothing cached: always fine
    check_num_cached(9, 8, 8)
    for n, c in ((9, 4), (8, 8), (9, 16), (9, -8)):
        with pytest.raises(ValueError, match=f"num_cached={c}"):
            check_num_cached(n, c, 8)
    with pytest.raises(ValueError, match="prompt_logprobs=0"):
        check_num_cached(9, 8, 8, prompt_logprobs=0)
    with pytest.raises(ValueError, match="cp=2"):
        check_num_cached(9, 8, 8, cp=2)
    with pytest.raises(ValueError, match="num_cached=5 for a 5-token prompt"):
        ForwardBatch.prefill([[1, 2, 3, 4, 5]], [[0]], 8, num_cached=[5])


# ---- the fake executor -----------------------------------------------------------------------
@pytest.mark.unit
def test_fake_prefill_with_context_reads_the_cached_prefix():
    from engine.runtime.fake import FakeExecutor, tiny_config

    with FakeExecutor(_config("fake"), model_config=tiny_config()) as ex:
        ex.prefill(PROMPT_A, BLOCKS_A)
        vocab = ex.model_config.vocab_size
        want = FakeExecutor.expected(PROMPT_B, 1, vocab)[0]
        assert int(ex.prefill(PROMPT_B, BLOCKS_B_FULL).logits.argmax()) == want
        assert int(ex.prefill(PROMPT_B, BLOCKS_B_CTX, num_cached=CACHED).logits.argmax()) == want
        # a cached prefix that is not there (blocks never written: zeros) changes the token
        wrong = ex.prefill(PROMPT_B, [20, 21, 11, 7], num_cached=CACHED).logits.argmax()
        assert int(wrong) != want
        with pytest.raises(ValueError, match="prompt_logprobs"):
            ex.prefill(PROMPT_B, BLOCKS_B_CTX, prompt_logprobs=0, num_cached=CACHED)


# ---- the real model --------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_one_rank_cached_prefix_matches_full_prefill(tiny_llama_dir):
    from engine.runtime.executor import InProcessExecutor

    with InProcessExecutor(_config(tiny_llama_dir)) as ex:
        got = run_cached_vs_full(ex)
        for bad in (dict(num_cached=4), dict(num_cached=len(PROMPT_B)),
                    dict(num_cached=CACHED, prompt_logprobs=1)):
            with pytest.raises(ValueError):
                ex.prefill(PROMPT_B, BLOCKS_B_CTX, **bad)
    check(tiny_llama_dir, got)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [ParallelConfig(tp=2), ParallelConfig(pp=2)], ids=["tp2", "pp2"])
def test_layout_cached_prefix_matches_full_prefill(tiny_llama_dir, layout):
    from engine.runtime.executor import LocalExecutor

    with LocalExecutor(_config(tiny_llama_dir, layout)) as ex:
        got = run_cached_vs_full(ex)
    check(tiny_llama_dir, got)
