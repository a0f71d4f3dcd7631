"""Executors: rank 0's handle on the N ranks of an instance, with typed methods.

Who calls what: the prefill/decode services (``services.worker``) build one executor with
:func:`make_executor` and call only its methods: :meth:`Executor.forward` (logits of a batch),
:meth:`~Executor.prefill`, :meth:`~Executor.expect` / :meth:`~Executor.try_land` /
:meth:`~Executor.cancel` (decode: KV receives on every rank), :meth:`~Executor.push`
(prefill: every rank sends its KV shard), :meth:`~Executor.landing_ranks`,
:meth:`~Executor.expert_counts`, :meth:`~Executor.apply_placement`, :meth:`~Executor.rank_pairs`.

* :class:`InProcessExecutor`: one rank, this process, no ``torch.distributed``.
* :class:`LocalExecutor`: rank 0 here, ranks 1..N-1 spawned on this host.
* :class:`ExternalExecutor`: rank 0 here (and its host's other ranks spawned), the other
  ranks started separately (``cleave rank``, a Kubernetes LeaderWorkerSet) that join the
  rendezvous (``engine.runtime.rendezvous``) within its timeout.
* ``engine.runtime.fake.FakeExecutor``: no model, deterministic logits (service/router tests).

Every method runs the same :class:`~engine.runtime.rank.RankRunner` method on every rank: rank
0 broadcasts ``(RankRunner.method, args)`` over the control group (gloo), each rank calls it
on its runner, rank 0 gathers the results. Calls are serialised by one lock, so every rank
sees them in the same order; nothing long blocks the channel (landing is polled). An exception
on any rank is re-raised on rank 0 with its original type, its ``rank`` attribute set and a
note naming the rank (:class:`RankError` when it cannot be carried). A rank that dies (a
spawned process exits, an external rank's liveness counter stops) calls ``on_failure``; the
service then reports NOT_SERVING and exits, and the remaining ranks leave with it.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from common.layout import kv_head_range, layer_range
from engine.batch import PrefillResult
from engine.logprobs import assemble_prompt_logprobs
from engine.loader import load_model_config, resolve_model
from engine.parallel import ParallelGroups, coords
from engine.runtime.config import RuntimeConfig
from engine.runtime.device import backend_for, rank_device, resolve_device
from engine.runtime.rank import RankRunner
from engine.runtime.rendezvous import CONFIG_KEY, Liveness, connect_store, fetch, join, publish, serve_store
from engine.runtime.spawn import start_rank, stop_processes
from kvtransfer.handoff import HandoffError, encode_landing

if TYPE_CHECKING:
    from engine.sampler import StepLogits

log = logging.getLogger(__name__)


class InstanceError(RuntimeError):
    """The instance cannot run a call: it is shut down, or a rank failed in a way whose
    exception could not be carried to rank 0."""


class RankError(InstanceError):
    """A rank raised an exception that could not be re-created on rank 0 (its text is kept)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def _outcome(fn: Callable, runner, args: tuple) -> tuple:
    """("ok", result) or ("error", exception or None, text): what a rank sends back."""
    try:
        return ("ok", fn(runner, *args))
    except Exception as exc:
        return _failure(exc)


def _failure(exc: BaseException) -> tuple:
    text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    try:
        pickle.loads(pickle.dumps(exc))
        return ("error", exc, text)
    except Exception:
        return ("error", None, text)


def raise_first(outcomes: list[tuple]) -> list:
    """The results of every rank, or the first rank's exception re-raised (see module doc)."""
    failed = [r for r, o in enumerate(outcomes) if o[0] == "error"]
    if not failed:
        return [o[1] for o in outcomes]
    r = failed[0]
    _, exc, text = outcomes[r]
    if exc is None:
        raise RankError(f"rank {r}: {text.splitlines()[0]}", r)
    exc.rank = r
    others = f"; ranks {failed[1:]} failed too" if failed[1:] else ""
    exc.add_note(f"raised on rank {r} of the instance{others}")
    raise exc


@dataclass(frozen=True)
class RankEndpoint:
    """Where one rank of an instance receives KV: its coordinates, its transport address
    (opaque bytes) and the ``[first, last)`` layer and KV-head ranges it stores."""

    rank: int
    tp_rank: int
    pp_rank: int
    transport_address: bytes
    layers: tuple[int, int]
    kv_heads: tuple[int, int]


