"""The router's request states (DESIGN §4) have one recorder and legal transitions only; claims
on a worker's counters are given back on every path; the admission queue is bounded."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.errors import Exhausted
from router.request_state import (ALLOWED, AdmissionQueue, IllegalTransition, RequestRecorder, RequestState,
                                  TERMINAL_STATES, claim)

pytestmark = pytest.mark.unit
S = RequestState


class Store:
    def __init__(self) -> None:
        self.writes: list[tuple[str, dict]] = []

    def update(self, request_id: str, **fields) -> None:
        self.writes.append((request_id, fields))


@pytest.mark.parametrize("path", [
    [S.QUEUED, S.PREFILLING, S.TRANSFERRING, S.DECODING, S.FINISHED],
    [S.QUEUED, S.PREFILLING, S.FINISHED],                                   # token 1 was EOS
    [S.QUEUED, S.PREFILLING, S.TRANSFERRING, S.FINISHED],                   # a stop string in token 1
    [S.QUEUED, S.PREFILLING, S.TRANSFERRING, S.DECODING, S.PREFILLING, S.TRANSFERRING, S.DECODING,
     S.FINISHED],                                                           # a decode failover
    [S.QUEUED, S.PREFILLING, S.PREFILLING, S.FAILED],                       # a prefill retry, then out of tries
    [S.QUEUED, S.FAILED], [S.QUEUED, S.CANCELLED], [S.QUEUED, S.PREFILLING, S.TRANSFERRING, S.CANCELLED],
])
def test_the_lifecycles_of_design_4_are_recorded_in_order(path):
    store = Store()
    rec = RequestRecorder(store, "r1")
    for state in path:
        rec.to(state, attempts=1)
    assert [f["state"] for _, f in store.writes] == [s.value for s in path]
    assert rec.state.terminal


@pytest.mark.parametrize("before, after", [
    (S.FINISHED, S.DECODING), (S.CANCELLED, S.FINISHED), (S.QUEUED, S.DECODING), (S.QUEUED, S.TRANSFERRING),
    (S.DECODING, S.TRANSFERRING), (S.FAILED, S.FAILED),   # PREFILLING -> DECODING: a local prefill
])
def test_an_illegal_transition_raises(before, after):
    rec = RequestRecorder(Store(), "r1")
    rec.state = before
    with pytest.raises(IllegalTransition, match=f"{before.value} -> {after.value}"):
        rec.to(after)
    with pytest.raises(IllegalTransition, match="must start queued"):
        RequestRecorder(Store(), "r2").to(S.PREFILLING)
    with pytest.raises(IllegalTransition):
        rec.note(state="finished")


def test_terminal_states_lead_nowhere_and_every_running_state_can_end():
    assert all(not ALLOWED[s] for s in TERMINAL_STATES)
    assert all(TERMINAL_STATES <= ALLOWED[s] for s in S if not s.terminal)


def test_claims_are_given_back_once_on_every_path():
    worker = SimpleNamespace(inflight=0, inflight_tokens=0)
    with claim(worker, 10) as held:
        assert (worker.inflight, worker.inflight_tokens) == (1, 10)
        held.release()
        held.release()
        assert (worker.inflight, worker.inflight_tokens) == (0, 0)
    assert (worker.inflight, worker.inflight_tokens) == (0, 0)
    with pytest.raises(RuntimeError):
        with claim(worker, 4):
            raise RuntimeError("the attempt failed")
    assert (worker.inflight, worker.inflight_tokens) == (0, 0)


def test_the_admission_queue_is_bounded():
    queue = AdmissionQueue(2)
    a, b = queue.wait(), queue.wait()
    with pytest.raises(Exhausted, match="2 requests are already waiting"):
        queue.wait()
    a.release()
    a.release()
    assert queue.waiting == 1
    b.release()
    assert queue.waiting == 0
