"""Continuous batching in DecodeScheduler with a fake step function (engine/scheduler.py).

The fake model makes the next token ``(input_id + 1) % VOCAB`` (greedy), so every sequence's
expected stream is known in advance whatever else shares its batch.
"""
from __future__ import annotations

import queue
import threading

import pytest
import torch

from engine.batch import ForwardBatch
from engine.block_manager import BlockManager
from engine.sampler import SamplingConfig
from engine.scheduler import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, DecodeScheduler, Sequence

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

VOCAB = 50
BLOCK = 4
WAIT = 10.0  # seconds any single wait may take before the test fails


def next_token_logits(batch: ForwardBatch) -> torch.Tensor:
    logits = torch.full((batch.num_seqs, VOCAB), -10.0)
    logits[torch.arange(batch.num_seqs), (batch.input_ids + 1) % VOCAB] = 10.0
    return logits


class Recorder:
    """emit/release callbacks of one sequence, observable from the test thread."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.emits_after_finish = 0
        self.releases = 0
        self.done = threading.Event()

    def emit(self, token, reason, logprob=None) -> None:
        if self.finish is not None:
            self.emits_after_finish += 1
        if token is not None:
            self.tokens.append(token)
        if reason is not None:
            self.finish = reason
        self._maybe_done()

    def release(self) -> None:
        self.releases += 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        # the scheduler emits the last token before releasing, but releases before emitting
        # (None, reason): the sequence is done once both happened
        if self.finish is not None and self.releases:
            self.done.set()

    def wait(self) -> None:
        assert self.done.wait(WAIT), "sequence never finished"


_BLOCKS: list[BlockManager] = []    # the current test's block manager (set by the autouse fixture)


@pytest.fixture(autouse=True)
def blocks():
    """One block manager per test, shared by its schedulers and sequences; its invariants
    hold at the end and nothing is left held."""
    _BLOCKS[:] = [BlockManager(256, BLOCK, prefix_cache=False)]
    yield _BLOCKS[0]
    _BLOCKS[0].check()


def make_seq(seq_id: str, first_token: int, prompt_len: int = 5, max_tokens: int = 4,
             eos=(), ignore_eos: bool = False) -> tuple[Sequence, Recorder]:
    """A sequence whose prompt's KV has landed: it holds prompt + 1 slots in the test's blocks."""
    rec = Recorder()
    _BLOCKS[0].allocate(seq_id, None, prompt_len + 1)
    seq = Sequence(seq_id=seq_id, tokens=[1] * prompt_len + [first_token], num_cached=prompt_len,
                   generated=1, max_tokens=max_tokens, sampling=SamplingConfig(),
                   eos_token_ids=frozenset(eos), ignore_eos=ignore_eos, emit=rec.emit,
                   release=rec.release)
    return seq, rec


def expected_stream(first_token: int, n: int) -> list[int]:
    return [(first_token + i) % VOCAB for i in range(1, n + 1)]


@pytest.fixture
def make_scheduler():
    made = []

    def build(step_fn=next_token_logits, max_batch: int = 64) -> DecodeScheduler:
        sched = DecodeScheduler(step_fn, _BLOCKS[0], max_batch=max_batch)
        sched.start()
        made.append(sched)
        return sched

    yield build
    for sched in made:
        sched.stop()


class GatedStep:
    """A step function that runs one step per ``release()`` so tests control interleaving."""

    def __init__(self, inner=next_token_logits) -> None:
        self.inner = inner
        self.batches: list[ForwardBatch] = []
        self.entered = queue.Queue()
        self._go = threading.Semaphore(0)

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        self.entered.put(batch.num_seqs)
        assert self._go.acquire(timeout=WAIT), "test never released the step"
        self.batches.append(batch)
        return self.inner(batch)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.entered.get(timeout=WAIT)
            self._go.release()


def test_sequences_joining_at_different_times_get_their_own_streams(make_scheduler):
    gate = GatedStep()
    sched = make_scheduler(gate)
    a, ra = make_seq("a", first_token=3, max_tokens=6)
    sched.add(a)
    gate.step(1)                               # step 1: a alone
    assert gate.entered.get(timeout=WAIT) == 1  # step 2 in progress: b arrives now
    b, rb = make_seq("b", first_token=40, max_tokens=5, prompt_len=2)
    sched.add(b)
    gate._go.release()
    assert gate.entered.get(timeout=WAIT) == 2  # step 3: a and b; c arrives now
    c, rc = make_seq("c", first_token=48, max_tokens=3, prompt_len=9)
    sched.add(c)
    gate._go.release()
    # a needs steps 1-5, b steps 3-6, c steps 4-5
    sizes = []
    for _ in range(3):
        sizes.append(gate.entered.get(timeout=WAIT))
        gate._go.release()
    assert sizes == [3, 3, 1]
    for rec, first, n in ((ra, 3, 5), (rb, 40, 4), (rc, 48, 2)):
        rec.wait()
        assert rec.tokens == expected_stream(first, n)   # token 1 came from prefill
        assert rec.finish == FINISH_LENGTH
        assert rec.releases == 1
        assert rec.emits_after_finish == 0
    assert len(gate.batches) == 6


def test_max_tokens_one_more_token_then_length(make_scheduler):
    sched = make_scheduler()
    seq, rec = make_seq("s", first_token=0, max_tokens=2)
    sched.add(seq)
    rec.wait()
    assert rec.tokens == [1]
    assert rec.finish == FINISH_LENGTH and seq.finished == FINISH_LENGTH
    assert rec.releases == 1


def test_eos_stops_unless_ignored(make_scheduler):
    sched = make_scheduler()
    stop, rstop = make_seq("stop", first_token=10, max_tokens=20, eos={13})
    keep, rkeep = make_seq("keep", first_token=10, max_tokens=6, eos={13}, ignore_eos=True)
    sched.add(stop)
    sched.add(keep)
    rstop.wait()
    rkeep.wait()
    assert rstop.tokens == [11, 12, 13]   # the EOS token itself is emitted, with the finish
    assert rstop.finish == FINISH_STOP
    assert rkeep.tokens == [11, 12, 13, 14, 15]
    assert rkeep.finish == FINISH_LENGTH
    assert rstop.releases == rkeep.releases == 1


def test_abort_running_sequence(make_scheduler):
    gate = GatedStep()
    sched = make_scheduler(gate)
    seq, rec = make_seq("r", first_token=1, max_tokens=100)
    sched.add(seq)
    gate.step(2)
    gate.entered.get(timeout=WAIT)  # the third step is in progress
    sched.abort("r")
    gate._go.release()
    rec.wait()
    assert rec.finish == FINISH_ABORT
    assert rec.tokens == [2, 3, 4]   # tokens of finished steps only, then (None, "abort")
    assert rec.releases == 1
    sched.abort("r")                 # aborting again is harmless
    sched.abort("unknown")
    other, rother = make_seq("o", first_token=1, max_tokens=2)
    sched.add(other)
    gate.step(1)
    rother.wait()
    assert rec.releases == 1 and rec.emits_after_finish == 0
    assert rother.finish == FINISH_LENGTH


def test_abort_waiting_sequence(make_scheduler):
    gate = GatedStep()
    sched = make_scheduler(gate, max_batch=1)
    first, rfirst = make_seq("first", first_token=0, max_tokens=3)
    sched.add(first)
    gate.entered.get(timeout=WAIT)   # step 1 of "first" running; "waiting" cannot join (max_batch=1)
    waiting, rwait = make_seq("waiting", first_token=0, max_tokens=3)
    sched.add(waiting)
    sched.abort("waiting")
    gate._go.release()
    gate.step(1)
    rfirst.wait()
    rwait.wait()
    assert rwait.finish == FINISH_ABORT and rwait.tokens == []
    assert rwait.releases == 1
    assert rfirst.tokens == [1, 2] and rfirst.finish == FINISH_LENGTH
    assert all(b.num_seqs == 1 for b in gate.batches)
    assert len(gate.batches) == 2    # the aborted sequence never ran a step


def test_max_batch_respected(make_scheduler):
    sizes = []
    lock = threading.Lock()

    def step(batch):
        with lock:
            sizes.append(batch.num_seqs)
        return next_token_logits(batch)

    sched = make_scheduler(step, max_batch=3)
    recs = []
    for i in range(8):
        seq, rec = make_seq(f"s{i}", first_token=i, max_tokens=4)
        sched.add(seq)
        recs.append((i, rec))
    for i, rec in recs:
        rec.wait()
        assert rec.tokens == expected_stream(i, 3)
        assert rec.finish == FINISH_LENGTH and rec.releases == 1
    assert max(sizes) <= 3
    assert sum(sizes) == 8 * 3       # every sequence ran exactly its 3 steps


def test_failing_step_fails_running_sequences_and_scheduler_keeps_serving(make_scheduler):
    calls = {"n": 0}

    def step(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return next_token_logits(batch)

    sched = make_scheduler(step)
    doomed, rdoomed = make_seq("doomed", first_token=5, max_tokens=10)
    sched.add(doomed)
    rdoomed.wait()
    assert rdoomed.finish == FINISH_ERROR
    assert rdoomed.tokens == [6]
    assert doomed.finished == FINISH_ERROR and "device fell over" in doomed.error
    assert rdoomed.releases == 1
    later, rlater = make_seq("later", first_token=20, max_tokens=4)
    sched.add(later)
    rlater.wait()
    assert rlater.tokens == [21, 22, 23] and rlater.finish == FINISH_LENGTH
    assert rlater.releases == 1


def test_positions_and_slots_advance_one_per_step(make_scheduler):
    gate = GatedStep()
    sched = make_scheduler(gate)
    seq, rec = make_seq("p", first_token=30, prompt_len=5, max_tokens=6)
    sched.add(seq)
    gate.step(5)
    rec.wait()
    assert len(gate.batches) == 5
    for step, batch in enumerate(gate.batches):
        pos = 5 + step               # token 1 sits at the prompt length, then +1 per step
        assert not batch.is_prefill
        assert batch.input_ids.tolist() == [30 + step]
        assert batch.positions.tolist() == [pos]
        table = batch.block_tables.tolist()[0]
        assert len(table) == pos // BLOCK + 1        # a block more each time a boundary is crossed
        assert batch.slot_mapping.tolist() == [table[pos // BLOCK] * BLOCK + pos % BLOCK]
        assert batch.context_lens.tolist() == [pos + 1]
        assert table[:2] == gate.batches[0].block_tables.tolist()[0][:2]   # earlier blocks stay
    assert rec.tokens == expected_stream(30, 5)


def test_stop_aborts_running_and_waiting():
    gate = GatedStep()
    sched = DecodeScheduler(gate, _BLOCKS[0], max_batch=1)
    sched.start()
    running, rrun = make_seq("run", first_token=0, max_tokens=50)
    waiting, rwait = make_seq("wait", first_token=0, max_tokens=50)
    sched.add(running)
    sched.add(waiting)
    gate.entered.get(timeout=WAIT)
    stopper = threading.Thread(target=sched.stop)
    stopper.start()
    gate._go.release()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    for rec in (rrun, rwait):
        rec.wait()
        assert rec.finish == FINISH_ABORT and rec.releases == 1


def test_bad_max_batch():
    with pytest.raises(ValueError, match="need max_batch >= 1.*got 0,"):
        DecodeScheduler(next_token_logits, _BLOCKS[0], max_batch=0)


# ---- one sequence's failure never touches its batch-mates (issue: per-request faults) -------

def _run_all(step_fn, pairs):
    """Run ``pairs`` of (sequence, recorder) from the same first step (one batch) to the end."""
    sched = DecodeScheduler(step_fn, _BLOCKS[0])
    for seq, _ in pairs:
        sched.add(seq)  # queued before the loop starts: admitted together
    sched.start()
    try:
        for _, rec in pairs:
            rec.wait()
    finally:
        sched.stop()


def test_a_sequence_whose_sampling_fails_leaves_its_batch_mates_unchanged():
    """Row 'bad' gets NaN logits (as a broken row would): it alone ends, as the request's fault,
    and every batch-mate streams exactly what it streams alone."""
    def nan_for_bad_row(batch: ForwardBatch) -> torch.Tensor:
        logits = next_token_logits(batch)
        logits[batch.input_ids == 17] = float("nan")  # the bad sequence's first token is 17
        return logits

    alone = {}
    for sid, first in (("a", 3), ("b", 30)):
        seq, rec = make_seq(sid, first_token=first, max_tokens=6)
        _run_all(next_token_logits, [(seq, rec)])
        alone[sid] = rec.tokens
    a, ra = make_seq("a", first_token=3, max_tokens=6)
    bad, rbad = make_seq("bad", first_token=17, max_tokens=6)
    b, rb = make_seq("b", first_token=30, max_tokens=6)
    hot = Sequence(**{**vars(make_seq("t", first_token=5, max_tokens=6)[0]),
                      "sampling": SamplingConfig(temperature=6.2e-38, seed=1)})
    rhot = Recorder()
    hot.emit, hot.release = rhot.emit, rhot.release
    _run_all(nan_for_bad_row, [(a, ra), (bad, rbad), (b, rb), (hot, rhot)])
    assert ra.tokens == alone["a"] and rb.tokens == alone["b"]
    assert ra.finish == rb.finish == FINISH_LENGTH
    assert bad.finished == FINISH_ERROR and bad.fault == "request" and "NaN" in bad.error
    assert rbad.releases == 1 and rbad.tokens == []
    # a tiny temperature samples like greedy instead of overflowing
    assert rhot.tokens == expected_stream(5, 5) and rhot.finish == FINISH_LENGTH


def test_a_forward_pass_that_fails_is_rerun_one_sequence_at_a_time():
    """A batched step that raises because of one sequence's input: that sequence ends as the
    request's fault, the others get the tokens they get alone."""
    def breaks_on_13(batch: ForwardBatch) -> torch.Tensor:
        if bool((batch.input_ids == 13).any()):
            raise RuntimeError("index 13 is out of range for this device")
        return next_token_logits(batch)

    a, ra = make_seq("a", first_token=20, max_tokens=5)
    bad, rbad = make_seq("bad", first_token=13, max_tokens=5)
    _run_all(breaks_on_13, [(a, ra), (bad, rbad)])
    assert ra.tokens == expected_stream(20, 4) and ra.finish == FINISH_LENGTH
    assert bad.finished == FINISH_ERROR and bad.fault == "request" and "out of range" in bad.error
    assert rbad.releases == 1


