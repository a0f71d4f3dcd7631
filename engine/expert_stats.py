"""Expert-load counters of MoE models, written to Redis in batches (DESIGN §7).

Who calls what: the decode instance's stage leaders (the rank with ``tp_rank == ep_rank == 0``
of each pipeline stage, whose ``MixtralForCausalLM.expert_counts()`` covers that stage's
layers; every rank of an EP group counts the same tokens, so one rank per stage suffices) own
one :class:`ExpertStatsWriter` and call :meth:`ExpertStatsWriter.on_step` after every decode
step (or :meth:`flush` directly). Every ``every_n_steps`` steps it sends ONE Redis pipeline of
``HINCRBY`` commands, never one per token.

Schema: ``<prefix>experts:<model>:<layer>`` is a HASH ``expert_id -> routed token count``
(cumulative since the model started serving; ``layer`` is the global layer index). The model's
counters are cumulative too, so the writer remembers what it sent and adds only the increments
``counts - last_flushed``: several instances serving the same model add into the same hashes,
and a restarted instance starts from zero without clobbering them.
"""
from __future__ import annotations

from typing import Callable

import torch


class ExpertStatsWriter:
    """Batches per-expert routed-token counts into Redis hashes (sync ``redis.Redis`` client)."""

    def __init__(self, redis_client, model_id: str, prefix: str = "cleave:", every_n_steps: int = 16):
        if not model_id or ":" in model_id:
            raise ValueError(f"model_id must be non-empty and free of ':', got {model_id!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.redis, self.model_id, self.prefix = redis_client, model_id, prefix
        self.every_n_steps = every_n_steps
        self._steps = 0
        self._sent: dict[int, torch.Tensor] = {}    # layer -> cumulative counts already written

    def key(self, layer: int) -> str:
        return f"{self.prefix}experts:{self.model_id}:{layer}"

    def on_step(self, counts: Callable[[], dict[int, torch.Tensor]]) -> int:
        """Count one engine step; every ``every_n_steps`` steps flush ``counts()``. Returns the
        number of hash fields incremented (0 on steps that do not flush)."""
        self._steps += 1
        return self.flush(counts()) if self._steps % self.every_n_steps == 0 else 0

    def flush(self, counts_by_layer: dict[int, torch.Tensor]) -> int:
        """Write the increments since the last flush, ``HINCRBY key expert delta`` for every
        non-zero delta, in one pipeline. ``counts_by_layer``: global layer -> cumulative int
        counts ``[num_experts]``. Returns the number of fields incremented. The remembered
        totals move only after Redis accepted the pipeline, so a failed flush is retried whole
        by the next one."""
        pipe = self.redis.pipeline(transaction=True)
        sent, fields = {}, 0
        for layer, counts in sorted(counts_by_layer.items()):
            now = counts.detach().to("cpu", torch.int64).reshape(-1)
            before = self._sent.get(layer, torch.zeros_like(now))
            if before.shape != now.shape:
                raise ValueError(f"layer {layer}: {now.numel()} expert counts, {before.numel()} before")
            delta = now - before
            if bool((delta < 0).any()):
                raise ValueError(f"layer {layer}: counts went down ({before.tolist()} -> {now.tolist()}); "
                                 f"the counters must be cumulative")
            for expert in delta.nonzero().flatten().tolist():
                pipe.hincrby(self.key(layer), str(expert), int(delta[expert]))
                fields += 1
            sent[layer] = now.clone()
        if fields:
            pipe.execute()
        self._sent.update(sent)
        return fields
