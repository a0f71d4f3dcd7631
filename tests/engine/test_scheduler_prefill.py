"""Local prefill in DecodeScheduler (issue 22, conditional disaggregation): sequences that arrive
*prefilling* are computed in chunks after each decode step, then decode like landed ones.

The fake model (:class:`KVModel`) keeps a token id per KV slot, writes every token it runs into
its slot and reads the whole context back from the slots the block table names: the next token
is ``(sum of the context + its last position) % VOCAB``, as ``engine.runtime.fake.FakeExecutor``.
A chunk that skipped a token, a block shared from the prefix cache that did not hold what its
hash says, or a restart that read a stale block changes the tokens (and a prefill that claims a
cached prefix checks the slots hold it), so each stream is checked against :func:`expected`.
Most tests drive ``DecodeScheduler.step`` by hand (no thread) so the order of decode steps and
prefill chunks is exact.
"""
from __future__ import annotations

import threading

import pytest
import torch

from engine.batch import ForwardBatch, PrefillResult, check_num_cached
from engine.block_manager import BlockManager
from engine.logprobs import logprobs_of
from engine.sampler import SamplingConfig, sample_one
from engine.scheduler import (FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, DecodeScheduler,
                              Sequence)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

VOCAB = 61
BLOCK = 4
WAIT = 10.0


def expected(prompt: list[int], n: int) -> list[int]:
    """The greedy tokens :class:`KVModel` gives ``prompt``."""
    ids, out = list(prompt), []
    for _ in range(n):
        out.append((sum(ids) + len(ids) - 1) % VOCAB)
        ids.append(out[-1])
    return out


