"""The multi-turn conversation driver of ``cleave bench`` (``services.loadgen.conversations``)
against an in-process backend: history growth, think times, determinism, load, failures."""
from __future__ import annotations

import asyncio
import statistics

import pytest

from services.loadgen.conversations import (SKIPPED, Conversation, ConversationConfig, make_conversations,
                                            run_conversations, warmup_requests)
from services.loadgen.datasets import LengthDist
from services.loadgen.report import summarize
from services.loadgen.runner import LoadConfig
from tests.loadgen.fakes import EchoBackend, reply_of

pytestmark = pytest.mark.unit


def config(**kw) -> ConversationConfig:
    base = dict(conversations=3, turns=4, user=LengthDist(6, "uniform", 0.5), output=LengthDist(3, "uniform", 0.5),
                think_s=0.0, token_range=(1000, 1_000_000), seed=5)
    return ConversationConfig(**{**base, **kw})


def by_request_id(backend: EchoBackend) -> dict[str, list[int]]:
    return {req.request_id: list(req.prompt_ids) for req, _, _ in backend.log}


def test_each_turn_is_the_previous_prompt_plus_its_reply_plus_new_user_tokens():
    cfg = config()
    convs = make_conversations(cfg)
    backend = EchoBackend(delay=0.001)
    run = asyncio.run(run_conversations(backend, convs, LoadConfig(concurrency=2), request_id="x"))
    assert run.turns == [1, 2, 3, 4] * 3 and run.conversation == [0] * 4 + [1] * 4 + [2] * 4
    assert all(t.ok for t in run.timings) and len(backend.log) == 12 and run.seconds > 0
    prompts = by_request_id(backend)
    for c, conv in enumerate(convs):
        prev: list[int] = []
        for k in range(cfg.turns):
            prompt = prompts[f"x-c{c}-t{k + 1}"]
            reply = reply_of(prev, conv.max_tokens[k - 1]) if k else []
            assert prompt == prev + reply + list(conv.user[k])    # grows by exactly (reply + new text)
            assert len(conv.user[k]) in range(3, 10)               # 6 tokens +-50%
            prev = prompt
        req = next(r for r, _, _ in backend.log if r.request_id == f"x-c{c}-t4")
        assert [role for role, _ in req.history] == ["user", "assistant"] * 3 + ["user"]
        assert req.max_tokens == conv.max_tokens[3]
    # what the backend reported cached: each later turn's whole previous prompt, nothing else
    for t, k in zip(run.timings, run.turns):
        assert (t.cached_tokens == 0) == (k == 1)
    m = summarize(run.timings, run.seconds, turns=run.turns)["multi_turn"]
    assert m["hit_rate"] == pytest.approx(sum(t.cached_tokens for t in run.timings) /
                                          sum(t.prompt_tokens for t in run.timings))
    assert m["hit_rate_turns_2plus"] > m["hit_rate"] > 0 and (m["conversations"], m["turns"]) == (3, 4)


def test_same_seed_same_conversations_and_the_same_prompts_sent():
    cfg = config(think_s=0.5)
    assert make_conversations(cfg) == make_conversations(config(think_s=0.5))
    other = make_conversations(config(think_s=0.5, seed=6))
    assert [c.user for c in other] != [c.user for c in make_conversations(cfg)]
    # another load level: the same lengths, reply lengths and think times, other token ids
    a, b = make_conversations(cfg, level=0), make_conversations(cfg, level=1)
    assert [[len(u) for u in c.user] for c in a] == [[len(u) for u in c.user] for c in b]
    assert [(c.max_tokens, c.think_s) for c in a] == [(c.max_tokens, c.think_s) for c in b]
    assert all(x.user[0][:2] != y.user[0][:2] for x, y in zip(a, b))
    warm = warmup_requests(cfg, 3)
    assert len(warm) == 3 and not {r.prompt_ids[:2] for r in warm} & {c.user[0][:2] for c in a + b}

    async def nap(s):   # no real waiting
        pass

    def sent(seed):
        backend = EchoBackend()
        convs = make_conversations(config(seed=seed))
        asyncio.run(run_conversations(backend, convs, LoadConfig(concurrency=3), sleep=nap, request_id="d"))
        return by_request_id(backend)
    assert sent(5) == sent(5) != sent(6)


