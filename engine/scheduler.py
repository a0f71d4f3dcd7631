"""Continuous batching for decode: sequences join and leave the running batch at step boundaries.

The decode service owns one :class:`DecodeScheduler` and its thread. gRPC handlers (any
thread) call :meth:`add` once a sequence's KV has landed and :meth:`abort` when a client goes
away; the scheduler thread calls :meth:`DecodeScheduler.step` in a loop (the in-process
``engine.llm_engine.LLMEngine`` calls it directly, without the thread). A step runs one
forward pass over every running sequence, samples, and hands each sequence its new token
through the sequence's ``emit`` callback (which must not block: the service forwards it to an
asyncio queue).

A sequence's blocks were reserved for prompt + max_tokens before it arrives, so it can never
run out mid-stream; the scheduler frees them (``release``) when the sequence ends for any reason.

One sequence's failure never fails its batch-mates: a row whose sampling fails
(``engine.sampler.SamplingError``) ends that sequence alone, and a batched forward pass that
raises is re-run one sequence at a time (writing the same KV slots again is harmless), so only
the sequences that fail alone end. Such a failure is the request's own (``fault == "request"``:
not worth retrying elsewhere) when its batch-mates succeeded or its sampling failed; a
sequence that fails alone in a batch where every sequence failed ends as a worker fault.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.batch import ForwardBatch
from engine.logprobs import TokenLogprob, logprobs_of
from engine.sampler import SamplingConfig, SamplingError, sample_batch

log = logging.getLogger(__name__)

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass
class Sequence:
    """One request being decoded. ``num_cached`` tokens have KV in ``blocks``."""

    seq_id: str
    blocks: list[int]
    num_cached: int                 # prompt length at admission
    last_token: int                 # sampled but not yet fed to the model (token 1 at admission)
    generated: int                  # output tokens so far (1 at admission: prefill made token 1)
    max_tokens: int
    sampling: SamplingConfig
    eos_token_ids: frozenset[int]
    ignore_eos: bool
    # (token, finish_reason, its TokenLogprob when sampling.logprobs >= 0 else None) -> None
    emit: Callable[[int | None, str | None, TokenLogprob | None], None]
    release: Callable[[], None] = lambda: None       # frees the blocks; called exactly once
    finished: str | None = field(default=None)
    error: str | None = field(default=None)           # why, when finished == FINISH_ERROR
    fault: str = field(default="worker")              # "request": the failure is this request's own


class DecodeScheduler:
    """The decode step loop of one instance (rank 0 drives it)."""

    def __init__(self, step_fn: Callable[[ForwardBatch], torch.Tensor], block_size: int,
                 max_batch: int = 64, on_step: Callable[[float, int], None] | None = None) -> None:
        """``on_step(seconds, batch_size)`` is called after each step's forward and sampling
        (the engine's share of TPOT; ``services.decode`` feeds it to ``/metrics``)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._step_fn = step_fn
        self._on_step = on_step
        self.block_size = block_size
        self.max_batch = max_batch
        self._incoming: queue.Queue[Sequence] = queue.Queue()
        self._aborts: queue.Queue[str] = queue.Queue()
        self._running: dict[str, Sequence] = {}
        self._waiting: list[Sequence] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ---- called from any thread -------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def add(self, seq: Sequence) -> None:
        """Hand over a sequence whose KV has landed; aborted at once if the scheduler stopped."""
        self._incoming.put(seq)
        self._wake.set()
        if self._stop.is_set() and (self._thread is None or not self._thread.is_alive()):
            self._drain_on_stop()

    def abort(self, seq_id: str) -> None:
        self._aborts.put(seq_id)
        self._wake.set()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._incoming.qsize()

    # ---- the step: the scheduler thread, or an in-process engine (engine.llm_engine) -------
    def step(self) -> bool:
        """Admit what was handed over (and apply aborts), then run one decode step over every
        running sequence; False when nothing was running. Synchronous: the scheduler thread
        (:meth:`start`) calls it in a loop, ``engine.llm_engine.LLMEngine.step`` directly
        (never both on one scheduler)."""
        self._admit()
        if not self._running:
            return False
        try:
            self._step()
        except Exception as exc:  # a bug outside the isolated parts: fail the batch, keep serving
            log.exception("decode step failed")
            for seq in list(self._running.values()):
                self._finish(seq, FINISH_ERROR, error=f"decode step failed: {exc}")
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._wake.wait(0.5)
                self._wake.clear()
        self._drain_on_stop()

    def _drain_on_stop(self) -> None:
        """Abort every sequence the scheduler holds or was handed, so all blocks are released."""
        self._take_incoming()
        for seq in list(self._running.values()) + self._waiting:
            self._finish(seq, FINISH_ABORT)
        self._waiting = []

    def _take_incoming(self) -> None:
        while True:
            try:
                self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        self._take_incoming()
        aborted = set()
        while True:
            try:
                aborted.add(self._aborts.get_nowait())
            except queue.Empty:
                break
        for seq_id in aborted:
            if seq_id in self._running:
                self._finish(self._running[seq_id], FINISH_ABORT)
        keep = []
        for seq in self._waiting:
            if seq.seq_id in aborted:
                self._finish(seq, FINISH_ABORT)
            elif len(self._running) < self.max_batch:
                self._running[seq.seq_id] = seq
            else:
                keep.append(seq)
        self._waiting = keep

    def _step(self) -> None:
        seqs = list(self._running.values())
        t0 = time.perf_counter()
        try:
            tokens, logprobs = self._forward_and_sample(seqs)
            if self._on_step is not None:
                self._on_step(time.perf_counter() - t0, len(seqs))
        except Exception as exc:
            if len(seqs) == 1:
                self._finish(seqs[0], FINISH_ERROR, error=f"decode step failed: {exc}")
                return
            log.warning("decode step over %d sequences failed (%s); stepping each alone", len(seqs), exc)
            tokens, logprobs, failures = [], [], 0
            for seq in seqs:
                try:
                    token, logprob = self._forward_and_sample([seq])
                    tokens += token
                    logprobs += logprob
                except Exception as alone:
                    failures += 1
                    tokens.append(alone)
                    logprobs.append(None)
            fault = "request" if failures < len(seqs) else "worker"
            for seq, token in zip(seqs, tokens):
                if isinstance(token, Exception) and not isinstance(token, SamplingError):
                    self._finish(seq, FINISH_ERROR, error=f"decode step failed: {token}", fault=fault)
        self.steps += 1
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            if seq.finished is not None:
                continue
            if isinstance(token, SamplingError):
                self._finish(seq, FINISH_ERROR, error=str(token), fault="request")
                continue
            seq.num_cached += 1
            seq.generated += 1
            seq.last_token = token
            if token in seq.eos_token_ids and not seq.ignore_eos:
                reason = FINISH_STOP
            elif seq.generated >= seq.max_tokens:
                reason = FINISH_LENGTH
            else:
                reason = None
            try:
                seq.emit(token, reason, logprob)
            except Exception as exc:
                log.exception("emitting a token of %s failed", seq.seq_id)
                self._finish(seq, FINISH_ERROR, error=f"emitting a token failed: {exc}")
                continue
            if reason is not None:
                self._finish(seq, reason, emitted=True)

    def _forward_and_sample(self, seqs: list[Sequence]) -> tuple[list, list]:
        """One forward pass over ``seqs``: a token (or the row's SamplingError) for each, and its
        ``TokenLogprob`` for the sequences that ask (None for the others)."""
        batch = ForwardBatch.decode([s.last_token for s in seqs], [s.num_cached for s in seqs],
                                    [s.blocks for s in seqs], self.block_size)
        logits = self._step_fn(batch)
        tokens = sample_batch(logits, [s.sampling for s in seqs], [s.generated for s in seqs])
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        for k in {s.sampling.logprobs for s in seqs} - {-1}:  # one call per top-k count asked for
            rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs == k and isinstance(tokens[i], int)]
            for i, entry in zip(rows, logprobs_of(logits[rows], [tokens[i] for i in rows], k)):
                logprobs[i] = entry
        return tokens, logprobs

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, emitted: bool = False,
                fault: str = "worker") -> None:
        if seq.finished is not None:
            return
        seq.finished = reason
        seq.error = error
        seq.fault = fault
        self._running.pop(seq.seq_id, None)
        try:
            seq.release()
        finally:
            if not emitted:
                seq.emit(None, reason, None)
