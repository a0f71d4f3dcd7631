"""One rank of an instance: its model shard, KV cache, KV transport and the one pipeline step.

Who calls what: an executor (``engine.runtime.executor``) builds one :class:`RankRunner` per
rank and calls the same method on every rank in the same order (rank 0 in its own process,
the others through the control channel). Nothing here knows about gRPC, Redis records or
requests: those live in ``services/``.

:func:`stage_step` is the only place in the codebase where a stage receives activations,
computes its layers and sends them on; serving (:meth:`RankRunner.forward`) and the offline
micro-batched runner (``engine.pipeline.PipelineRunner``) both call it.

Every rank holds the same number of KV blocks (block ids are chosen on rank 0 and valid on all
ranks); a rank's cache holds only its KV heads and its pipeline stage's layers. With CUDA
graphs on, one extra block at the end is never handed out: padding rows of a graphed decode
batch write there.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from cleave.v1 import inference_pb2, worker_pb2
from engine.batch import ForwardBatch
from engine.config import CacheConfig
from engine.layout import kv_head_range, layer_range
from engine.loader import load_model, resolve_model
from engine.parallel import ParallelGroups
from engine.runtime.config import RuntimeConfig
from engine.runtime.cuda_graphs import DecodeGraphs
from engine.runtime.device import resolve_dtype
from kvtransfer.handoff import KVReceiver, KVSender, compat_hash
from kvtransfer.transport import make_transport

log = logging.getLogger(__name__)


def stage_step(model, groups: ParallelGroups, kv_cache: torch.Tensor, batch: ForwardBatch,
               send: Callable | None = None, graphs: DecodeGraphs | None = None, timings: dict | None = None):
    """This stage's share of one step over ``batch`` (already on the cache's device).

    A later stage first receives ``(hidden, residual)`` ``[T, hidden_size]`` from the previous
    stage; a stage that is not last sends its own on (``send(tensor, to_group_rank)``, default a
    blocking ``groups.pp.send``). Returns the last stage's fp32 logits
    ``[len(batch.logits_indices), vocab]``, else ``(hidden, residual)``. ``graphs`` replays
    decode batches from CUDA graphs when it covers them. ``timings["recv"]`` accumulates the
    seconds spent waiting on the previous stage."""
    hidden = None
    if not groups.is_first_stage:
        cfg, src = model.config, groups.pp_rank - 1
        shape = (batch.input_ids.shape[0], cfg.hidden_size)
        t0 = time.perf_counter()
        hidden = tuple(groups.pp.recv(torch.empty(shape, dtype=cfg.torch_dtype, device=kv_cache.device), src)
                       for _ in range(2))
        if timings is not None:
            timings["recv"] = timings.get("recv", 0.0) + time.perf_counter() - t0
    out = graphs.run(batch, hidden) if graphs is not None else None
    if out is None:
        out = model(batch, kv_cache, hidden)
    if not groups.is_last_stage:
        send = send or groups.pp.send
        send(out[0], groups.pp_rank + 1)
        send(out[1], groups.pp_rank + 1)
    return out


class RankRunner:
    """Model shard, KV cache, transport and handoff endpoints of one rank.

    ``device``: this rank's own ``torch.device`` (``cuda:<local rank>`` or CPU). Raises what
    the loader raises (``ValueError`` for a layout that cannot split the model)."""

    def __init__(self, cfg: RuntimeConfig, groups: ParallelGroups, device: torch.device) -> None:
        self.cfg, self.groups, self.device = cfg, groups, device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.source = resolve_model(cfg.model)
        dtype = resolve_dtype(cfg.dtype, device)
        self.model_config, self.model = load_model(self.source, dtype, device, groups)
        m, p = self.model_config, cfg.parallel
        self.heads = kv_head_range(groups.tp_rank, p.tp, m.num_kv_heads)
        self.layers = layer_range(groups.pp_rank, p.pp, m.num_layers)
        cache = CacheConfig(block_size=cfg.block_size, num_blocks=cfg.num_blocks, memory_bytes=cfg.kv_cache_bytes)
        self.num_blocks = cache.blocks_for(m)  # from the whole model: identical on every rank
        graphs = cfg.cuda_graphs and device.type == "cuda"
        self.kv_cache = self.model.allocate_kv_cache(
            CacheConfig(block_size=cfg.block_size, num_blocks=self.num_blocks + int(graphs)), device=device)
        self.graphs = DecodeGraphs(self.model, self.kv_cache, cfg.max_batch, cfg.block_size,
                                   pad_slot=self.num_blocks * cfg.block_size) if graphs else None
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
        g, where = self.groups, self.cfg.expert_stats
        if not (self.model_config.num_experts and where is not None and g.tp_rank == 0 and g.ep_rank == 0):
            return None
        import redis

        from engine.expert_stats import ExpertStatsWriter, stats_model_id
        client = redis.Redis.from_url(where.redis_url, socket_timeout=5, socket_connect_timeout=5)
        return ExpertStatsWriter(client, stats_model_id(self.source.model_id), where.key_prefix,
                                 interval_s=where.interval_s, window_s=where.window_s)

    # ---- the methods an executor calls on every rank ------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch):
        """This stage's part of one step. Returns the logits (CPU, fp32) on the rank that owns
        them (last stage, first TP and EP rank), else None."""
        g = self.groups
        out = stage_step(self.model, g, self.kv_cache, batch.to(self.device), graphs=self.graphs)
        if g.is_last_stage and g.tp_rank == 0 and g.ep_rank == 0 and out.shape[0]:
            return out.cpu()
        return None

    def prefill_batch(self, prompt: list[int], blocks: list[int]) -> ForwardBatch:
        """This rank's prefill batch: the whole prompt, or its CP chunks (``prefill_cp``)."""
        cp, bs = self.cfg.parallel.cp, self.cfg.block_size
        if cp == 1:
            return ForwardBatch.prefill([prompt], [blocks], bs)
        return ForwardBatch.prefill_cp(prompt, self.groups.cp_rank, cp, blocks, bs)

    def prefill(self, prompt: list[int], blocks: list[int], cancelled=None):
        """Logits [1, vocab] of the prompt's last position on the rank that holds it, else None.
        ``cancelled`` (a threading.Event; one-rank instances only) stops the pass between layers."""
        batch = self.prefill_batch(prompt, blocks)
        batch.cancelled = cancelled
        return self.forward(batch)

    def expect(self, transfer_id, source, blocks, num_tokens, deadline) -> None:
        self.receiver.expect(transfer_id, source, blocks, num_tokens, deadline)

    def try_land(self, transfer_id: str) -> bool:
        return self.receiver.try_land(transfer_id)

    def cancel(self, transfer_id: str):
        return self.receiver.cancel(transfer_id)

    def push(self, landing: bytes, blocks: list[int], timeout: float, cancelled=None) -> int:
        return self.sender.push(worker_pb2.LandingDescriptor.FromString(landing), self.kv_cache, blocks,
                                cancelled, timeout)

    def address(self) -> bytes:
        return self.transport.address()

    def flush_stats(self) -> int:
        """Write the expert-count increments since the last flush (0 when this rank has none)."""
        if self.stats is None:
            return 0
        try:
            return self.stats.flush(self.model.expert_counts())
        except Exception as exc:  # Redis down: counts are kept and retried on the next flush
            log.warning("writing expert counts failed: %s", exc)
            return 0

    def apply_placement(self, placements_json: str, ep: int) -> dict:
        from engine.eplb import placements_from_json
        return self.model.apply_placement(placements_from_json(placements_json, self.model_config.num_experts, ep))

    def rank_pairs(self) -> dict:
        return self.model.rank_pairs() if self.model_config.num_experts else {}

    def close(self) -> None:
        self.transport.close()
