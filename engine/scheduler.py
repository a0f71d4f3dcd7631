"""Continuous batching for decode: sequences join and leave the running batch at step boundaries.

The decode service owns one :class:`DecodeScheduler` and its thread. gRPC handlers (any
thread) call :meth:`add` once a sequence's KV has landed and :meth:`abort` when a client goes
away; the scheduler thread calls :meth:`DecodeScheduler.step` in a loop (the in-process
``engine.llm_engine.LLMEngine`` calls it directly, without the thread). A step runs one
forward pass over every running sequence, samples, and hands each sequence its new token
through the sequence's ``emit`` callback (which must not block: the service forwards it to an
asyncio queue).

Blocks on demand (``engine.block_manager.BlockManager``). A sequence arrives holding the blocks
of its prompt (and a little headroom) under its ``seq_id``; from then on the scheduler owns
them. Before each step every running sequence gets the slot its next token's KV goes to
(``BlockManager.grow``: a new block when it crosses a block boundary). When the cache cannot
give one, the scheduler **preempts** the latest-arrived running sequences until it can: a
preempted sequence commits what it computed (its full blocks stay in the prefix cache until
evicted), gives its blocks back and waits; it resumes, ahead of nothing new but as soon as
there is room, by recomputing the KV of its prompt and the tokens it already generated
(``prefill_fn``: only the part the prefix cache no longer holds), then continues with the token
it had sampled, so its stream loses, repeats or changes nothing. A sequence preempted more than
``max_preemptions`` times ends with an error (``fault == "capacity"``) instead of starving.
When a sequence ends, for any reason, its computed blocks are committed and released, so the
next turn of a conversation finds them cached.

Local prefill (conditional disaggregation, issue 22). A sequence may also arrive *prefilling*
(``Sequence.prefilling``): its prompt's blocks held (the leading ones shared from the prefix
cache: ``num_cached`` tokens), nothing sampled yet. Each step runs the decode batch first, so
running streams keep their TPOT, then prefill chunks of the prefilling sequences, oldest
arrival first, within ``prefill_chunk_tokens`` prompt tokens per step (``--prefill-chunk-tokens``,
a multiple of the block size): each chunk is one ``prefill_fn(tokens[:end], table, start)``
with ``start`` block-aligned (the sequence's progress) and ``end`` the prompt's end or a block
boundary. A long prompt therefore takes several steps, its chunks interleaved with decode steps;
several short prompts share one step's budget. After the last chunk the scheduler samples
the first token from that chunk's logits (output number ``Sequence.generated``, with its
log-probability when asked), emits it, commits the prompt's blocks and the sequence joins the
running batch (or waits for room in it: ``max_batch`` bounds the running batch only). States:
prefilling -> running -> finished, and either of the first two -> preempted -> back where it
was. When a running sequence cannot grow, the victims are the prefilling sequences first
(latest arrival first: they stream nothing yet), then the running ones; a preempted prefilling
sequence commits its computed chunks and restarts its prefill from what the prefix cache still
holds when it resumes. A chunk that raises, or a first token that cannot be sampled, ends that
sequence alone; aborts, EOS or ``max_tokens`` on the first token and the one ``release`` hold
as for landed sequences.

One sequence's failure never fails its batch-mates: a row whose sampling fails
(``engine.sampler.SamplingError``) ends that sequence alone, and a batched forward pass that
raises is re-run one sequence at a time (writing the same KV slots again is harmless), so only
the sequences that fail alone end. Such a failure is the request's own (``fault == "request"``:
not worth retrying elsewhere) when its batch-mates succeeded or its sampling failed; a
sequence that fails alone in a batch where every sequence failed ends as a worker fault.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.batch import ForwardBatch
from engine.block_manager import BlockManager
from engine.kv_cache import OutOfBlocks, blocks_needed
from engine.logprobs import TokenLogprob, logprobs_of
from engine.sampler import SamplingConfig, SamplingError, StepLogits, full_rows, sample_batch, sample_one

log = logging.getLogger(__name__)

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"

DEFAULT_PREFILL_CHUNK_TOKENS = 256


@dataclass
class Sequence:
    """One request being decoded; its blocks are the block manager's, under ``seq_id``.

    A *landed* sequence (the default): ``tokens`` is the prompt and every output so far; the KV
    of ``tokens[:num_cached]`` is in the cache and the last token (sampled, not yet fed to the
    model) is ``tokens[num_cached]``.

    A *prefilling* sequence (``prefilling=True``, local prefill): ``tokens`` is the prompt only,
    the KV of ``tokens[:num_cached]`` is in the cache (what the prefix cache held: a multiple of
    the block size, below the prompt's length), the scheduler computes the rest in chunks and
    samples output number ``generated`` (the outputs before it: 0 for a new request) from the
    last chunk's logits; from then on the sequence is a landed one (``prefilling`` False)."""

    seq_id: str
    tokens: list[int]
    num_cached: int                 # prompt length at admission (prefilling: the cached prefix)
    generated: int                  # output tokens so far (1 at admission: prefill made token 1)
    max_tokens: int
    sampling: SamplingConfig
    eos_token_ids: frozenset[int]
    ignore_eos: bool
    # (token, finish_reason, its TokenLogprob when sampling.logprobs >= 0 else None) -> None
    emit: Callable[[int | None, str | None, TokenLogprob | None], None]
    # called exactly once when the sequence ends, after the scheduler released its blocks
    release: Callable[[], None] = lambda: None
    finished: str | None = field(default=None)
    error: str | None = field(default=None)           # why, when finished == FINISH_ERROR
    # "request": the failure is this request's own; "capacity": preempted too often
    fault: str = field(default="worker")
    preemptions: int = 0
    arrival: int = -1                                 # order of arrival (the scheduler sets it)
    prefilling: bool = False                          # the prompt's KV is still being computed here
    prompt_len: int = 0                               # prompt tokens (set on construction)
    prefill_seconds: float = 0.0                      # prefilling: engine time of its chunks and sampling
    prefill_chunks: int = 0                           # prefilling: chunks run (restarts included)

    def __post_init__(self) -> None:
        if self.prefilling:
            if not 0 <= self.num_cached < len(self.tokens):
                raise ValueError(f"prefilling sequence {self.seq_id}: {self.num_cached} cached tokens of a "
                                 f"{len(self.tokens)}-token prompt (need 0..{len(self.tokens) - 1})")
            self.prompt_len = len(self.tokens)
            return
        if not self.prompt_len:
            self.prompt_len = self.num_cached
        if len(self.tokens) != self.num_cached + 1:
            raise ValueError(f"sequence {self.seq_id}: {len(self.tokens)} tokens, but {self.num_cached} "
                             f"cached + the one sampled = {self.num_cached + 1}")

    @property
    def last_token(self) -> int:
        return self.tokens[-1]


class DecodeScheduler:
    """The decode step loop of one instance (rank 0 drives it)."""

    def __init__(self, step_fn: Callable[[ForwardBatch], "torch.Tensor | StepLogits"], blocks: BlockManager,
                 max_batch: int = 64, on_step: Callable[[float, int], None] | None = None,
                 prefill_fn: Callable[[list[int], list[int], int], object] | None = None,
                 max_preemptions: int = 8, watermark: int = 0,
                 on_preempt: Callable[[], None] | None = None,
                 prefill_chunk_tokens: int | None = None) -> None:
        """``step_fn(batch)``: logits ``[num_seqs, vocab]`` of a decode batch, or the
        ``engine.sampler.StepLogits`` keeping ``batch.full_rows`` (set here). ``blocks``: the
        instance's block manager. ``on_step(seconds, batch_size)`` is called after each step's
        forward and sampling (the engine's share of TPOT; ``services.decode`` feeds it to
        ``/metrics``). ``prefill_fn(tokens, block_table, num_cached)`` computes the KV of
        ``tokens[num_cached:]`` (a resumed sequence's recompute; ``Executor.prefill``); without
        it a sequence is never preempted (one that cannot grow ends with an error) and prefilling
        sequences are refused. For a prefilling sequence's chunks it must return an object with
        ``logits`` ``[1, vocab]`` of the chunk's last position (``engine.batch.PrefillResult``).
        ``watermark``: blocks a resume leaves free while other sequences run.
        ``on_preempt()`` is called once per preemption (metrics). ``prefill_chunk_tokens``: prompt
        tokens of prefilling sequences computed per step, after the decode batch (a multiple of
        the block size; see the module docstring); None: ``DEFAULT_PREFILL_CHUNK_TOKENS`` rounded
        down to whole blocks (one at least)."""
        if max_batch < 1 or max_preemptions < 0 or watermark < 0:
            raise ValueError(f"need max_batch >= 1, max_preemptions >= 0 and watermark >= 0, got {max_batch}, "
                             f"{max_preemptions} and {watermark}")
        if prefill_chunk_tokens is None:
            prefill_chunk_tokens = max(1, DEFAULT_PREFILL_CHUNK_TOKENS // blocks.block_size) * blocks.block_size
        if prefill_chunk_tokens < blocks.block_size or prefill_chunk_tokens % blocks.block_size:
            raise ValueError(f"prefill_chunk_tokens must be a positive multiple of the block size "
                             f"({blocks.block_size}), got {prefill_chunk_tokens}")
        self._step_fn = step_fn
        self._on_step = on_step
        self._prefill_fn = prefill_fn
        self._on_preempt = on_preempt or (lambda: None)
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_batch = max_batch
        self.max_preemptions = max_preemptions
        self.watermark = watermark
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._incoming: queue.Queue[Sequence] = queue.Queue()
        self._aborts: queue.Queue[str] = queue.Queue()
        self._running: dict[str, Sequence] = {}
        self._waiting: list[Sequence] = []
        self._prefilling: dict[str, Sequence] = {}         # holding their blocks, not yet sampled
        self._preempted: deque[Sequence] = deque()      # oldest arrival first
        self._arrivals = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.preemptions = 0
        self.prefill_chunks = 0                          # local-prefill chunks run

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
        """Hand over a sequence whose KV has landed, or a prefilling one (its blocks held under
        ``seq.seq_id``, the whole prompt's; the scheduler releases them when it ends); aborted
        at once if the scheduler stopped. Raises ``ValueError`` for a prefilling sequence this
        scheduler cannot prefill (no ``prefill_fn``, a cached prefix not a multiple of the
        block size)."""
        if seq.prefilling and (self._prefill_fn is None or seq.num_cached % self.block_size):
            raise ValueError(f"cannot prefill {seq.seq_id} here: " + (
                "this scheduler has no prefill function" if self._prefill_fn is None else
                f"{seq.num_cached} cached tokens is not a multiple of the block size {self.block_size}"))
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
        """Sequences handed over and not running: waiting for batch room or prefilling."""
        return len(self._waiting) + len(self._prefilling) + self._incoming.qsize()

    @property
    def num_prefilling(self) -> int:
        """Prefilling sequences admitted (their prompts partly computed, or not yet)."""
        return len(self._prefilling)

    @property
    def num_preempted(self) -> int:
        """Preempted sequences waiting to resume."""
        return len(self._preempted)

    # ---- the step: the scheduler thread, or an in-process engine (engine.llm_engine) -------
    def step(self) -> bool:
        """Admit what was handed over (and apply aborts), resume preempted sequences there is
        room for, give every running sequence its next slot (preempting when the cache is full),
        run one decode step over the running batch, then prefill chunks of prefilling sequences
        within the per-step budget; False when nothing ran.
        Synchronous: the scheduler thread (:meth:`start`) calls it in a loop,
        ``engine.llm_engine.LLMEngine.step`` directly (never both on one scheduler)."""
        self._admit()
        try:
            self._grow()
        except Exception as exc:  # a bug in the bookkeeping: fail the batch, keep serving
            log.exception("decode step bookkeeping failed")
            for seq in list(self._running.values()):
                self._finish(seq, FINISH_ERROR, error=f"decode step failed: {exc}")
        ran = False
        if self._running:
            ran = True
            try:
                self._step()
            except Exception as exc:  # a bug outside the isolated parts: fail the batch, keep serving
                log.exception("decode step failed")
                for seq in list(self._running.values()):
                    self._finish(seq, FINISH_ERROR, error=f"decode step failed: {exc}")
        if self._prefilling:
            try:
                ran = self._prefill_chunks() or ran
            except Exception as exc:  # a bug in the bookkeeping: fail the prefilling ones, keep serving
                log.exception("local prefill bookkeeping failed")
                for seq in list(self._prefilling.values()):
                    self._finish(seq, FINISH_ERROR, error=f"local prefill failed: {exc}")
        return ran or bool(self._preempted)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.step() or (not self._running and not self._prefilling and self._preempted):
                self._wake.wait(0.5 if not self._preempted else 0.01)
                self._wake.clear()
        self._drain_on_stop()

    def _drain_on_stop(self) -> None:
        """Abort every sequence the scheduler holds or was handed, so all blocks are released."""
        self._take_incoming()
        for seq in [*self._running.values(), *self._prefilling.values(), *self._waiting, *self._preempted]:
            self._finish(seq, FINISH_ABORT)
        self._waiting = []
        self._preempted.clear()

    def _take_incoming(self) -> None:
        while True:
            try:
                seq = self._incoming.get_nowait()
            except queue.Empty:
                return
            seq.arrival = next(self._arrivals)
            if seq.prefilling:
                self._prefilling[seq.seq_id] = seq
            else:
                self._waiting.append(seq)

    def _admit(self) -> None:
        self._take_incoming()
        aborted = set()
        while True:
            try:
                aborted.add(self._aborts.get_nowait())
            except queue.Empty:
                break
        for seq in [s for s in [*self._running.values(), *self._prefilling.values(), *self._preempted]
                    if s.seq_id in aborted]:
            self._finish(seq, FINISH_ABORT)
        self._resume()
        keep = []
        for seq in self._waiting:
            if seq.seq_id in aborted:
                self._finish(seq, FINISH_ABORT)
            elif len(self._running) < self.max_batch:
                self._running[seq.seq_id] = seq
            else:
                keep.append(seq)
        self._waiting = keep

    def _resume(self) -> None:
        """Bring preempted sequences back, oldest first, while blocks and batch room allow:
        reuse what the prefix cache still holds, recompute the rest (a prefilling sequence takes
        its whole prompt's blocks again and goes back to prefilling from what was cached)."""
        while self._preempted:
            seq = self._preempted[0]
            if seq.prefilling:
                if not self._resume_prefilling(seq):
                    return
                continue
            if len(self._running) >= self.max_batch:
                return
            computed = seq.tokens[:seq.num_cached]
            if blocks_needed(seq.num_cached + 1, self.block_size) > self.blocks.total:
                self._preempted.popleft()
                self._finish(seq, FINISH_ERROR, fault="capacity",
                             error=f"the sequence ({seq.num_cached + 1} tokens) outgrew this instance's whole KV "
                                   f"cache ({self.blocks.total * self.block_size} token slots)")
                continue
            try:
                cached = self.blocks.allocate(seq.seq_id, computed, seq.num_cached + 1, max_cached=seq.num_cached,
                                              watermark=self.watermark if self._running else 0)
            except OutOfBlocks:
                return
            self._preempted.popleft()
            try:
                if cached < seq.num_cached:
                    self._prefill_fn(computed, self.blocks.table(seq.seq_id), cached)
                self.blocks.commit(seq.seq_id, computed)
            except Exception as exc:
                log.warning("resuming %s failed: %s", seq.seq_id, exc)
                self._finish(seq, FINISH_ERROR, error=f"recomputing the KV of a preempted sequence failed: {exc}")
                continue
            self._running[seq.seq_id] = seq

    def _resume_prefilling(self, seq: Sequence) -> bool:
        """Take a preempted prefilling sequence's prompt blocks again (False: no room yet)."""
        n = len(seq.tokens)
        if blocks_needed(n + 1, self.block_size) > self.blocks.total:
            self._preempted.popleft()
            self._finish(seq, FINISH_ERROR, fault="capacity",
                         error=f"the prompt ({n} tokens) outgrew this instance's whole KV cache "
                               f"({self.blocks.total * self.block_size} token slots)")
            return True
        try:   # at least the last prompt token is computed again: its logits make the first token
            seq.num_cached = self.blocks.allocate(seq.seq_id, seq.tokens, n + 1, max_cached=n - 1,
                                                  watermark=self.watermark if self._running else 0)
        except OutOfBlocks:
            return False
        self._preempted.popleft()
        self._prefilling[seq.seq_id] = seq
        return True

    def _grow(self) -> None:
        """Give every running sequence the slot of its next token, preempting while the cache
        cannot: prefilling sequences first, then running ones, the latest arrival first in each
        (see the module docstring)."""
        for seq in sorted(self._running.values(), key=lambda s: s.arrival):
            while seq.seq_id in self._running:
                try:
                    self.blocks.grow(seq.seq_id, seq.num_cached + 1)
                    break
                except OutOfBlocks as exc:
                    victim = max(self._prefilling.values() or self._running.values(), key=lambda s: s.arrival)
                    if self._prefill_fn is None:
                        self._finish(victim, FINISH_ERROR, error=f"out of KV blocks: {exc}", fault="capacity")
                    else:
                        self._preempt(victim)

    def _preempt(self, seq: Sequence) -> None:
        self._running.pop(seq.seq_id, None)
        self._prefilling.pop(seq.seq_id, None)
        self.blocks.commit(seq.seq_id, seq.tokens[:seq.num_cached])
        self.blocks.release(seq.seq_id)
        seq.preemptions += 1
        self.preemptions += 1
        self._on_preempt()
        if seq.preemptions > self.max_preemptions:
            self._finish(seq, FINISH_ERROR, fault="capacity",
                         error=f"preempted {seq.preemptions} times for lack of KV blocks (the limit is "
                               f"{self.max_preemptions}): the decode instance is oversubscribed")
            return
        log.info("preempted %s (%d tokens computed, preemption %d)", seq.seq_id, seq.num_cached, seq.preemptions)
        at = next((i for i, s in enumerate(self._preempted) if s.arrival > seq.arrival), len(self._preempted))
        self._preempted.insert(at, seq)

    def _prefill_chunks(self) -> bool:
        """Run prefill chunks of the prefilling sequences, oldest arrival first, within
        ``prefill_chunk_tokens`` prompt tokens; True when any chunk ran."""
        budget, ran = self.prefill_chunk_tokens, False
        for seq in sorted(self._prefilling.values(), key=lambda s: s.arrival):
            start, n = seq.num_cached, len(seq.tokens)
            end = n if n - start <= budget else start + budget // self.block_size * self.block_size
            if end <= start:           # what is left of the budget is under a block
                break
            budget -= end - start
            ran = True
            self._prefill_chunk(seq, start, end)
            if budget < self.block_size:
                break
        return ran

    def _prefill_chunk(self, seq: Sequence, start: int, end: int) -> None:
        """Compute ``seq.tokens[start:end]``; after the prompt's last chunk, sample and emit the
        first token and move the sequence to the running batch (or the waiting line)."""
        t0 = time.perf_counter()
        try:
            self.blocks.grow(seq.seq_id, end)      # a no-op while it holds its prompt's blocks
            out = self._prefill_fn(seq.tokens[:end], self.blocks.table(seq.seq_id), start)
        except Exception as exc:
            log.warning("prefill chunk [%d, %d) of %s failed: %s", start, end, seq.seq_id, exc)
            self._finish(seq, FINISH_ERROR, error=f"prefill of tokens {start}..{end} failed: {exc}")
            return
        finally:
            seq.prefill_seconds += time.perf_counter() - t0
            seq.prefill_chunks += 1
            self.prefill_chunks += 1
        seq.num_cached = end
        if end < len(seq.tokens):
            return
        t0 = time.perf_counter()
        try:
            logits = out.logits
            token = sample_one(logits[0], seq.sampling, seq.generated)
            logprob = logprobs_of(logits[:1], [token], seq.sampling.logprobs)[0] \
                if seq.sampling.logprobs >= 0 else None
        except SamplingError as exc:   # the request's own, the same on any worker
            self._finish(seq, FINISH_ERROR, error=str(exc), fault="request")
            return
        except Exception as exc:
            self._finish(seq, FINISH_ERROR, error=f"sampling the first token failed: {exc}")
            return
        finally:
            seq.prefill_seconds += time.perf_counter() - t0
        del self._prefilling[seq.seq_id]
        seq.prefilling = False
        try:
            self.blocks.commit(seq.seq_id, seq.tokens)        # the prompt's full blocks are shareable
        except Exception as exc:
            self._finish(seq, FINISH_ERROR, error=f"committing the prompt's KV failed: {exc}")
            return
        self._deliver(seq, token, logprob)
        if seq.finished is not None:                        # EOS, length, or its emit failed
            return
        if len(self._running) < self.max_batch and not self._waiting:
            self._running[seq.seq_id] = seq
        else:
            self._waiting.append(seq)

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
            self._deliver(seq, token, logprob)

    def _deliver(self, seq: Sequence, token: int, logprob) -> None:
        """Append a sampled ``token`` to ``seq``, emit it with the finish reason it brings (EOS
        unless ignored, or ``max_tokens`` reached) and end the sequence then; a raising emit
        callback ends it with an error. Decode steps and a local prefill's first token share it."""
        seq.tokens.append(token)
        seq.generated += 1
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
            return
        if reason is not None:
            self._finish(seq, reason, emitted=True)

    def _forward_and_sample(self, seqs: list[Sequence]) -> tuple[list, list]:
        """One forward pass over ``seqs``: a token (or the row's SamplingError) for each, and its
        ``TokenLogprob`` for the sequences that ask (None for the others)."""
        batch = ForwardBatch.decode([s.last_token for s in seqs], [s.num_cached for s in seqs],
                                    self.blocks.tables([s.seq_id for s in seqs]), self.block_size)
        cfgs = [s.sampling for s in seqs]
        batch.full_rows = full_rows(cfgs)    # greedy rows come back reduced (StepLogits)
        logits = self._step_fn(batch)
        tokens = sample_batch(logits, cfgs, [s.generated for s in seqs])
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        for k in {s.sampling.logprobs for s in seqs} - {-1}:  # one call per top-k count asked for
            rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs == k and isinstance(tokens[i], int)]
            if not rows:      # every row asking for k failed to sample
                continue
            whole = torch.stack([logits.row(i) for i in rows]) if isinstance(logits, StepLogits) else logits[rows]
            for i, entry in zip(rows, logprobs_of(whole, [tokens[i] for i in rows], k)):
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
        self._prefilling.pop(seq.seq_id, None)
        try:   # the end is emitted before the release: a worker that sees nothing busy has sent it
            if not emitted:
                seq.emit(None, reason, None)
        finally:
            if self.blocks.holds(seq.seq_id):   # a preempted sequence holds none
                try:                            # what it computed stays cached for a next turn
                    self.blocks.commit(seq.seq_id, seq.tokens[:seq.num_cached])
                finally:
                    self.blocks.release(seq.seq_id)
            seq.release()