@pytest.mark.parametrize("dist", ["exponential", "fixed"])
def test_think_times_are_drawn_from_the_seed_and_waited_between_turns(dist):
    cfg = config(conversations=150, turns=3, think_s=2.0, think_dist=dist)
    convs = make_conversations(cfg)
    waits = [w for c in convs for w in c.think_s]
    assert all(len(c.think_s) == 2 for c in convs)
    if dist == "fixed":
        assert set(waits) == {2.0}
    else:
        assert len(set(waits)) == len(waits) and 1.7 < statistics.mean(waits) < 2.3 and min(waits) > 0
    slept = []

    async def sleep(s):
        slept.append(s)

    asyncio.run(run_conversations(EchoBackend(), convs, LoadConfig(concurrency=1), sleep=sleep))
    assert slept == waits   # one conversation at a time: in conversation, then turn order


def test_think_time_passes_between_a_reply_and_the_next_turn_in_real_time():
    convs = [Conversation(((1, 2), (3,), (4,)), (2, 2, 2), (0.05, 0.02)), Conversation(((5,), (6,)), (1, 1), (0.03,))]
    backend = EchoBackend(delay=0.005)
    asyncio.run(run_conversations(backend, convs, LoadConfig(concurrency=2), request_id="r"))
    times = {req.request_id: (sent, answered) for req, sent, answered in backend.log}
    for c, conv in enumerate(convs):
        for k, think in enumerate(conv.think_s):
            gap = times[f"r-c{c}-t{k + 2}"][0] - times[f"r-c{c}-t{k + 1}"][1]
            assert think - 1e-3 <= gap < think + 0.5
    zero = Conversation(((1,), (2,)), (1, 1))   # no think times given: none waited
    assert zero.think(0) == 0.0


@pytest.mark.parametrize("load", [LoadConfig(concurrency=2), LoadConfig(rate=500.0, max_concurrency=2),
                                  LoadConfig(rate=500.0)], ids=["closed-loop", "poisson-capped", "poisson"])
def test_conversations_in_flight_follow_the_load_and_turns_are_sequential(load):
    convs = make_conversations(config(conversations=5, turns=3))
    backend = EchoBackend(delay=0.01)
    run = asyncio.run(run_conversations(backend, convs, load, request_id="L"))
    assert len(run.timings) == 15 and all(t.ok for t in run.timings)
    assert backend.most == 2 if load.max_concurrency or load.concurrency else backend.most > 2
    times = {req.request_id: (sent, answered) for req, sent, answered in backend.log}
    for c in range(5):
        for k in (2, 3):
            assert times[f"L-c{c}-t{k}"][0] >= times[f"L-c{c}-t{k - 1}"][1]


def test_warmup_requests_go_first_and_are_not_measured():
    cfg = config(conversations=2, turns=2)
    backend = EchoBackend()
    warm = warmup_requests(cfg, 3)
    run = asyncio.run(run_conversations(backend, make_conversations(cfg), LoadConfig(concurrency=2), warmup=warm))
    assert [r for r, _, _ in backend.log[:3]] == warm and len(run.timings) == 4 and len(backend.log) == 7


def test_a_failed_turn_ends_its_conversation():
    convs = make_conversations(config(conversations=2, turns=4))
    backend = EchoBackend(fail=("f-c0-t2",))
    ticks = []
    run = asyncio.run(run_conversations(backend, convs, LoadConfig(concurrency=2),
                                        progress=type("Bar", (), {"update": lambda self, n: ticks.append(n)})(),
                                        request_id="f"))
    sent = {req.request_id for req, _, _ in backend.log}
    assert "f-c0-t3" not in sent and "f-c1-t4" in sent and len(sent) == 6
    assert [t.error for t in run.timings[:4]] == ["", "UNAVAILABLE: scripted", SKIPPED, SKIPPED]
    assert all(t.ok for t in run.timings[4:]) and sum(ticks) == 8
    r = summarize(run.timings, run.seconds, turns=run.turns)
    assert (r["requests_sent"], r["requests_completed"], r["requests_failed"]) == (8, 5, 3)


def test_bad_conversation_configs_are_refused():
    for kw, match in ((dict(conversations=0), "conversation"), (dict(turns=0), "turn"),
                      (dict(think_s=-1.0), "think time"), (dict(think_s=float("inf")), "think time"),
                      (dict(think_dist="zipf"), "distribution"), (dict(token_range=(5, 5)), "token range")):
        with pytest.raises(ValueError, match=match):
            config(**kw)
    with pytest.raises(ValueError, match="one max_tokens per turn"):
        Conversation(((1,), (2,)), (1,))