class KVModel:
    """The fake model of the module docstring; ``log`` lists its passes in order:
    ``("decode", positions)`` and ``("prefill", first prompt token, start, end)``.
    ``peaked`` False: logits fall off around the target (seeded sampling draws near it);
    ``fail_on``: a prefill chunk whose prompt starts with this token raises."""

    def __init__(self, peaked: bool = True) -> None:
        self.kv: dict[int, int] = {}
        self.log: list[tuple] = []
        self.peaked = peaked
        self.fail_on: int | None = None
        self.nan_on: int | None = None

    def _logits(self, total: int, pos: int) -> torch.Tensor:
        target = (total + pos) % VOCAB
        if self.peaked:
            row = torch.full((VOCAB,), -10.0)
            row[target] = 10.0
        else:
            row = -0.7 * ((torch.arange(VOCAB) - target) % VOCAB).float()
        return row

    def _context(self, table: list[int], n: int) -> int:
        return sum(self.kv[table[p // BLOCK] * BLOCK + p % BLOCK] for p in range(n))

    def step(self, batch: ForwardBatch) -> torch.Tensor:
        positions = batch.positions.tolist()
        self.log.append(("decode", tuple(positions)))
        for slot, tok in zip(batch.slot_mapping.tolist(), batch.input_ids.tolist()):
            self.kv[slot] = tok
        tables = batch.block_tables.tolist()
        return torch.stack([self._logits(self._context(tables[i], pos + 1), pos) for i, pos in enumerate(positions)])

    def prefill(self, tokens: list[int], table: list[int], num_cached: int) -> PrefillResult:
        check_num_cached(len(tokens), num_cached, BLOCK)
        assert len(table) * BLOCK >= len(tokens)
        self.log.append(("prefill", tokens[0], num_cached, len(tokens)))
        if self.fail_on is not None and tokens[0] == self.fail_on:
            raise RuntimeError("the device refused this chunk")
        for p in range(num_cached):      # the prefix it skips must be in the cache already
            assert self.kv.get(table[p // BLOCK] * BLOCK + p % BLOCK) == tokens[p], f"position {p} not cached"
        for p in range(num_cached, len(tokens)):
            self.kv[table[p // BLOCK] * BLOCK + p % BLOCK] = tokens[p]
        logits = self._logits(self._context(table, len(tokens)), len(tokens) - 1)[None]
        if self.nan_on is not None and tokens[0] == self.nan_on:
            logits[:] = float("nan")
        return PrefillResult(logits)

    def chunks(self, first: int) -> list[tuple[int, int]]:
        """``(start, end)`` of the prefill chunks of the prompt starting with ``first``."""
        return [(e[2], e[3]) for e in self.log if e[0] == "prefill" and e[1] == first]


class Recorder:
    """One sequence's emit/release callbacks."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.finish: str | None = None
        self.releases = 0
        self.emits_after_finish = 0
        self.done = threading.Event()

    def emit(self, token, reason, logprob=None) -> None:
        if self.finish is not None:
            self.emits_after_finish += 1
        if token is not None:
            self.tokens.append(token)
            self.logprobs.append(logprob)
        if reason is not None:
            self.finish = reason
        if self.finish is not None and self.releases:
            self.done.set()

    def release(self) -> None:
        self.releases += 1
        if self.finish is not None:
            self.done.set()

    def wait(self) -> None:
        assert self.done.wait(WAIT), "sequence never finished"


@pytest.fixture
def blocks():
    box = BlockManager(128, BLOCK, prefix_cache=True)
    yield box
    box.check()


def scheduler(model: KVModel, blocks: BlockManager, chunk: int = 8, **kw) -> DecodeScheduler:
    return DecodeScheduler(model.step, blocks, prefill_fn=model.prefill, prefill_chunk_tokens=chunk, **kw)


def local(blocks: BlockManager, seq_id: str, prompt: list[int], max_tokens: int = 6,
          sampling: SamplingConfig = SamplingConfig(), first_index: int = 0, **kw) -> tuple[Sequence, Recorder]:
    """A prefilling sequence as the decode service makes one: the prompt's blocks (+1 slot) held,
    the cached prefix shared (never the last prompt token)."""
    rec = Recorder()
    cached = blocks.allocate(seq_id, prompt, len(prompt) + 1, max_cached=len(prompt) - 1)
    seq = Sequence(seq_id=seq_id, tokens=list(prompt), num_cached=cached, prefilling=True, generated=first_index,
                   max_tokens=first_index + max_tokens, sampling=sampling, eos_token_ids=frozenset(kw.pop("eos", ())),
                   ignore_eos=kw.pop("ignore_eos", False), emit=rec.emit, release=rec.release)
    return seq, rec


def landed(model: KVModel, blocks: BlockManager, seq_id: str, prompt: list[int], max_tokens: int = 6,
           sampling: SamplingConfig = SamplingConfig()) -> tuple[Sequence, Recorder]:
    """The disaggregated path: the whole prompt prefilled at once (as a prefill instance would,
    then pushed), token 1 sampled there; the recorder starts with it."""
    rec = Recorder()
    blocks.allocate(seq_id, None, len(prompt) + 1)
    out = model.prefill(list(prompt), blocks.table(seq_id), 0)
    first = sample_one(out.logits[0], sampling, 0)
    rec.tokens.append(first)
    rec.logprobs.append(logprobs_of(out.logits, [first], sampling.logprobs)[0] if sampling.logprobs >= 0 else None)
    blocks.commit(seq_id, prompt)
    seq = Sequence(seq_id=seq_id, tokens=list(prompt) + [first], num_cached=len(prompt), generated=1,
                   max_tokens=max_tokens, sampling=sampling, eos_token_ids=frozenset(), ignore_eos=False,
                   emit=rec.emit, release=rec.release)
    return seq, rec


def run(sched: DecodeScheduler, *recs: Recorder, limit: int = 200) -> None:
    """Step by hand until every recorder finished."""
    for _ in range(limit):
        if all(r.finish is not None and r.releases for r in recs):
            return
        sched.step()
    raise AssertionError("sequences never finished")


# ---- token exactness ----------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 3, 4, 8, 9, 21])
def test_a_locally_prefilled_stream_equals_the_landed_stream(blocks, length):
    prompt = [(7 * i + 3) % VOCAB for i in range(length)]
    model = KVModel()
    seq, rec = landed(model, blocks, "landed", prompt, max_tokens=7)
    sched = scheduler(model, blocks)
    sched.add(seq)
    run(sched, rec)
    blocks.reset_cache()            # the local one computes everything itself
    model2 = KVModel()
    lseq, lrec = local(blocks, "local", prompt, max_tokens=7)
    assert lseq.num_cached == 0 and lseq.prompt_len == length
    sched2 = scheduler(model2, blocks)
    sched2.add(lseq)
    run(sched2, lrec)
    assert lrec.tokens == rec.tokens == expected(prompt, 7)
    assert lrec.finish == rec.finish == FINISH_LENGTH and lrec.releases == rec.releases == 1
    assert lrec.emits_after_finish == 0
    assert model2.chunks(prompt[0]) == [(s, min(s + 8, length)) for s in range(0, length, 8)]
    assert not lseq.prefilling and lseq.generated == 7 and lseq.prefill_chunks == len(model2.chunks(prompt[0]))
    assert lseq.prefill_seconds > 0
    assert blocks.used_blocks == 0


def test_seeded_sampling_and_logprobs_are_the_landed_paths(blocks):
    """Output number ``first_index`` is drawn with its own seed index and its logprob entry is
    the prefill logits' (a continuation: outputs before it were made elsewhere)."""
    prompt = list(range(5, 24))
    cfg = SamplingConfig(temperature=1.3, top_k=9, seed=1234, logprobs=3)
    model = KVModel(peaked=False)
    seq, rec = landed(model, blocks, "landed", prompt, max_tokens=10, sampling=cfg)
    sched = scheduler(model, blocks)
    sched.add(seq)
    run(sched, rec)
    blocks.reset_cache()
    lseq, lrec = local(blocks, "local", prompt, max_tokens=10, sampling=cfg)
    sched2 = scheduler(KVModel(peaked=False), blocks)
    sched2.add(lseq)
    run(sched2, lrec)
    assert lrec.tokens == rec.tokens and len(set(rec.tokens)) > 3
    assert lrec.tokens != expected(prompt, 10)            # really sampled, not greedy
    assert lrec.logprobs == rec.logprobs and all(lp is not None and len(lp.top) == 3 for lp in lrec.logprobs)
    # a continuation (3 outputs made elsewhere): the first token here is drawn as output number 3
    blocks.reset_cache()
    cont, crec = local(blocks, "cont", prompt, max_tokens=2, sampling=cfg, first_index=3)
    sched3 = scheduler(KVModel(peaked=False), blocks)
    sched3.add(cont)
    run(sched3, crec)
    out = KVModel(peaked=False)
    blocks.allocate("probe", None, len(prompt))
    logits = out.prefill(prompt, blocks.table("probe"), 0).logits
    blocks.release("probe")
    assert crec.tokens[0] == sample_one(logits[0], cfg, 3) and cont.generated == 5


def test_a_prompt_partly_in_the_prefix_cache_computes_only_the_rest(blocks):
    model = KVModel()
    first = list(range(1, 14))                        # 13 tokens: 3 full blocks
    seq, rec = local(blocks, "turn-1", first, max_tokens=4)
    sched = scheduler(model, blocks, chunk=4)
    sched.add(seq)
    run(sched, rec)
    history = first + rec.tokens[:-1]                # the last output's KV was never computed
    turn2 = history + [rec.tokens[-1], 40, 41]
    seq2, rec2 = local(blocks, "turn-2", turn2, max_tokens=5)
    assert seq2.num_cached == len(history) // BLOCK * BLOCK == 16
    sched.add(seq2)
    run(sched, rec2)
    assert rec2.tokens == expected(turn2, 5)
    assert model.chunks(1)[-1] == (16, 19)           # one chunk: the 3 tokens the cache lacks
    # a prompt whose every block is cached still computes its last block (the logits come from it)
    seq3, rec3 = local(blocks, "again", first[:12], max_tokens=2)
    assert seq3.num_cached == 8
    sched.add(seq3)
    run(sched, rec3)
    assert rec3.tokens == expected(first[:12], 2) and model.chunks(1)[-1] == (8, 12)
    assert blocks.used_blocks == 0


# ---- chunks, the budget and the decode batch -----------------------------------------------------

def test_a_long_prompt_is_chunked_between_decode_steps_of_running_streams(blocks):
    """Budget 8: each step runs the decode batch first, then at most 8 prompt tokens."""
    model = KVModel()
    sched = scheduler(model, blocks, chunk=8)
    a, ra = landed(model, blocks, "a", [50] * 5, max_tokens=20)
    model.log.clear()
    sched.add(a)
    sched.step()                                      # a decodes alone
    b, rb = local(blocks, "b", list(range(1, 22)), max_tokens=3)      # 21 tokens: 8 + 8 + 5
    sched.add(b)
    for _ in range(4):
        sched.step()
    assert model.log == [
        ("decode", (5,)),
        ("decode", (6,)), ("prefill", 1, 0, 8),
        ("decode", (7,)), ("prefill", 1, 8, 16),
        ("decode", (8,)), ("prefill", 1, 16, 21),     # last chunk: b samples its first token
        ("decode", (9, 21)),                          # b joined the running batch
    ]
    assert rb.tokens == expected(list(range(1, 22)), 2) and sched.num_running == 2
    assert sched.prefill_chunks == 3
    sched.abort("a")
    run(sched, ra, rb)
    assert rb.tokens == expected(list(range(1, 22)), 3) and rb.finish == FINISH_LENGTH
    assert ra.finish == FINISH_ABORT and ra.tokens == expected([50] * 5, len(ra.tokens))
    assert blocks.used_blocks == 0


def test_prefilling_sequences_share_the_budget_oldest_first(blocks):
    model = KVModel()
    sched = scheduler(model, blocks, chunk=8)
    c, rc = local(blocks, "c", [10] * 5, max_tokens=2)
    d, rd = local(blocks, "d", [20] * 10, max_tokens=2)
    e, re = local(blocks, "e", [30] * 2, max_tokens=2)
    for seq in (c, d, e):
        sched.add(seq)
    sched.step()          # c: 5 tokens; 3 left, under a block: d waits
    sched.step()          # d: 8 (a block-aligned chunk)
    sched.step()          # d's last 2, then e's 2 (6 left, more than e needs)
    assert [e_[1:] for e_ in model.log if e_[0] == "prefill"] == [
        (10, 0, 5), (20, 0, 8), (20, 8, 10), (30, 0, 2)]
    assert [e_ for e_ in model.log if e_[0] == "decode"] == [("decode", (5,))]     # c's second token
    run(sched, rc, rd, re)
    for prompt, rec in (([10] * 5, rc), ([20] * 10, rd), ([30] * 2, re)):
        assert rec.tokens == expected(prompt, 2) and rec.finish == FINISH_LENGTH and rec.releases == 1
    assert blocks.used_blocks == 0


def test_max_batch_bounds_the_running_batch_not_the_prefill(blocks):
    """With max_batch 1 the prefilled sequence emits its first token (TTFT) and waits for room."""
    model = KVModel()
    sched = scheduler(model, blocks, max_batch=1)
    a, ra = landed(model, blocks, "a", [3] * 4, max_tokens=4)
    b, rb = local(blocks, "b", [9] * 6, max_tokens=3)
    sched.add(a)
    sched.add(b)
    sched.step()
    assert rb.tokens == expected([9] * 6, 1) and sched.num_running == 1 and sched.num_waiting == 1
    run(sched, ra, rb)
    assert ra.tokens == expected([3] * 4, 4) and rb.tokens == expected([9] * 6, 3)
    decodes = [e for e in model.log if e[0] == "decode"]
    assert all(len(e[1]) == 1 for e in decodes)
    assert blocks.used_blocks == 0


# ---- the first token ends it -----------------------------------------------------------------------

def test_the_first_token_can_finish_the_sequence(blocks):
    model = KVModel()
    sched = scheduler(model, blocks)
    prompt = [4, 4, 4]
    one, rone = local(blocks, "one", prompt, max_tokens=1)
    stop, rstop = local(blocks, "stop", [5, 4, 4], max_tokens=9, eos={expected([5, 4, 4], 1)[0]})
    sched.add(one)
    sched.add(stop)
    sched.step()
    assert (rone.tokens, rone.finish, rone.releases) == (expected(prompt, 1), FINISH_LENGTH, 1)
    assert (rstop.tokens, rstop.finish, rstop.releases) == (expected([5, 4, 4], 1), FINISH_STOP, 1)
    assert not [e for e in model.log if e[0] == "decode"] and sched.num_running == 0
    assert rone.emits_after_finish == rstop.emits_after_finish == 0
    assert blocks.used_blocks == 0


# ---- aborts, failures, preemption ------------------------------------------------------------------

def test_an_abort_mid_prefill_releases_the_blocks_and_keeps_the_computed_chunks_cached(blocks):
    model = KVModel()
    sched = scheduler(model, blocks, chunk=8)
    prompt = list(range(30, 50))
    seq, rec = local(blocks, "gone", prompt)
    sched.add(seq)
    sched.step()
    assert model.chunks(30) == [(0, 8)] and blocks.used_blocks == 6
    sched.abort("gone")
    sched.step()
    assert (rec.tokens, rec.finish, rec.releases) == ([], FINISH_ABORT, 1)
    assert model.chunks(30) == [(0, 8)] and blocks.used_blocks == 0
    assert blocks.match(prompt) == 8                 # a retry here starts after the first chunk
    sched.abort("gone")
    sched.step()
    assert rec.releases == 1 and rec.emits_after_finish == 0


def test_a_chunk_that_raises_fails_only_its_sequence(blocks):
    model = KVModel()
    model.fail_on = 13
    sched = scheduler(model, blocks, chunk=8)
    a, ra = landed(model, blocks, "a", [2] * 3, max_tokens=6)
    bad, rbad = local(blocks, "bad", [13] * 12)
    good, rgood = local(blocks, "good", [14] * 12, max_tokens=3)
    for seq in (a, bad, good):
        sched.add(seq)
    run(sched, ra, rbad, rgood)
    assert bad.finished == FINISH_ERROR and bad.fault == "worker" and "refused this chunk" in bad.error
    assert rbad.tokens == [] and rbad.releases == 1
    assert ra.tokens == expected([2] * 3, 6) and rgood.tokens == expected([14] * 12, 3)
    # the failed chunk took its budget share: good's first chunk ran the step after
    assert [e[1:] for e in model.log if e[0] == "prefill" and e[1] != 2] == [(13, 0, 8), (14, 0, 8), (14, 8, 12)]
    assert blocks.used_blocks == 0


def test_a_first_token_that_cannot_be_sampled_is_the_requests_fault(blocks):
    model = KVModel()
    model.nan_on = 17
    sched = scheduler(model, blocks)
    bad, rbad = local(blocks, "bad", [17] * 6)
    sched.add(bad)
    sched.step()
    assert bad.finished == FINISH_ERROR and bad.fault == "request" and "NaN" in bad.error
    assert rbad.tokens == [] and rbad.releases == 1 and blocks.used_blocks == 0
    assert blocks.match([17] * 6) == 4               # its computed prompt stays cached


@pytest.mark.parametrize("evicted", [False, True])
def test_a_preempted_prefilling_sequence_restarts_from_what_the_cache_holds(evicted):
    """6 blocks: a (7-token prompt, 2 blocks) decodes into its 3rd block while b (13-token
    prompt, 4 blocks) is one chunk in: b is preempted (prefilling sequences go first), its
    computed chunk stays cached, and it resumes once a finishes, from that chunk (or from 0 when
    the cache lost it); every token is what it is without preemption."""
    blocks = BlockManager(7, BLOCK, prefix_cache=True)
    model = KVModel()
    sched = scheduler(model, blocks, chunk=4)
    a, ra = landed(model, blocks, "a", [6] * 7, max_tokens=6)
    b, rb = local(blocks, "b", list(range(1, 14)), max_tokens=3)
    sched.add(a)
    sched.add(b)
    sched.step()                          # a at position 7; b's chunk [0, 4)
    sched.step()                          # a needs block 3: b is preempted
    assert b.preemptions == 1 and sched.preemptions == 1 and sched.num_preempted == 1
    assert model.chunks(1) == [(0, 4)] and sched.num_prefilling == 0
    if evicted:
        blocks.reset_cache()
    run(sched, ra, rb)
    assert ra.tokens == expected([6] * 7, 6)
    assert rb.tokens == expected(list(range(1, 14)), 3) and rb.finish == FINISH_LENGTH and rb.releases == 1
    restart = 0 if evicted else 4
    assert model.chunks(1)[1:] == [(s, min(s + 4, 13)) for s in range(restart, 13, 4)]
    assert blocks.used_blocks == 0
    blocks.check()


def test_a_running_sequence_is_preempted_only_when_no_prefilling_one_is_left(blocks):
    """The victims are prefilling sequences first, even when they arrived earlier."""
    blocks = BlockManager(8, BLOCK, prefix_cache=False)          # 7 blocks
    model = KVModel()
    sched = scheduler(model, blocks, chunk=4)
    p, rp = local(blocks, "p", [8] * 16, max_tokens=2)           # 5 blocks, arrives first
    sched.add(p)
    sched.step()                                                  # p: [0, 4)
    a, ra = landed(model, blocks, "a", [2] * 7, max_tokens=7)    # 2 blocks, then a 3rd: 7 + 1 = 8
    sched.add(a)
    sched.step()                                                  # a at 7, p: [4, 8)
    sched.step()                                                  # a needs a block: p goes
    assert p.preemptions == 1 and a.preemptions == 0
    run(sched, ra, rp)
    assert ra.tokens == expected([2] * 7, 7) and rp.tokens == expected([8] * 16, 2)
    assert model.chunks(8)[2] == (0, 4)                           # no prefix cache: from the start
    assert blocks.used_blocks == 0


def test_a_prefilling_sequence_preempted_too_often_fails_as_capacity(blocks):
    blocks = BlockManager(7, BLOCK, prefix_cache=True)
    model = KVModel()
    sched = scheduler(model, blocks, chunk=4, max_preemptions=0)
    a, ra = landed(model, blocks, "a", [6] * 7, max_tokens=6)
    b, rb = local(blocks, "b", list(range(1, 14)))
    sched.add(a)
    sched.add(b)
    run(sched, ra, rb)
    assert b.finished == FINISH_ERROR and b.fault == "capacity" and rb.tokens == [] and rb.releases == 1
    assert ra.tokens == expected([6] * 7, 6) and blocks.used_blocks == 0


# ---- the scheduler thread, and what is refused ---------------------------------------------------------

def test_local_and_landed_sequences_on_the_scheduler_thread(blocks):
    model, lock = KVModel(), threading.Lock()      # the test thread runs the landed prefills
    sched = DecodeScheduler(lambda batch: _locked(lock, model.step, batch), blocks,
                            prefill_fn=lambda *a: _locked(lock, model.prefill, *a), prefill_chunk_tokens=8)
    sched.start()
    try:
        pairs = []
        for i in range(6):
            prompt = [(i * 11 + j) % VOCAB for j in range(3 + 5 * i)]
            if i % 2:
                with lock:
                    seq, rec = landed(model, blocks, f"s{i}", prompt, max_tokens=5 + i)
            else:
                seq, rec = local(blocks, f"s{i}", prompt, max_tokens=5 + i)
            sched.add(seq)
            pairs.append((prompt, rec, 5 + i))
        for prompt, rec, n in pairs:
            rec.wait()
            assert rec.tokens == expected(prompt, n) and rec.finish == FINISH_LENGTH and rec.releases == 1
    finally:
        sched.stop()
    assert blocks.used_blocks == 0


def _locked(lock, fn, *args):
    with lock:
        return fn(*args)


def test_stop_aborts_prefilling_sequences(blocks):
    model = KVModel()
    sched = scheduler(model, blocks, chunk=4)
    seq, rec = local(blocks, "p", list(range(40)))
    sched.add(seq)
    sched.step()
    sched.stop()                       # never started: drains what it holds on the next add
    late, rlate = local(blocks, "late", [1, 2])
    sched.add(late)
    assert rec.finish == rlate.finish == FINISH_ABORT and rec.releases == rlate.releases == 1
    assert blocks.used_blocks == 0


def test_what_a_prefilling_sequence_must_be(blocks):
    with pytest.raises(ValueError, match="4 cached tokens of a 4-token prompt"):
        Sequence(seq_id="x", tokens=[1, 2, 3, 4], num_cached=4, prefilling=True, generated=0, max_tokens=2,
                 sampling=SamplingConfig(), eos_token_ids=frozenset(), ignore_eos=False, emit=lambda *a: None)
    odd = Sequence(seq_id="x", tokens=[1, 2, 3, 4, 5, 6], num_cached=2, prefilling=True, generated=0, max_tokens=2,
                   sampling=SamplingConfig(), eos_token_ids=frozenset(), ignore_eos=False, emit=lambda *a: None)
    model = KVModel()
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        scheduler(model, blocks).add(odd)
    with pytest.raises(ValueError, match="no prefill function"):
        DecodeScheduler(model.step, blocks).add(odd)
    for bad in (0, 6, 2):
        with pytest.raises(ValueError, match="prefill_chunk_tokens must be a positive multiple"):
            scheduler(model, blocks, chunk=bad)
    # the default budget: 256 tokens, in whole blocks whatever the block size
    assert DecodeScheduler(model.step, blocks).prefill_chunk_tokens == 256
    assert DecodeScheduler(model.step, BlockManager(4, 48)).prefill_chunk_tokens == 240
    assert DecodeScheduler(model.step, BlockManager(4, 512)).prefill_chunk_tokens == 512
