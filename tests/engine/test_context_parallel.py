"""Context-parallel prefill (ring attention, alone and with TP) equals one rank and ``transformers``.

Each CP rank of ``spawn_ranks`` runs the tiny random Llama over its own zigzag tokens
(``common.layout.cp_token_ranges``): a :class:`ForwardBatch` with their global positions and
their slots of one shared block table, so each rank writes only its tokens' KV. Checked:

- the last prompt position's logits (from the rank holding the last token) match
  ``transformers`` within the fp32 bound for the model's reduction length
  (``tests.tolerances``), and the greedy first token is equal;
- the KV each rank wrote for its tokens equals what a single-rank prefill writes there
  (its KV heads only, under TP), within the same bound: ring attention and TP sum in
  another order than one rank.
"""
from __future__ import annotations

import pytest
import torch

from common.layout import ParallelConfig, cp_token_ranges, kv_head_range
from engine.batch import ForwardBatch
from engine.loader import iter_weights, load_model_config, load_reference_model, resolve_model
from engine.model import LlamaForCausalLM
from engine.parallel import ParallelGroups
from engine.runtime.spawn import spawn_ranks
from tests.parity import assert_logits_close, reference_last_logits
from tests.tolerances import assert_close, model_reduction_length

BLOCK_SIZE = 8
PROMPTS = [[(7 * i + 3) % 256 for i in range(37)], [42]]     # 37: not a multiple of 2*cp; 1: empty ranks


cp_prefill_batch = ForwardBatch.prefill_cp


def load_rank_model(model_dir: str, groups: ParallelGroups):
    source = resolve_model(model_dir)
    config = load_model_config(source)
    model = LlamaForCausalLM(config, groups)
    model.load_weights(iter_weights(source, config, want=model.wants))
    return config, model.eval()


@torch.inference_mode()
def cp_prefill(groups: ParallelGroups, model_dir: str) -> list[dict]:
    """On one rank, per prompt: its positions, the KV it wrote there, last-token logits if held.

    Plain lists, not tensors: a tensor put on the result queue is shared through a file
    descriptor that vanishes when the rank process exits before the parent reads it."""
    config, model = load_rank_model(model_dir, groups)
    results = []
    for prompt in PROMPTS:
        table = list(range(-(-len(prompt) // BLOCK_SIZE)))
        batch = cp_prefill_batch(prompt, groups.cp_rank, groups.cp.size, table, BLOCK_SIZE)
        kv = torch.zeros(config.num_layers, 2, len(table), BLOCK_SIZE, model.num_local_kv_heads,
                         config.head_dim)
        logits = model(batch, kv)
        written = kv.flatten(2, 3)[:, :, batch.slot_mapping]          # [L, 2, T_local, KVH, D]
        results.append({"positions": batch.positions.tolist(), "kv": written.tolist(),
                        "logits": logits[0].tolist() if logits.shape[0] else None})
    return results


def single_rank_kv(model_dir: str, prompt: list[int]) -> torch.Tensor:
    """KV ``[L, 2, T, KVH, D]`` a one-rank prefill writes for every position of ``prompt``."""
    config, model = load_rank_model(model_dir, ParallelGroups.single())
    table = list(range(-(-len(prompt) // BLOCK_SIZE)))
    kv = torch.zeros(config.num_layers, 2, len(table), BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    with torch.inference_mode():
        model(ForwardBatch.prefill([prompt], [table], BLOCK_SIZE), kv)
    return kv.flatten(2, 3)[:, :, : len(prompt)]


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cp,tp", [(2, 1), (2, 2)])
def test_cp_prefill_matches_reference_and_single_rank_kv(tiny_llama_dir: str, cp: int, tp: int) -> None:
    layout = ParallelConfig(tp=tp, cp=cp)
    per_rank = spawn_ranks(layout, cp_prefill, tiny_llama_dir, timeout_s=150)
    ref = load_reference_model(tiny_llama_dir)
    config = load_model_config(resolve_model(tiny_llama_dir))
    num_kv_heads = config.num_kv_heads
    for i, prompt in enumerate(PROMPTS):
        want_kv = single_rank_kv(tiny_llama_dir, prompt)
        holders = [r for r in per_rank if r[i]["logits"] is not None]
        assert len(holders) == tp, f"layout {layout}: last token's logits on {len(holders)} ranks"
        want = reference_last_logits(ref, prompt)
        for r in holders:
            got = torch.tensor(r[i]["logits"])
            assert_logits_close(got, want, config, len(prompt))   # includes: greedy first token equal
        for rank, results in enumerate(per_rank):
            lo, hi = kv_head_range(rank % tp, tp, num_kv_heads)
            pos = results[i]["positions"]
            got_kv = torch.tensor(results[i]["kv"]).reshape(*want_kv.shape[:2], len(pos), hi - lo, want_kv.shape[-1])
            # k: the whole model's path, a bound for every layer's K/V
            assert_close(got_kv, want_kv[:, :, pos, lo:hi], k=model_reduction_length(config, len(prompt)),
                         msg=f"layout {layout} rank {rank} prompt {i}")