def test_a_step_that_fails_for_every_sequence_is_a_worker_fault():
    def broken(batch):
        raise RuntimeError("device lost")

    pairs = [make_seq(s, first_token=t) for s, t in (("a", 1), ("b", 2))]
    _run_all(broken, pairs)
    for seq, rec in pairs:
        assert seq.finished == FINISH_ERROR and seq.fault == "worker" and rec.releases == 1


# ---- blocks on demand and preemption (issue 21) ------------------------------------------------

class Recompute:
    """A ``prefill_fn`` that records what a resumed sequence recomputes (the fake model needs
    no KV: its next token depends on the input token only)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []      # (tokens, of them cached)

    def __call__(self, tokens, table, num_cached) -> None:
        assert len(table) * BLOCK >= len(tokens) + 1
        self.calls.append((len(tokens), num_cached))


def _run_with(blocks: BlockManager, pairs, recompute=None, max_preemptions: int = 8, max_batch: int = 64):
    sched = DecodeScheduler(next_token_logits, blocks, max_batch=max_batch, prefill_fn=recompute,
                            max_preemptions=max_preemptions)
    for seq, _ in pairs:
        sched.add(seq)
    sched.start()
    try:
        for _, rec in pairs:
            rec.wait()
    finally:
        sched.stop()
    return sched


def test_sequences_grow_on_demand_and_preempt_without_changing_a_token(blocks):
    """Three sequences that each need 6 blocks share 12: the latest arrivals are preempted and
    resumed by recompute, and every stream equals its stream alone; all blocks come back."""
    _BLOCKS[:] = [BlockManager(13, BLOCK, prefix_cache=True)]
    pairs = [make_seq(s, first_token=t, prompt_len=3, max_tokens=20, ignore_eos=True)
             for s, t in (("a", 1), ("b", 11), ("c", 21))]
    recompute = Recompute()
    sched = _run_with(_BLOCKS[0], pairs, recompute)
    for (seq, rec), first in zip(pairs, (1, 11, 21)):
        assert rec.tokens == expected_stream(first, 19) and rec.finish == FINISH_LENGTH
        assert rec.releases == 1 and rec.emits_after_finish == 0
    assert sched.preemptions >= 1 and recompute.calls
    assert all(n >= 3 and cached % BLOCK == 0 and cached <= n for n, cached in recompute.calls)
    assert _BLOCKS[0].used_blocks == 0
    _BLOCKS[0].check()


def test_a_sequence_preempted_too_often_fails_as_a_capacity_fault(blocks):
    """With no preemption allowed, the latest arrival that cannot grow ends with a clear error
    (fault "capacity"); the earlier one runs to its end."""
    _BLOCKS[:] = [BlockManager(7, BLOCK, prefix_cache=False)]     # 6 blocks: one 20-token sequence
    first, rfirst = make_seq("first", first_token=1, prompt_len=3, max_tokens=20, ignore_eos=True)
    late, rlate = make_seq("late", first_token=30, prompt_len=3, max_tokens=20, ignore_eos=True)
    _run_with(_BLOCKS[0], [(first, rfirst), (late, rlate)], Recompute(), max_preemptions=0)
    assert rfirst.tokens == expected_stream(1, 19) and rfirst.finish == FINISH_LENGTH
    assert late.finished == FINISH_ERROR and late.fault == "capacity"
    assert "preempted 1 times" in late.error and "oversubscribed" in late.error
    assert rlate.releases == 1 and _BLOCKS[0].used_blocks == 0


def test_without_a_recompute_path_a_sequence_that_cannot_grow_fails_alone(blocks):
    _BLOCKS[:] = [BlockManager(7, BLOCK, prefix_cache=False)]
    first, rfirst = make_seq("first", first_token=1, prompt_len=3, max_tokens=20, ignore_eos=True)
    late, rlate = make_seq("late", first_token=30, prompt_len=3, max_tokens=20, ignore_eos=True)
    _run_with(_BLOCKS[0], [(first, rfirst), (late, rlate)])
    assert rfirst.finish == FINISH_LENGTH
    assert late.finished == FINISH_ERROR and late.fault == "capacity" and "out of KV blocks" in late.error


def test_a_finished_sequence_leaves_its_computed_blocks_cached(blocks):
    _BLOCKS[:] = [BlockManager(32, BLOCK, prefix_cache=True)]
    seq, rec = make_seq("s", first_token=5, prompt_len=6, max_tokens=7, ignore_eos=True)
    _run_with(_BLOCKS[0], [(seq, rec)])
    computed = seq.tokens[:seq.num_cached]                      # prompt + outputs fed back
    assert len(computed) == 6 + 6
    assert _BLOCKS[0].match(computed) == 12 and _BLOCKS[0].used_blocks == 0


def test_a_sequence_that_outgrows_the_whole_cache_fails_instead_of_waiting_forever(blocks):
    _BLOCKS[:] = [BlockManager(4, BLOCK, prefix_cache=True)]     # 3 blocks = 12 slots
    seq, rec = make_seq("big", first_token=1, prompt_len=3, max_tokens=40, ignore_eos=True)
    _run_with(_BLOCKS[0], [(seq, rec)], Recompute())
    assert seq.finished == FINISH_ERROR and seq.fault == "capacity" and "outgrew" in seq.error
    assert rec.tokens == expected_stream(1, 12 - 3)                # every slot was used first
    assert _BLOCKS[0].used_blocks == 0
