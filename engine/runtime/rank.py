"""One rank of an instance: its model shard, KV cache, KV transport and the one pipeline step.

Who calls what: an executor (``engine.runtime.executor``) builds one :class:`RankRunner` per
rank and calls the same method on every rank in the same order (rank 0 in its own process,
the others through the control channel). Nothing here knows about gRPC, Redis records or
requests: those live in ``services/``.

:func:`stage_step` is the only place in the codebase where a stage receives activations,
computes its layers and sends them on; :meth:`RankRunner.forward` and
:meth:`RankRunner.forward_micro` (PP decode micro-batches) call it, for serving and for the
in-process engine (``engine.llm_engine``) alike.

Every rank holds the same number of KV blocks (block ids are chosen on rank 0 and valid on all
ranks); a rank's cache holds only its KV heads and its pipeline stage's layers. With CUDA
graphs on, one extra block at the end is never handed out: padding rows of a graphed decode
batch write there.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from common.layout import kv_head_range, layer_range
from common.model import CacheConfig
from engine.batch import ForwardBatch, check_num_cached
from engine.logprobs import prompt_logprobs_of
from engine.loader import load_model, resolve_model
from engine.parallel import AsyncSender, ParallelGroups
from engine.sampler import StepLogits
from engine.runtime import cores
from engine.runtime.config import RuntimeConfig
from engine.runtime.cuda_graphs import DecodeGraphs
from engine.runtime.device import resolve_dtype
from kvtransfer.handoff import KVReceiver, KVSender, compat_hash, decode_landing
from kvtransfer.transport import make_transport

log = logging.getLogger(__name__)


def stage_step(model, groups: ParallelGroups, kv_cache: torch.Tensor, batch: ForwardBatch,
               send: Callable | None = None, graphs: DecodeGraphs | None = None, timings: dict | None = None,
               probe=None):
    """This stage's share of one step over ``batch`` (already on the cache's device).

    A later stage first receives ``(hidden, residual)`` ``[T, hidden_size]`` from the previous
    stage; a stage that is not last sends its own on (``send(tensor, to_group_rank)``, default a
    blocking ``groups.pp.send``). Returns the last stage's fp32 logits
    ``[len(batch.logits_indices), vocab]``, else ``(hidden, residual)``. ``graphs`` replays
    decode batches from CUDA graphs when it covers them. ``timings["recv"]`` accumulates the
    seconds spent waiting on the previous stage; ``probe`` (an :class:`OverlapProbe`) brackets
    the compute."""
    hidden = None
    if not groups.is_first_stage:
        cfg, src = model.config, groups.pp_rank - 1
        shape = (batch.input_ids.shape[0], cfg.hidden_size)
        t0 = time.perf_counter()
        hidden = tuple(groups.pp.recv(torch.empty(shape, dtype=cfg.torch_dtype, device=kv_cache.device), src)
                       for _ in range(2))
        if timings is not None:
            timings["recv"] = timings.get("recv", 0.0) + time.perf_counter() - t0
    if probe is not None:
        probe.enter()
    out = graphs.run(batch, hidden) if graphs is not None else None
    if out is None:
        out = model(batch, kv_cache, hidden)
    if probe is not None:
        probe.leave()
    if not groups.is_last_stage:
        send = send or groups.pp.send
        send(out[0], groups.pp_rank + 1)
        send(out[1], groups.pp_rank + 1)
    return out


def _host_logits(logits: torch.Tensor, full_rows: tuple[int, ...] | None):
    """A step's logits for rank 0: [B, vocab] on the CPU, or reduced on the device first to a
    ``StepLogits`` keeping ``full_rows`` (``ForwardBatch.full_rows``)."""
    return logits.cpu() if full_rows is None else StepLogits.of(logits, full_rows)


def split_prefill_logits(logits: torch.Tensor, positions: list[int], prompt: list[int], k: int):
    """Rows of every token of a prefill (``ForwardBatch.all_logits``) -> ``(the last position's
    row [1, vocab] or None, the prompt logprobs those rows give)`` (see ``RankRunner.prefill``)."""
    last = [i for i, p in enumerate(positions) if p == len(prompt) - 1]
    return (logits[last] if last else None), prompt_logprobs_of(logits, positions, prompt, k)


class OverlapProbe:
    """Counts pipeline overlap as an order of events, not a time (tests).

    Every stage bumps ``cleave/started/<stage>`` in the rendezvous store when it starts
    computing a (micro-)batch. When stage ``s > 0`` finishes one, it reads how many stage
    ``s - 1`` has started: more than ``s`` has finished means the previous stage was already
    computing a later micro-batch while this one computed: one ``overlaps``."""

    def __init__(self, store, stage: int) -> None:
        self.store, self.stage, self.finished, self.overlaps = store, stage, 0, 0

    def enter(self) -> None:
        self.store.add(f"cleave/started/{self.stage}", 1)

    def leave(self) -> None:
        self.finished += 1
        if self.stage > 0 and self.store.add(f"cleave/started/{self.stage - 1}", 0) > self.finished:
            self.overlaps += 1


class RankRunner:
    """Model shard, KV cache, transport and handoff endpoints of one rank.

    ``device``: this rank's own ``torch.device`` (``cuda:<local rank>`` or CPU);
    ``local_index``: its index among this host's ranks (which share of ``cfg.cpus`` it pins to).
    Raises what the loader raises (``ValueError`` for a layout that cannot split the model)."""

    def __init__(self, cfg: RuntimeConfig, groups: ParallelGroups, device: torch.device,
                 local_index: int = 0) -> None:
        self.cfg, self.groups, self.device = cfg, groups, device
        local = cfg.rendezvous.local_ranks(cfg.world_size)
        self.cores = cores.split(cfg.cpus, [1] * len(local))[local_index] if cfg.cpus else ()
        cores.pin(self.cores, cfg.threads)                  # this rank's share of the host's cores
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.source = resolve_model(cfg.model)
        dtype = resolve_dtype(cfg.dtype, device)
        self.model_config, self.model = load_model(self.source, dtype, device, groups,
                                                   weights_dtype=cfg.weights_dtype)
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
        self.layout = p                                     # tp, pp, cp, ep: all the handoff reads
        self.receiver = KVReceiver(self.transport, self.kv_cache, m, self.layout, rank=groups.rank,
                                   layer_offset=self.layers[0], head_offset=self.heads[0])
        self.sender = KVSender(self.transport, m, self.compat, self.layout, rank=groups.rank,
                               head_offset=self.heads[0], checksum=cfg.checksum)
        self._pushes: dict[str, tuple] = {}
        self.micro_batches = 0           # micro-batches run by forward_micro (for tests and benches)
        self.probe = None                # an OverlapProbe while a test counts stage overlap
        self._push_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"rank{groups.rank}-push")

    @property
    def owns_logits(self) -> bool:
        """Whether this rank hands the logits to rank 0 (last stage, first TP and EP rank)."""
        g = self.groups
        return g.is_last_stage and g.tp_rank == 0 and g.ep_rank == 0

    # ---- the methods an executor calls on every rank ------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch):
        """This stage's part of one step. Returns the logits (CPU, fp32) on the rank that owns
        them (last stage, first TP and EP rank), else None."""
        out = stage_step(self.model, self.groups, self.kv_cache, batch.to(self.device), graphs=self.graphs)
        return _host_logits(out, batch.full_rows) if self.owns_logits and out.shape[0] else None

    @torch.inference_mode()
    def forward_micro(self, batches: list[ForwardBatch], full_rows: tuple[int, ...] | None = None):
        """One step over consecutive micro-batches of a decode batch: each is received, computed
        and sent on without waiting for the next stage (non-blocking sends), so the stages work
        on different micro-batches at once. Returns the concatenated logits (CPU; reduced to an
        ``engine.sampler.StepLogits`` keeping ``full_rows`` when that is set) on the rank that
        owns them, else None. ``self.micro_batches`` counts the micro-batches run."""
        g, sender, outs = self.groups, AsyncSender(self.groups.pp), []
        for b in batches:
            outs.append(stage_step(self.model, g, self.kv_cache, b.to(self.device), send=sender.send,
                                   graphs=self.graphs, probe=self.probe))
            self.micro_batches += 1
        sender.flush()
        return _host_logits(torch.cat(outs), full_rows) if self.owns_logits else None

    def prefill_batch(self, prompt: list[int], blocks: list[int], num_cached: int = 0) -> ForwardBatch:
        """This rank's prefill batch: the whole prompt, its CP chunks (``prefill_cp``), or, with
        ``num_cached`` > 0, the tokens after the cached prefix (``ForwardBatch.prefill``'s batch
        with context). Raises ``ValueError`` for a ``num_cached`` that is not a multiple of the
        block size in ``0..len(prompt) - 1``, or > 0 with CP (``engine.batch.check_num_cached``)."""
        cp, bs = self.cfg.parallel.cp, self.cfg.block_size
        check_num_cached(len(prompt), num_cached, bs, cp=cp)
        if cp == 1:
            return ForwardBatch.prefill([prompt], [blocks], bs, [num_cached] if num_cached else None)
        return ForwardBatch.prefill_cp(prompt, self.groups.cp_rank, cp, blocks, bs)

    def prefill(self, prompt: list[int], blocks: list[int], cancelled=None, prompt_logprobs: int = -1,
                num_cached: int = 0):
        """``(logits [1, vocab] of the prompt's last position or None, {token index: TokenLogprob})``
        on a rank that owns logits (with CP, each such rank has its own positions), else None.
        ``prompt_logprobs`` >= 0: the log-probabilities of the prompt tokens this rank's rows
        predict, with that many top entries (``engine.logprobs``). ``cancelled`` (a
        threading.Event; one-rank instances only) stops the pass between layers.
        ``num_cached`` > 0: the first ``num_cached`` tokens' K/V is already in ``blocks`` (whole
        blocks); only the rest is computed. ``ValueError`` with ``prompt_logprobs`` >= 0 or CP,
        or for a ``num_cached`` that is not a multiple of the block size below ``len(prompt)``."""
        check_num_cached(len(prompt), num_cached, self.cfg.block_size,
                            prompt_logprobs=prompt_logprobs, cp=self.cfg.parallel.cp)
        batch = self.prefill_batch(prompt, blocks, num_cached)
        batch.cancelled = cancelled
        if prompt_logprobs < 0:
            logits = self.forward(batch)
            return None if logits is None else (logits, {})
        logits = self.forward(batch.all_logits())
        if logits is None:
            return None
        return split_prefill_logits(logits, batch.positions.tolist(), prompt, prompt_logprobs)

    def expect(self, transfer_id, source, num_tokens, deadline, first_token: int = 0) -> None:
        self.receiver.expect(transfer_id, source, num_tokens, deadline, first_token)

    def try_land(self, transfer_id: str, blocks: list[int]) -> bool:
        return self.receiver.try_land(transfer_id, blocks)

    def cancel(self, transfer_id: str):
        return self.receiver.cancel(transfer_id)

    def push(self, landing: bytes, blocks: list[int], timeout: float, cancelled=None) -> int:
        return self.sender.push(decode_landing(landing), self.kv_cache, blocks,
                                cancelled, timeout)

    def start_push(self, push_id: str, landing: bytes, blocks: list[int], timeout: float) -> None:
        """Start :meth:`push` in this rank's background thread and return at once (the control
        channel stays free for other calls while the KV moves); poll :meth:`push_result`."""
        stop = threading.Event()
        self._pushes[push_id] = (self._push_pool.submit(self.push, landing, blocks, timeout, stop), stop)

    def push_result(self, push_id: str) -> int | None:
        """Bytes sent by a finished push, None while it runs; raises the push's own error
        (``HandoffError`` ...). The executor ends every push with :meth:`end_push`."""
        future, _ = self._pushes[push_id]
        return future.result() if future.done() else None

    def end_push(self, push_id: str) -> None:
        """Stop a push at its next poll if it still runs, and forget it (no-op when unknown)."""
        entry = self._pushes.pop(push_id, None)
        if entry is not None:
            entry[1].set()

    def address(self) -> bytes:
        return self.transport.address()

    def expert_counts(self) -> dict[int, list[int]]:
        """This stage's cumulative routed (token, expert) pairs per expert, by global layer, on
        the stage's leader (tp_rank = ep_rank = 0: every rank of an EP group counts the same
        tokens); {} on other ranks and for dense models."""
        g = self.groups
        if not (self.model_config.num_experts and g.tp_rank == 0 and g.ep_rank == 0):
            return {}
        return {layer: counts.tolist() for layer, counts in self.model.expert_counts().items()}

    def apply_placement(self, placements_json: str, ep: int) -> dict:
        from engine.expert_placement import placements_from_json
        return self.model.apply_placement(placements_from_json(placements_json, self.model_config.num_experts, ep))

    def rank_pairs(self) -> dict:
        return self.model.rank_pairs() if self.model_config.num_experts else {}

    def close(self) -> None:
        for push_id in list(self._pushes):
            self.end_push(push_id)
        self._push_pool.shutdown(wait=True)
        self.transport.close()
