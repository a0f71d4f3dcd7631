"""One instance = a group of ranks; the service process is rank 0 and drives the others.

Who calls what:

* The prefill/decode services call :class:`Instance` only: ``forward(batch)`` (logits for the
  batch, on rank 0), ``expect / try_land / cancel`` (decode: KV receives on every rank),
  ``push`` (prefill: every rank sends its own KV shard), ``addresses()`` (every rank's
  transport address, for landing descriptors).
* With one rank, :class:`Instance` runs everything in-process. With more, rank 0 spawns ranks
  1..N-1 (:func:`_rank_main`), all join ``torch.distributed`` (gloo; rendezvous on a free
  port) and each command is broadcast by rank 0, executed by every rank's :class:`RankEngine`
  and the results gathered back. Commands are serialised by one lock, so every rank sees
  them in the same order. Nothing long blocks the channel: landing is polled
  (``try_land``), never waited on.
* A watchdog on rank 0 notices a rank that died and calls ``on_failure``; the service then
  reports NOT_SERVING, deregisters and exits, and the remaining ranks die with it
  (``PR_SET_PDEATHSIG`` in each rank, terminate on shutdown).

Every rank holds the same number of KV blocks (block ids are chosen on rank 0 and valid on
all ranks); a rank's cache holds only its KV heads and its pipeline stage's layers.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cleave.v1 import inference_pb2, worker_pb2
from common.config import WorkerConfig
from engine.batch import ForwardBatch
from engine.config import CacheConfig, ModelConfig
from engine.layout import kv_head_range, layer_range
from engine.loader import ModelSource, load_model_config, resolve_model
from engine.parallel import ParallelGroups, join_group, rendezvous_store
from kvtransfer.handoff import KVReceiver, KVSender, compat_hash
from kvtransfer.transport import make_transport
from services.parent_guard import die_with_parent

log = logging.getLogger(__name__)


def build_rank_model(source: ModelSource, dtype: str, groups: ParallelGroups):
    """(ModelConfig, this rank's shard: dense Llama or Mixtral) with only its weights read."""
    from engine.offline import load_model_shard
    return load_model_shard(groups, source, dtype)


class RankEngine:
    """Model shard, KV cache, transport and handoff endpoints of one rank."""

    def __init__(self, cfg: WorkerConfig, groups: ParallelGroups) -> None:
        self.cfg, self.groups = cfg, groups
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.source = resolve_model(cfg.model)
        self.model_config, self.model = build_rank_model(self.source, cfg.dtype, groups)
        m, p = self.model_config, cfg.parallel
        self.heads = kv_head_range(groups.tp_rank, p.tp, m.num_kv_heads)
        self.layers = layer_range(groups.pp_rank, p.pp, m.num_layers)
        cache = CacheConfig(block_size=cfg.block_size, num_blocks=cfg.num_blocks,
                            memory_bytes=cfg.kv_cache_bytes)
        self.num_blocks = cache.blocks_for(m)  # from the whole model: identical on every rank
        self.kv_cache = self.model.allocate_kv_cache(CacheConfig(block_size=cfg.block_size,
                                                                 num_blocks=self.num_blocks))
        self.transport = make_transport(cfg.transport, host=cfg.host)  # listens on cfg.host only
        self.compat = compat_hash(self.source.model_id, m, cfg.block_size)
        self.layout = inference_pb2.Layout(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)
        self.receiver = KVReceiver(self.transport, self.kv_cache, m, self.layout, rank=groups.rank,
                                   layer_offset=self.layers[0], head_offset=self.heads[0])
        self.sender = KVSender(self.transport, m, self.compat, self.layout, rank=groups.rank,
                               head_offset=self.heads[0], checksum=cfg.checksum)
        self.stats = self._stats_writer()

    def _stats_writer(self):
        """Decode MoE stage leaders (tp_rank = ep_rank = 0) write expert counts to Redis."""
        g = self.groups
        if not (self.model_config.num_experts and self.cfg.pool == "decode" and self.cfg.redis_url
                and g.tp_rank == 0 and g.ep_rank == 0):
            return None
        from engine.expert_stats import ExpertStatsWriter, stats_model_id
        from common.registry import connect_redis
        client = connect_redis(self.cfg.redis_url, asynchronous=False)
        return ExpertStatsWriter(client, stats_model_id(self.source.model_id), self.cfg.key_prefix,
                                 interval_s=self.cfg.expert_stats_interval_s, window_s=self.cfg.expert_window_s)

    def flush_stats(self) -> int:
        """Write the expert-count increments since the last flush (0 when this rank has none)."""
        if self.stats is None:
            return 0
        try:
            return self.stats.flush(self.model.expert_counts())
        except Exception as exc:  # Redis down: counts are kept and retried on the next flush
            log.warning("writing expert counts failed: %s", exc)
            return 0

    @torch.inference_mode()
    def _forward(self, batch):
        """This stage's part of one step; activations go stage to stage over the PP group.
        Returns the logits on the last stage's first TP rank, else None."""
        g, hidden = self.groups, None
        if not g.is_first_stage:
            shape = (batch.input_ids.numel(), self.model_config.hidden_size)
            dt = self.model_config.torch_dtype
            hidden = (g.pp.recv(torch.empty(shape, dtype=dt), g.pp_rank - 1),
                      g.pp.recv(torch.empty(shape, dtype=dt), g.pp_rank - 1))
        out = self.model(batch, self.kv_cache, hidden)
        if not g.is_last_stage:
            g.pp.send(out[0], g.pp_rank + 1)
            g.pp.send(out[1], g.pp_rank + 1)
            return None
        return out if g.tp_rank == 0 and g.ep_rank == 0 and out.shape[0] else None

    def _prefill_batch(self, prompt: list[int], blocks: list[int]) -> ForwardBatch:
        """This rank's prefill batch: the whole prompt, or its CP chunks (``prefill_cp``)."""
        cp = self.cfg.parallel.cp
        if cp == 1:
            return ForwardBatch.prefill([prompt], [blocks], self.cfg.block_size)
        return ForwardBatch.prefill_cp(prompt, self.groups.cp_rank, cp, blocks, self.cfg.block_size)

    def execute(self, name: str, args: tuple) -> Any:
        """Run one command on this rank (every rank runs the same commands in the same order)."""
        if name == "forward":
            return self._forward(args[0])
        if name == "prefill":
            return self._forward(self._prefill_batch(*args))
        if name == "expect":
            return self.receiver.expect(*args)
        if name == "try_land":
            return self.receiver.try_land(*args)
        if name == "cancel":
            return self.receiver.cancel(*args)
        if name == "push":
            landing = worker_pb2.LandingDescriptor.FromString(args[0])
            return self.sender.push(landing, self.kv_cache, args[1], timeout=args[2])
        if name == "address":
            return self.transport.address()
        if name == "flush_stats":
            return self.flush_stats()
        if name == "placement":
            from engine.eplb import placements_from_json
            return self.model.apply_placement(placements_from_json(args[0], self.model_config.num_experts, args[1]))
        if name == "rank_pairs":
            return self.model.rank_pairs() if self.model_config.num_experts else {}
        raise ValueError(f"unknown instance command {name!r}")


def _rank_main(rank: int, cfg: WorkerConfig, port: int) -> None:
    """Ranks 1..N-1: build the engine, then execute rank 0's commands until told to stop."""
    die_with_parent()
    join_group(rank, cfg.parallel.world_size, cfg.host, port)
    groups = ParallelGroups.build(cfg.parallel, rank)
    engine = RankEngine(cfg, groups)
    dist.barrier()
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        name, args = box[0]
        if name == "stop":
            break
        try:
            result = ("ok", engine.execute(name, args))
        except Exception as exc:
            result = ("error", f"{type(exc).__name__}: {exc}")
        dist.gather_object(result, None, dst=0)
    engine.transport.close()
    dist.destroy_process_group()


class InstanceError(RuntimeError):
    """A command failed on some rank (the message names the rank)."""


class Instance:
    """Rank 0's handle on the whole instance (see the module docstring)."""

    def __init__(self, cfg: WorkerConfig, on_failure: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.world = cfg.parallel.world_size
        self._lock = threading.Lock()
        self._procs: list = []
        self._on_failure = on_failure
        self._closed = False
        if self.world == 1:
            self.engine = RankEngine(cfg, ParallelGroups.single())
        else:
            model = load_model_config(resolve_model(cfg.model))  # fail before spawning any rank
            cfg.parallel.validate_for(model, model.num_experts)
            self._store, port = rendezvous_store(cfg.host, self.world)  # on cfg.host only
            ctx = mp.get_context("spawn")
            self._procs = [ctx.Process(target=_rank_main, args=(r, cfg, port), daemon=True)
                           for r in range(1, self.world)]
            for p in self._procs:
                p.start()
            join_group(0, self.world, cfg.host, port, store=self._store)
            self.engine = RankEngine(cfg, ParallelGroups.build(cfg.parallel, 0))
            dist.barrier()
            threading.Thread(target=self._watchdog, name="rank-watchdog", daemon=True).start()
        self.model_config: ModelConfig = self.engine.model_config
        self.num_blocks = self.engine.num_blocks
        self.transport_addresses = self.call("address")

    # ---- commands ------------------------------------------------------------------------
    def call(self, name: str, *args) -> list:
        """Run a command on every rank; returns the per-rank results; raises InstanceError."""
        with self._lock:
            if self._closed:
                raise InstanceError("the instance is shut down")
            if self.world == 1:
                return [self.engine.execute(name, args)]
            dist.broadcast_object_list([(name, args)], src=0)
            try:
                mine = ("ok", self.engine.execute(name, args))
            except Exception as exc:
                mine = ("error", f"{type(exc).__name__}: {exc}")
            gathered = [None] * self.world
            dist.gather_object(mine, gathered, dst=0)
        errors = [f"rank {r}: {res[1]}" for r, res in enumerate(gathered) if res[0] == "error"]
        if errors:
            raise InstanceError("; ".join(errors))
        return [res[1] for res in gathered]

    def forward(self, batch) -> torch.Tensor:
        """Logits of ``batch`` (from the last stage's first TP rank)."""
        return next(r for r in self.call("forward", batch) if r is not None)

    def prefill(self, prompt: list[int], blocks: list[int], cancelled=None) -> torch.Tensor:
        """Logits [1, vocab] of the prompt's last position (each rank runs its share).

        ``cancelled`` (a threading.Event): with one rank, setting it stops the pass between
        layers (``engine.batch.ForwardCancelled``); a multi-rank pass runs to its end."""
        if self.world == 1 and cancelled is not None:
            batch = self.engine._prefill_batch(list(prompt), list(blocks))
            batch.cancelled = cancelled
            with self._lock:
                return self.engine._forward(batch)
        return next(r for r in self.call("prefill", list(prompt), list(blocks)) if r is not None)

    def expect(self, transfer_id, source, blocks, num_tokens, deadline) -> None:
        self.call("expect", transfer_id, source, blocks, num_tokens, deadline)

    def try_land(self, transfer_id: str) -> bool:
        return all(self.call("try_land", transfer_id))

    def cancel(self, transfer_id: str) -> None:
        self.call("cancel", transfer_id)

    def push(self, landing: worker_pb2.LandingDescriptor, blocks: list[int], cancelled=None,
             timeout: float = 0.0) -> int:
        """Every rank sends its pieces; returns total bytes. ``cancelled`` (a threading.Event)
        can stop a one-rank push midway; a multi-rank push runs to its deadline."""
        if self.world == 1:  # reads blocks the model no longer writes: no need to hold the channel
            return self.engine.sender.push(landing, self.engine.kv_cache, list(blocks), cancelled, timeout)
        return sum(self.call("push", landing.SerializeToString(), list(blocks), timeout))

    def flush_stats(self) -> int:
        """Every stage leader writes its expert-count increments to Redis (MoE decode only)."""
        return sum(self.call("flush_stats"))

    def apply_placement(self, layers: dict) -> dict:
        """Switch every rank to the expert placement ``layers`` ({layer: engine.eplb.Placement})
        at the same step boundary (one command of the channel); returns the transfers, bytes
        and the slowest rank's seconds."""
        from engine.eplb import placements_to_json
        results = self.call("placement", placements_to_json(layers), self.cfg.parallel.ep)
        return {"moved": sum(r["moved"] for r in results) // 2,   # each transfer counted by both ends
                "bytes": sum(r["bytes_sent"] for r in results),
                "rank_seconds": max(r["seconds"] for r in results),
                "slots": results[0]["slots"]}

    def rank_pairs(self) -> dict[int, list[int]]:
        """Cumulative (token, expert) pairs computed by each EP rank, by global layer:
        ``{layer: [pairs of EP rank 0, 1, ...]}`` (from the first EP group of each stage)."""
        from engine.parallel import coords
        p, out = self.cfg.parallel, {}
        for r, pairs in enumerate(self.call("rank_pairs")):
            c = coords(p, r)
            if c["s"] // p.ep == 0:
                for layer, n in pairs.items():
                    out.setdefault(layer, [0] * p.ep)[c["ep"]] = n
        return out

    def landing_ranks(self) -> list[worker_pb2.LandingRank]:
        """Where each rank of this (decode) instance receives KV, for landing descriptors."""
        from engine.parallel import coords
        p, m, out = self.cfg.parallel, self.model_config, []
        for r, address in enumerate(self.transport_addresses):
            c = coords(p, r)
            out.append(worker_pb2.LandingRank(
                rank=r, tp_rank=c["tp"], pp_rank=c["pp"], transport_address=address,
                layers=list(layer_range(c["pp"], p.pp, m.num_layers)),
                kv_heads=list(kv_head_range(c["tp"], p.tp, m.num_kv_heads))))
        return out

    # ---- lifecycle -------------------------------------------------------------------------
    def _watchdog(self) -> None:
        while not self._closed:
            dead = [(i + 1, p.exitcode) for i, p in enumerate(self._procs) if p.exitcode is not None]
            if dead:
                msg = f"rank {dead[0][0]} of the instance exited (code {dead[0][1]})"
                log.error("%s: taking the instance down", msg)
                self._closed = True
                if self._on_failure is not None:
                    self._on_failure(msg)
                return
            time.sleep(0.2)

    def close(self) -> None:
        if self.world > 1 and not self._closed:
            with self._lock:
                self._closed = True
                try:
                    dist.broadcast_object_list([("stop", ())], src=0)
                except Exception:
                    pass
        self._closed = True
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.engine.transport.close()
