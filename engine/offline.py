"""Offline greedy generation straight through the engine model and a paged KV cache.

Callers: tests and the bench (and later layout tests: TP/PP/CP runners expose the same
``model(batch, kv_cache)`` call). One prefill step over all prompts, then one batched decode
step per new token over every unfinished sequence. Blocks are handed out by a trivial
per-call allocator (sequence ``i`` owns a contiguous run of blocks); the real allocator lives
in ``engine.kv_cache``.
"""
from __future__ import annotations

import torch

from engine.batch import ForwardBatch
from engine.config import ModelConfig


@torch.inference_mode()
def greedy_generate(model, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                    block_size: int = 16, stop_at_eos: bool = True) -> list[list[int]]:
    """New tokens per prompt (argmax each step), the EOS token included when it stops one."""
    if not prompts or any(not p for p in prompts):
        raise ValueError(f"need at least one prompt and no empty prompts, got lengths {[len(p) for p in prompts]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > config.max_position:
        raise ValueError(f"prompt + new tokens = {longest} exceeds max_position={config.max_position}")
    per_seq = -(-longest // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    param = next(model.parameters())
    kv = torch.zeros(config.num_layers, 2, per_seq * len(prompts), block_size, config.num_kv_heads,
                     config.head_dim, dtype=param.dtype, device=param.device)
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
