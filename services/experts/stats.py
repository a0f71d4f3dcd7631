"""Expert-load counters of MoE models, written to Redis in batches (DESIGN §7).

Who calls what: each MoE decode instance (``services.experts.instance``) owns one
:class:`ExpertStatsWriter` on its rank 0 and calls :meth:`ExpertStatsWriter.flush` about once a
second with the counts ``Executor.expert_counts()`` gathers from the stage leaders (the rank with
``tp_rank == ep_rank == 0`` of each pipeline stage; every rank of an EP group counts the same
tokens). Each flush is ONE Redis pipeline of ``HINCRBY`` commands, never one per token;
:meth:`ExpertStatsWriter.on_step` batches by step count instead, for a caller that steps itself.

Schema (DESIGN §7 and beside it):

- ``<prefix>experts:<model>:<layer>`` — HASH ``expert_id -> routed token count``, cumulative
  since the model started serving (``layer`` is the global layer index). Unchanged by the
  windowed counters.
- ``<prefix>experts-window:<model>:<t0>`` — HASH ``<layer>:<expert_id> -> routed token count``
  routed during the time bucket ``[t0, t0 + interval_s)`` (``t0`` unix seconds, a multiple of
  ``interval_s``). The writer sets ``EXPIREAT t0 + interval_s + window_s`` in the same pipeline,
  so Redis itself drops a bucket once it has left the window. :func:`read_window` sums the
  buckets with ``t0 > now - window_s``.

The model's counters are cumulative too, so the writer remembers what it sent and adds only
the increments ``counts - last_flushed`` to both: several instances serving the same model add
into the same hashes and buckets (the pool's load is one view), and a restarted instance starts
from zero without clobbering them.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def stats_model_id(model_id: str) -> str:
    """A model's name in the expert-statistics and placement keys (``:`` replaced by ``_``)."""
    return model_id.replace(":", "_")


def window_key(prefix: str, model_id: str, t0: int | str) -> str:
    """The bucket of ``model_id`` starting at unix second ``t0`` (``"*"``: a SCAN pattern)."""
    return f"{prefix}experts-window:{model_id}:{t0}"


def read_window(client, prefix: str, model_id: str, num_experts: int, window_s: float,
                now: float | None = None, interval_s: int = 0) -> dict[int, list[int]]:
    """Routed tokens per expert over the last ``window_s`` seconds, summed over every writer:
    ``{layer: [count per expert]}`` (layers with no bucket are absent). Sync ``redis.Redis``
    client with decoded responses; fields naming an expert outside ``[0, num_experts)`` are
    ignored. With the writers' ``interval_s`` the bucket keys are computed (one HGETALL each,
    ``window_s / interval_s + 1`` of them); without it (0) they are found with SCAN, which
    walks the whole keyspace."""
    now = time.time() if now is None else now
    if interval_s:
        last = int(now) // interval_s * interval_s
        starts = range(last, int(now - window_s), -interval_s)
        keys = [window_key(prefix, model_id, t0) for t0 in starts if now - window_s < t0]
    else:
        keys = []
        for key in client.scan_iter(match=window_key(prefix, model_id, "*"), count=500):
            try:
                t0 = int(key.rsplit(":", 1)[1])
            except ValueError:
                continue
            if now - window_s < t0 <= now:
                keys.append(key)
    out: dict[int, list[int]] = {}
    if not keys:
        return out
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    for bucket in pipe.execute():
        for field, value in (bucket or {}).items():
            layer, _, expert = field.partition(":")
            if layer.isdigit() and expert.isdigit() and int(expert) < num_experts:
                out.setdefault(int(layer), [0] * num_experts)[int(expert)] += int(value)
    return out


class ExpertStatsWriter:
    """Batches per-expert routed-token counts into Redis hashes (sync ``redis.Redis`` client)."""

    def __init__(self, redis_client, model_id: str, prefix: str = "cleave:", every_n_steps: int = 16,
                 interval_s: int = 10, window_s: float = 300.0, clock: Callable[[], float] = time.time):
        if not model_id or ":" in model_id:
            raise ValueError(f"model_id must be non-empty and free of ':', got {model_id!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if int(interval_s) != interval_s or interval_s < 1 or window_s < interval_s:
            raise ValueError(f"need a whole interval_s >= 1 and window_s >= interval_s, got "
                             f"interval_s={interval_s} window_s={window_s}")
        self.redis, self.model_id, self.prefix = redis_client, model_id, prefix
        self.every_n_steps = every_n_steps
        self.interval_s, self.window_s, self.clock = int(interval_s), float(window_s), clock
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
        non-zero delta into the cumulative hash and into the current time bucket, in one
        pipeline. ``counts_by_layer``: global layer -> cumulative int counts
        ``[num_experts]`` (a tensor or a list). Returns the number of cumulative fields incremented. The remembered
        totals move only after Redis accepted the pipeline, so a failed flush is retried whole
        by the next one (its tokens then land in the bucket of the retry)."""
        t0 = int(self.clock()) // self.interval_s * self.interval_s
        bucket = window_key(self.prefix, self.model_id, t0)
        pipe = self.redis.pipeline(transaction=True)
        sent, fields = {}, 0
        for layer, counts in sorted(counts_by_layer.items()):
            now = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
            before = self._sent.get(layer, torch.zeros_like(now))
            if before.shape != now.shape:
                raise ValueError(f"layer {layer}: {now.numel()} expert counts, {before.numel()} before")
            delta = now - before
            if bool((delta < 0).any()):
                raise ValueError(f"layer {layer}: counts went down ({before.tolist()} -> {now.tolist()}); "
                                 f"the counters must be cumulative")
            for expert in delta.nonzero().flatten().tolist():
                pipe.hincrby(self.key(layer), str(expert), int(delta[expert]))
                pipe.hincrby(bucket, f"{layer}:{expert}", int(delta[expert]))
                fields += 1
            sent[layer] = now.clone()
        if fields:
            pipe.expireat(bucket, t0 + self.interval_s + int(self.window_s + 0.999))
            pipe.execute()
        self._sent.update(sent)
        return fields
