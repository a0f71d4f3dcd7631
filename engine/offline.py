"""Offline greedy generation through the engine runtime (the model, the paged KV cache and the
one stage step of ``engine.runtime.rank``), without services.

Callers: tests, the benches and the GPU check.

- :func:`greedy_generate`: one rank, a loaded model (``engine.loader.load_model``). One prefill
  step over all prompts, then one batched decode step per new token over every unfinished
  sequence, optionally replayed from CUDA graphs. Blocks come from a trivial per-call allocator
  (``engine.batch.offline_block_tables``); the real allocator lives in ``engine.kv_cache``.
- :func:`rank_greedy_generate`: run on every rank (through ``engine.runtime.spawn.spawn_ranks``):
  loads the rank's shard and generates with ``engine.pipeline.PipelineRunner`` (TP x PP, micro-batched).
- :func:`parallel_greedy_generate`: the driver: spawns the ranks of a layout, returns the tokens
  and the last-position prefill logits (for parity checks against ``transformers``).
"""
from __future__ import annotations

import torch

from common.layout import ParallelConfig
from common.model import CacheConfig, ModelConfig
from engine.batch import ForwardBatch, offline_block_tables
from engine.parallel import ParallelGroups
from engine.runtime.cuda_graphs import DecodeGraphs
from engine.runtime.rank import stage_step


@torch.inference_mode()
def greedy_generate(model, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                    block_size: int = 16, stop_at_eos: bool = True, cuda_graphs: bool = False
                    ) -> list[list[int]]:
    """New tokens per prompt (argmax each step), the EOS token included when it stops one.

    The model may be on any device; ``cuda_graphs`` replays the decode steps from CUDA graphs
    when it is on CUDA (ignored elsewhere)."""
    per_seq, tables = offline_block_tables(config, prompts, max_new_tokens, block_size)
    device = next(model.parameters()).device
    num_blocks = per_seq * len(prompts)
    graphs = cuda_graphs and device.type == "cuda"
    kv = model.allocate_kv_cache(CacheConfig(block_size=block_size, num_blocks=num_blocks + int(graphs)),
                                 device=device)
    runner = DecodeGraphs(model, kv, len(prompts), block_size, num_blocks * block_size) if graphs else None
    single = ParallelGroups.single()
    eos = set(config.eos_token_ids) if stop_at_eos else set()

    def step(batch: ForwardBatch) -> list[int]:
        return stage_step(model, single, kv, batch.to(device), graphs=runner).argmax(-1).tolist()

    out = [[t] for t in step(ForwardBatch.prefill(prompts, tables, block_size))]
    live = [i for i in range(len(prompts)) if out[i][-1] not in eos]
    while live and len(out[live[0]]) < max_new_tokens:   # all live sequences have equal length
        batch = ForwardBatch.decode([out[i][-1] for i in live],
                                    [len(prompts[i]) + len(out[i]) - 1 for i in live],
                                    [tables[i] for i in live], block_size)
        for i, tok in zip(live, step(batch)):
            out[i].append(tok)
        live = [i for i in live if out[i][-1] not in eos]
    return out


def rank_greedy_generate(groups, spec_or_source, prompts: list[list[int]], max_new_tokens: int,
                         block_size: int = 16, micro_batching: bool = True,
                         stop_at_eos: bool = True, device: str = "cpu", dtype: str = "float32") -> dict:
    """One rank's part of a distributed greedy run: ``{"tokens": [[...], ...], "logits":
    Tensor [len(prompts), vocab] (CPU) on last-stage ranks else None, "rank": groups.rank}``."""
    from engine.loader import load_model
    from engine.pipeline import PipelineRunner

    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    _, model = load_model(spec_or_source, dtype, dev, groups)
    runner = PipelineRunner(model, groups, block_size=block_size, micro_batching=micro_batching)
    tokens, logits = runner.generate(prompts, max_new_tokens, stop_at_eos=stop_at_eos)
    return {"tokens": tokens, "logits": None if logits is None else logits.cpu(), "rank": groups.rank}


def parallel_greedy_generate(layout: ParallelConfig, spec_or_source, prompts: list[list[int]],
                             max_new_tokens: int, block_size: int = 16, micro_batching: bool = True,
                             stop_at_eos: bool = True, timeout_s: float = 300.0, device: str = "cpu",
                             dtype: str = "float32") -> tuple[list[list[int]], torch.Tensor]:
    """Spawn the ranks of ``layout`` (gloo on CPU, NCCL on CUDA), generate on all;
    ``(tokens, prefill logits)``. A divergence between ranks raises ``RuntimeError``."""
    from engine.runtime.spawn import spawn_ranks

    results = spawn_ranks(layout, rank_greedy_generate, spec_or_source, prompts, max_new_tokens,
                          block_size, micro_batching, stop_at_eos, device, dtype,
                          device=device, timeout_s=timeout_s)
    tokens = results[0]["tokens"]
    bad = [r["rank"] for r in results if r["tokens"] != tokens]
    if bad:
        raise RuntimeError(f"ranks {bad} generated different tokens than rank 0")
    return tokens, results[-1]["logits"]
