"""Offline greedy generation straight through the engine model and a paged KV cache.

Callers: tests and the bench.

- :func:`greedy_generate`: one rank, a loaded model. One prefill step over all prompts, then
  one batched decode step per new token over every unfinished sequence. Blocks are handed out
  by a trivial per-call allocator (sequence ``i`` owns a contiguous run of blocks); the real
  allocator lives in ``engine.kv_cache``.
- :func:`load_model_shard`: on one rank of an instance, build and load that rank's shard
  (only its stage's tensors are read, each layer keeps its TP slice).
- :func:`rank_greedy_generate`: run on every rank (e.g. through ``engine.parallel.spawn_ranks``):
  loads the shard and generates with ``engine.pipeline.PipelineRunner`` (TP x PP, micro-batched).
- :func:`parallel_greedy_generate`: the driver: spawns the ranks of a layout, returns the tokens
  and the last-position prefill logits (for parity checks against ``transformers``).
"""
from __future__ import annotations

import torch

from engine.batch import ForwardBatch
from engine.config import CacheConfig, ModelConfig, ParallelConfig


def offline_block_tables(config: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                         block_size: int) -> tuple[int, list[list[int]]]:
    """Validate an offline run and give each prompt its own contiguous blocks:
    ``(blocks per sequence, block table per prompt)``. Shared by the single-rank and pipeline runners."""
    if not prompts or any(not p for p in prompts):
        raise ValueError(f"need at least one prompt and no empty prompts, got lengths {[len(p) for p in prompts]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > config.max_position:
        raise ValueError(f"prompt + new tokens = {longest} exceeds max_position={config.max_position}")
    per_seq = -(-longest // block_size)
    return per_seq, [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]


@torch.inference_mode()
def greedy_generate(model, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                    block_size: int = 16, stop_at_eos: bool = True) -> list[list[int]]:
    """New tokens per prompt (argmax each step), the EOS token included when it stops one."""
    per_seq, tables = offline_block_tables(config, prompts, max_new_tokens, block_size)
    param = next(model.parameters())
    kv = model.allocate_kv_cache(CacheConfig(block_size=block_size, num_blocks=per_seq * len(prompts)),
                                 device=param.device)
    eos = set(config.eos_token_ids) if stop_at_eos else set()

    logits = model(_to(ForwardBatch.prefill(prompts, tables, block_size), param.device), kv)
    out = [[t] for t in logits.argmax(-1).tolist()]
    live = [i for i in range(len(prompts)) if out[i][-1] not in eos]
    while live and len(out[live[0]]) < max_new_tokens:   # all live sequences have equal length
        batch = ForwardBatch.decode([out[i][-1] for i in live],
                                    [len(prompts[i]) + len(out[i]) - 1 for i in live],
                                    [tables[i] for i in live], block_size)
        for i, tok in zip(live, model(_to(batch, param.device), kv).argmax(-1).tolist()):
            out[i].append(tok)
        live = [i for i in live if out[i][-1] not in eos]
    return out


def _to(batch: ForwardBatch, device: torch.device) -> ForwardBatch:
    if device.type == "cpu":
        return batch
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
    return batch


def load_model_shard(groups, spec_or_source, dtype: str = "float32"):
    """``(ModelConfig, model shard)`` of this rank (dense Llama or Mixtral, ``engine.moe.build_model``),
    only this rank's weights read, eval mode. Raises ``ValueError`` (quoting the values) when the
    layout cannot split the model. Used offline and by ``services.instance`` for serving.
    """
    from engine import gguf_loader
    from engine.loader import _as_source, iter_weights, load_model_config
    from engine.moe import build_model

    source = _as_source(spec_or_source)
    reader = gguf_loader.open_reader(source.path) if source.kind == "gguf" else None
    config = load_model_config(source, reader).replace(dtype=dtype)
    model = build_model(config, groups)
    model.load_weights(iter_weights(source, config, want=model.wants, reader=reader))
    return config, model.eval()


def rank_greedy_generate(groups, spec_or_source, prompts: list[list[int]], max_new_tokens: int,
                         block_size: int = 16, micro_batching: bool = True,
                         stop_at_eos: bool = True) -> dict:
    """One rank's part of a distributed greedy run: ``{"tokens": [[...], ...], "logits":
    Tensor [len(prompts), vocab] on last-stage ranks else None, "rank": groups.rank}``."""
    from engine.pipeline import PipelineRunner

    torch.manual_seed(0)
    _, model = load_model_shard(groups, spec_or_source)
    runner = PipelineRunner(model, groups, block_size=block_size, micro_batching=micro_batching)
    tokens, logits = runner.generate(prompts, max_new_tokens, stop_at_eos=stop_at_eos)
    return {"tokens": tokens, "logits": logits, "rank": groups.rank}


def parallel_greedy_generate(layout: ParallelConfig, spec_or_source, prompts: list[list[int]],
                             max_new_tokens: int, block_size: int = 16, micro_batching: bool = True,
                             stop_at_eos: bool = True, timeout_s: float = 300.0
                             ) -> tuple[list[list[int]], torch.Tensor]:
    """Spawn the ranks of ``layout`` (gloo), generate on all; ``(tokens, prefill logits)``.

    Checks that every rank produced the same tokens (a divergence raises ``RuntimeError``).
    """
    from engine.parallel import spawn_ranks

    results = spawn_ranks(layout, rank_greedy_generate, spec_or_source, prompts, max_new_tokens,
                          block_size, micro_batching, stop_at_eos, timeout_s=timeout_s)
    tokens = results[0]["tokens"]
    bad = [r["rank"] for r in results if r["tokens"] != tokens]
    if bad:
        raise RuntimeError(f"ranks {bad} generated different tokens than rank 0")
    return tokens, results[-1]["logits"]