def merge_prefill(prompt: list[int], parts: list[tuple], prompt_logprobs: int) -> PrefillResult:
    """One :class:`PrefillResult` from the ``(logits or None, {token index: entry})`` parts of
    the ranks that own logits (``RankRunner.prefill``)."""
    logits = next(p[0] for p in parts if p[0] is not None)
    lps = assemble_prompt_logprobs(prompt, [p[1] for p in parts]) if prompt_logprobs >= 0 else None
    return PrefillResult(logits, lps)


class Executor:
    """The typed methods every executor has (see the module docstring); subclasses implement
    :meth:`_all` (run a ``RankRunner`` method on every rank) and hold rank 0's ``runner``."""

    runner: RankRunner
    world: int

    def _all(self, fn: Callable, *args) -> list:
        raise NotImplementedError

    def _setup(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        r = self.runner
        self.model_config, self.num_blocks, self.source = r.model_config, r.num_blocks, r.source
        self.compat, self.layout, self.device = r.compat, r.layout, r.device
        self.transport_addresses: list[bytes] = self._all(RankRunner.address)

    def run_on_ranks(self, fn: Callable, *args) -> list:
        """``fn(runner, *args)`` on every rank (a module-level function); the results by rank."""
        return self._all(fn, *args)

    def forward(self, batch) -> torch.Tensor | StepLogits:
        """Logits ``[num_seqs, vocab]`` fp32 on the CPU of ``batch`` (from the rank that owns them),
        or an ``engine.sampler.StepLogits`` when ``batch.full_rows`` is set.

        With pipeline stages, a decode batch runs as ``min(pp, num_seqs)`` micro-batches in one
        call (:meth:`RankRunner.forward_micro`): while a later stage works on micro-batch ``i``,
        the stage before it works on ``i + 1``, so every stage computes during the step."""
        pp = self.cfg.parallel.pp
        if pp > 1 and not batch.is_prefill and batch.num_seqs > 1:
            parts = batch.split(min(pp, batch.num_seqs))
            return next(r for r in self._all(RankRunner.forward_micro, parts, batch.full_rows) if r is not None)
        return next(r for r in self._all(RankRunner.forward, batch) if r is not None)

    def prefill(self, prompt: list[int], blocks: list[int], cancelled=None,
                prompt_logprobs: int = -1, num_cached: int = 0) -> PrefillResult:
        """The logits ``[1, vocab]`` of the prompt's last position (each rank runs its share) and,
        when ``prompt_logprobs`` >= 0, the prompt tokens' log-probabilities with that many top
        entries (``engine.logprobs``). ``cancelled`` (a ``threading.Event``) stops a one-rank
        pass between layers (``engine.batch.ForwardCancelled``); a multi-rank pass runs to its end.
        ``num_cached`` > 0: the K/V of the first ``num_cached`` tokens (whole blocks) is already
        in ``blocks`` on every rank; only the rest is computed, attending to it
        (``RankRunner.prefill``: ``ValueError`` with prompt logprobs, with CP, or for a count
        that is not a multiple of the block size below ``len(prompt)``)."""
        parts = self._all(RankRunner.prefill, list(prompt), list(blocks), None, prompt_logprobs,
                          num_cached)
        return merge_prefill(prompt, [p for p in parts if p is not None], prompt_logprobs)

    def expect(self, transfer_id, source, num_tokens, deadline, first_token: int = 0) -> None:
        """Every rank posts its receives of tokens ``[first_token, num_tokens)`` of the prompt
        (``first_token``: the leading tokens this instance holds already, whole blocks;
        ``kvtransfer.handoff.KVReceiver.expect``)."""
        self._all(RankRunner.expect, transfer_id, source, num_tokens, deadline, first_token)

    def try_land(self, transfer_id: str, blocks: list[int]) -> bool:
        """Every rank lands what has arrived into ``blocks`` (the sequence's block table, owned by
        the caller's block manager); True once all of it is in (at once when nothing was expected)."""
        return all(self._all(RankRunner.try_land, transfer_id, list(blocks)))

    def cancel(self, transfer_id: str) -> None:
        self._all(RankRunner.cancel, transfer_id)

    def push(self, landing, blocks: list[int], cancelled=None, timeout: float = 0.0) -> int:
        """Every rank sends its pieces of the prompt's KV to ``landing`` (a landing descriptor,
        the KV handoff's own wire type: ``kvtransfer.handoff``); returns the total bytes. The pushes
        run in the ranks' background threads: the control channel is held only to start and
        poll them, so other calls (the next prefill) run meanwhile. ``cancelled`` (a
        ``threading.Event``) stops every rank's push; a rank's error is re-raised here."""
        push_id = uuid.uuid4().hex
        self._all(RankRunner.start_push, push_id, encode_landing(landing), list(blocks), timeout)
        try:
            while True:
                sent = self._all(RankRunner.push_result, push_id)
                if all(n is not None for n in sent):
                    return sum(sent)
                if cancelled is not None and cancelled.is_set():
                    raise HandoffError(f"transfer {landing.transfer_id} cancelled")
                time.sleep(0.005)
        finally:
            try:                                  # forget it everywhere (stopping it if it still runs)
                self._all(RankRunner.end_push, push_id)
            except Exception as exc:              # the instance is down: its pushes are gone with it
                log.debug("ending push %s: %s", push_id, exc)

    def check_landing(self, landing) -> None:
        """Raise (``kvtransfer.handoff.IncompatiblePeer`` etc.) before any KV is computed for a
        landing descriptor this instance cannot serve."""
        self.runner.sender.check(landing)

    def expert_counts(self) -> dict[int, list[int]]:
        """Cumulative routed (token, expert) pairs per expert of every MoE layer, by global layer
        (from each stage's leader); {} for a dense model. The expert-balancing hook
        (``services.experts``) reads it; with :meth:`apply_placement` and :meth:`rank_pairs`."""
        out: dict[int, list[int]] = {}
        for part in self._all(RankRunner.expert_counts):
            out.update(part)
        return out

    def apply_placement(self, layers: dict) -> dict:
        """Switch every rank to the expert placement ``layers`` ({layer: engine.expert_placement.Placement})
        at the same step boundary; returns the transfers, bytes and the slowest rank's seconds."""
        from engine.expert_placement import placements_to_json
        results = self._all(RankRunner.apply_placement, placements_to_json(layers), self.cfg.parallel.ep)
        return {"moved": sum(r["moved"] for r in results) // 2,   # each transfer counted by both ends
                "bytes": sum(r["bytes_sent"] for r in results),
                "rank_seconds": max(r["seconds"] for r in results),
                "slots": results[0]["slots"]}

    def rank_pairs(self) -> dict[int, list[int]]:
        """Cumulative (token, expert) pairs computed by each EP rank, by global layer:
        ``{layer: [pairs of EP rank 0, 1, ...]}`` (from the first EP group of each stage)."""
        p, out = self.cfg.parallel, {}
        for r, pairs in enumerate(self._all(RankRunner.rank_pairs)):
            c = coords(p, r)
            if c["s"] // p.ep == 0:
                for layer, n in pairs.items():
                    out.setdefault(layer, [0] * p.ep)[c["ep"]] = n
        return out

    def landing_ranks(self) -> list[RankEndpoint]:
        """Where each rank of this (decode) instance receives KV, for landing descriptors."""
        p, m, out = self.cfg.parallel, self.model_config, []
        for r, address in enumerate(self.transport_addresses):
            c = coords(p, r)
            out.append(RankEndpoint(rank=r, tp_rank=c["tp"], pp_rank=c["pp"], transport_address=address,
                                    layers=layer_range(c["pp"], p.pp, m.num_layers),
                                    kv_heads=kv_head_range(c["tp"], p.tp, m.num_kv_heads)))
        return out

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessExecutor(Executor):
    """One rank in this process (see the module docstring)."""

    def __init__(self, cfg: RuntimeConfig, on_failure: Callable[[str], None] | None = None,
                 runner=None) -> None:
        """``runner``: the rank to drive (``engine.runtime.fake`` passes its own); default a
        ``RankRunner`` of ``cfg`` on this process's device."""
        self.world = 1
        self._lock = threading.Lock()
        self._closed = False
        if runner is None:
            device = rank_device(resolve_device(cfg.device), max(cfg.rendezvous.local_rank, 0))
            runner = RankRunner(cfg, ParallelGroups.single(), device)
        self.runner = runner
        self._setup(cfg)

    def _all(self, fn: Callable, *args) -> list:
        with self._lock:
            if self._closed:
                raise InstanceError("the instance is shut down")
            return [fn(self.runner, *args)]

    def prefill(self, prompt, blocks, cancelled=None, prompt_logprobs: int = -1,
                num_cached: int = 0) -> PrefillResult:
        with self._lock:
            part = self.runner.prefill(list(prompt), list(blocks), cancelled, prompt_logprobs,
                                       num_cached)
        return merge_prefill(prompt, [part], prompt_logprobs)

    def push(self, landing, blocks, cancelled=None, timeout: float = 0.0) -> int:
        # reads blocks the model no longer writes: no need to hold the channel
        return self.runner.sender.push(landing, self.runner.kv_cache, list(blocks), cancelled, timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        super().close()


def rank_main(rank: int, local_index: int, own: RuntimeConfig, master: tuple[str, int], strict: bool) -> int:
    """A rank other than 0: join rank 0's rendezvous, build the runner, then run rank 0's calls
    until told to stop. ``own``: this process's flags (its host, device, threads); the instance
    config comes from rank 0 (``strict``: refuse a model/layout that differs from ``own``'s).
    Returns the exit code (0 after a stop, 1 when rank 0 went away or the config disagrees)."""
    addr, port = master
    world = own.world_size
    store = connect_store(addr, port, world, own.rendezvous.timeout_s)
    cfg = fetch(store, CONFIG_KEY)
    if strict and cfg.mismatch(own):
        log.error("rank %d does not match rank 0: %s", rank, "; ".join(cfg.mismatch(own)))
        return 1
    cfg = cfg.for_rank_host(own)
    device = rank_device(resolve_device(cfg.device), local_index)
    ctrl = join(rank, world, store, backend_for(device), cfg.rendezvous.timeout_s, cfg.host)
    alive = Liveness(store, rank, on_lost=lambda: os._exit(1)).start()
    runner = None
    try:
        groups = ParallelGroups.build(cfg.parallel, rank)
        try:
            runner = RankRunner(cfg, groups, device, local_index)
            built = ("ok", None)
        except Exception as exc:
            built = _failure(exc)
        dist.gather_object(built, None, dst=0, group=ctrl)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=ctrl)
            fn, args = box[0]
            if fn is None:                      # rank 0's stop (also after a failed build)
                return 0 if runner is not None else 1
            dist.gather_object(_outcome(fn, runner, args), None, dst=0, group=ctrl)
    except Exception as exc:   # rank 0 went away mid-call: nothing left to serve
        log.error("rank %d leaves: %s", rank, exc)
        return 1
    finally:
        alive.stop()
        if runner is not None:
            runner.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_process(rank: int, local_index: int, cfg: RuntimeConfig, master: tuple[str, int],
                 strict: bool = False) -> None:
    """The target of a rank process (``engine.runtime.spawn.start_rank``): :func:`rank_main`,
    its return value as the exit code. Rank 0 spawns its host's ranks with it; ``cleave rank``
    its own (``strict``)."""
    raise SystemExit(rank_main(rank, local_index, cfg, master, strict))


class _RankGroupExecutor(Executor):
    """Rank 0 of a multi-rank instance: the rendezvous, this host's ranks, the control channel."""

    def __init__(self, cfg: RuntimeConfig, on_failure: Callable[[str], None] | None = None) -> None:
        self.world = cfg.world_size
        self._lock = threading.Lock()
        self._closed = False
        self._on_failure = on_failure
        self._procs: list = []
        rdv = cfg.rendezvous
        local = rdv.local_ranks(self.world)
        if local[0] != 0:
            raise ValueError(f"the service process runs rank 0, but --node-rank/--rank give ranks {local}")
        self._external = [r for r in range(self.world) if r not in local]
        if self._external and not rdv.master_port:
            raise ValueError(f"ranks {self._external} run on other hosts: give a fixed --master-port "
                             f"(MASTER_PORT) they can reach")
        model = load_model_config(resolve_model(cfg.model))  # fail before starting any rank
        cfg.parallel.validate_for(model, model.num_experts)
        device = rank_device(resolve_device(cfg.device), 0)
        addr = rdv.master_addr or cfg.host
        self._store, port = serve_store(addr, rdv.master_port, self.world, rdv.timeout_s)
        publish(self._store, CONFIG_KEY, cfg)
        self._spawned = [r for r in local if r]
        self._procs = [start_rank(rank_process, r, i, cfg, (addr, port)) for i, r in enumerate(local) if r]
        try:
            self._ctrl = join(0, self.world, self._store, backend_for(device), rdv.timeout_s, cfg.host,
                              where=f"{addr}:{port}")
        except Exception:
            stop_processes(self._procs, grace_s=1.0)
            raise
        try:
            runner, built = RankRunner(cfg, ParallelGroups.build(cfg.parallel, 0), device), ("ok", None)
        except Exception as exc:
            runner, built = None, _failure(exc)
        gathered = [None] * self.world
        dist.gather_object(built, gathered, dst=0, group=self._ctrl)
        if any(o[0] == "error" for o in gathered):
            self._stop_ranks()
            raise_first(gathered)
        self.runner = runner
        self._alive = Liveness(self._store, 0)
        threading.Thread(target=self._watchdog, name="rank-watchdog", daemon=True).start()
        log.info("instance of %d ranks joined at %s:%d (%d spawned here, %d external) on %s",
                 self.world, addr, port, len(self._procs), len(self._external), device)
        self._setup(cfg)

    def _all(self, fn: Callable, *args) -> list:
        with self._lock:
            if self._closed:
                raise InstanceError("the instance is shut down")
            dist.broadcast_object_list([(fn, args)], src=0, group=self._ctrl)
            mine = _outcome(fn, self.runner, args)
            gathered = [None] * self.world
            dist.gather_object(mine, gathered, dst=0, group=self._ctrl)
        return raise_first(gathered)

    def _watchdog(self) -> None:
        while not self._closed:
            dead = [(r, p.exitcode) for r, p in zip(self._spawned, self._procs) if p.exitcode is not None]
            msg = f"rank {dead[0][0]} of the instance exited (code {dead[0][1]})" if dead else ""
            if not msg and self._external:
                stalled = self._alive.stalled(self._external)
                msg = f"rank(s) {stalled} of the instance stopped answering" if stalled else ""
            if msg:
                log.error("%s: taking the instance down", msg)
                self._closed = True
                if self._on_failure is not None:
                    self._on_failure(msg)
                return
            time.sleep(0.2)

    def _stop_ranks(self) -> None:
        try:
            dist.broadcast_object_list([(None, ())], src=0, group=self._ctrl)
        except Exception:
            pass
        stop_processes(self._procs)
        if dist.is_initialized():
            dist.destroy_process_group()

    def close(self) -> None:
        with self._lock:
            was_closed, self._closed = self._closed, True
        if not was_closed:
            self._stop_ranks()
        else:
            stop_processes(self._procs, grace_s=1.0)
        super().close()


class LocalExecutor(_RankGroupExecutor):
    """Every rank on this host: rank 0 here, ranks 1..N-1 spawned (see the module docstring)."""


class ExternalExecutor(_RankGroupExecutor):
    """Rank 0 here with its host's share of ranks; the others join from elsewhere."""


def make_executor(cfg: RuntimeConfig, on_failure: Callable[[str], None] | None = None) -> Executor:
    """The executor for ``cfg``: in-process for one rank, local when every rank runs on this
    host (``--nproc-per-node`` unset or = the world size), external otherwise (``--fake-engine``:
    ``engine.runtime.fake.fake_engine_executor``, which ``services.worker`` picks)."""
    world = cfg.world_size
    if world == 1:
        return InProcessExecutor(cfg, on_failure)
    if len(cfg.rendezvous.local_ranks(world)) == world:
        return LocalExecutor(cfg, on_failure)
    return ExternalExecutor(cfg, on_failure)
