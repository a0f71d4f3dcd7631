"""Continuous batching for decode: sequences join and leave the running batch at step boundaries.

The decode service owns one :class:`DecodeScheduler` and its thread. gRPC handlers (any
thread) call :meth:`add` once a sequence's KV has landed and :meth:`abort` when a client goes
away; the scheduler thread runs one forward pass per step over every running sequence,
samples, and hands each sequence its new token through the sequence's ``emit`` callback
(which must not block: the service forwards it to an asyncio queue).

A sequence's blocks were reserved for prompt + max_tokens before it arrives, so it can never
run out mid-stream; the scheduler frees them (``release``) when the sequence ends for any reason.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.batch import ForwardBatch
from engine.sampler import SamplingConfig, sample_batch

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
    emit: Callable[[int | None, str | None], None]  # (token, finish_reason) -> None
    release: Callable[[], None] = lambda: None       # frees the blocks; called exactly once
    finished: str | None = field(default=None)
    error: str | None = field(default=None)           # why, when finished == FINISH_ERROR


class DecodeScheduler:
    """The decode step loop of one instance (rank 0 drives it)."""

    def __init__(self, step_fn: Callable[[ForwardBatch], torch.Tensor], block_size: int,
                 max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._step_fn = step_fn
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

    # ---- scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit()
            if not self._running:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:  # a failed step fails its sequences, not the process
                log.exception("decode step failed")
                for seq in list(self._running.values()):
                    self._finish(seq, FINISH_ERROR, error=f"decode step failed: {exc}")
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
        batch = ForwardBatch.decode([s.last_token for s in seqs], [s.num_cached for s in seqs],
                                    [s.blocks for s in seqs], self.block_size)
        logits = self._step_fn(batch)
        tokens = sample_batch(logits, [s.sampling for s in seqs], [s.generated for s in seqs])
        self.steps += 1
        for seq, token in zip(seqs, tokens):
            seq.num_cached += 1
            seq.generated += 1
            seq.last_token = token
            if token in seq.eos_token_ids and not seq.ignore_eos:
                reason = FINISH_STOP
            elif seq.generated >= seq.max_tokens:
                reason = FINISH_LENGTH
            else:
                reason = None
            seq.emit(token, reason)
            if reason is not None:
                self._finish(seq, reason, emitted=True)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, emitted: bool = False) -> None:
        if seq.finished is not None:
            return
        seq.finished = reason
        seq.error = error
        self._running.pop(seq.seq_id, None)
        try:
            seq.release()
        finally:
            if not emitted:
                seq.emit(None, reason)
