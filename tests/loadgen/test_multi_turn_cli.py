"""``cleave bench --conversations``: the report's multi-turn figures, the flags, and a whole
run through the real gRPC and OpenAI front doors over a fake router core."""
from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from services.loadgen import cli
from services.loadgen.backends import Timing
from services.loadgen.conversations import ConversationConfig
from services.loadgen.datasets import DatasetConfig, LengthDist
from services.loadgen.report import hit_rate, summarize, table, to_json
from services.loadgen.runner import LoadConfig
from tests.loadgen.fakes import EchoBackend, FakeCore, reply_of, serve_fake

pytestmark = pytest.mark.unit


def timing(ttft: float, prompt: int, cached: int, error: str = "") -> Timing:
    return Timing(0.0, chunks=[] if error else [ttft, ttft + 0.01], prompt_tokens=prompt, output_tokens=2,
                  cached_tokens=cached, error=error)


def test_hit_rates_and_per_turn_ttft_from_known_timings():
    timings = [timing(0.1, 10, 0), timing(0.3, 20, 0),          # turn 1 of two conversations
               timing(0.2, 30, 10), timing(0.4, 20, 20),        # turn 2
               timing(0.5, 40, 30), timing(0.0, 99, 50, "UNAVAILABLE: x")]  # turn 3; a failure is left out
    turns = [1, 1, 2, 2, 3, 3]
    r = summarize(timings, 2.0, label="concurrency=2", turns=turns)
    m = r["multi_turn"]
    assert (m["conversations"], m["turns"], m["prompt_tokens"], m["cached_tokens"]) == (2, 3, 120, 60)
    assert m["hit_rate"] == pytest.approx(60 / 120) and m["hit_rate_turns_2plus"] == pytest.approx(60 / 90)
    assert m["ttft_p50_ms_by_turn"] == pytest.approx([200.0, 300.0, 500.0])
    assert r["requests_failed"] == 1 and r["ttft_ms"]["p50"] == pytest.approx(300.0)   # the usual figures too
    assert hit_rate([timing(0.1, 0, 0)]) is None and hit_rate([]) is None
    text = table([r])
    assert "hit t>=2" in text and "ttft p50 t3" in text and "60/120" in text and "0.67" in text
    assert json.loads(to_json([r]))[0]["multi_turn"]["hit_rate"] == 0.5
    plain = summarize(timings, 2.0, label="concurrency=2")     # single-turn reports: unchanged
    assert "multi_turn" not in plain and "hit rate" not in table([plain])
    with pytest.raises(ValueError, match="one turn index per timing"):
        summarize(timings, 2.0, turns=[1])


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p, "127.0.0.1:50051")
    return p.parse_args(list(argv))


def test_flags_make_the_workload_and_defaults_stay_as_they_were():
    single = cli.dataset_of(parse())
    assert single == DatasetConfig(num_requests=64, prompt=LengthDist(128), output=LengthDist(64))
    assert [lvl.concurrency for lvl in cli._levels(parse())] == [1]
    multi = cli.dataset_of(parse("--conversations", "3", "--seed", "2"))
    assert multi == ConversationConfig(conversations=3, turns=4, user=LengthDist(64), output=LengthDist(64),
                                       think_s=0.0, think_dist="exponential", seed=2)
    assert [lvl.concurrency for lvl in cli._levels(parse("--conversations", "3"))] == [3]   # all at once
    assert [lvl.concurrency for lvl in cli._levels(parse("--conversations", "3", "--concurrency", "1,2"))] == [1, 2]
    given = cli.dataset_of(parse("--conversations", "2", "--turns", "5", "--turn-tokens", "32", "--think-time", "1.5",
                                 "--think-dist", "fixed", "--len-dist", "uniform", "--len-spread", "0.5",
                                 "--output-len", "8"))
    assert (given.turns, given.user, given.output, given.think_s, given.think_dist) == (
        5, LengthDist(32, "uniform", 0.5), LengthDist(8, "uniform", 0.5), 1.5, "fixed")


@pytest.mark.parametrize("argv, match", [
    (("--turns", "3"), "--turns describe the multi-turn workload: add --conversations"),
    (("--think-time", "1", "--think-dist", "fixed"), "--think-time, --think-dist describe"),
    (("--conversations", "2", "--num-requests", "8"), "--num-requests is for single-turn"),
    (("--conversations", "2", "--prompt-len", "100"), "--prompt-len is for single-turn"),
    (("--conversations", "2", "--prefix-len", "16"), "--prefix-len is for single-turn"),
    (("--conversations", "-1",), "--conversations must be >= 0"),
    (("--conversations", "2", "--turns", "0"), "--turns must be >= 1"),
    (("--conversations", "2", "--turn-tokens", "0"), "--turn-tokens must be >= 1"),
    (("--conversations", "2", "--think-time", "-0.5"), "think time must be >= 0"),
])
def test_flags_that_do_not_fit_together_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        cli.dataset_of(parse(*argv))


def test_bad_flag_values_are_argparse_errors_and_the_command_says_why(capsys):
    for argv in (("--conversations", "two"), ("--conversations", "2", "--think-dist", "zipf"),
                 ("--conversations", "2", "--think-time", "soon")):
        with pytest.raises(SystemExit):
            parse(*argv)
    from services.cli import main
    assert main(["bench", "--turns", "3", "--no-progress"]) == 2
    assert "cleave bench: --turns describe the multi-turn workload" in capsys.readouterr().err


def test_the_command_prints_the_multi_turn_table_and_json(monkeypatch, tmp_path, capsys):
    backend = EchoBackend()
    monkeypatch.setattr(cli, "make_backend", lambda kind, target, model="": backend)
    out = tmp_path / "bench.json"
    args = parse("--conversations", "2", "--turns", "3", "--turn-tokens", "5", "--output-len", "2",
                 "--concurrency", "1,2", "--warmup", "1", "--no-progress", "--goodput", "ttft:60000",
                 "--json", str(out))
    assert cli.run(args, "127.0.0.1:50051") == 0 and backend.closed
    text = capsys.readouterr().out
    assert "multi-turn: 2 conversations x 3 turns" in text and "ttft p50 t3" in text and "goodput" in text
    reports = json.loads(out.read_text())
    assert [r["load"] for r in reports] == ["concurrency=1", "concurrency=2"]
    assert all(r["requests_sent"] == r["requests_completed"] == 6 for r in reports)
    assert len(backend.log) == 2 * (1 + 6)
    # each level's conversations are new to the cache: nothing cached on turn 1, all earlier prompts after
    for r in reports:
        m = r["multi_turn"]
        assert m["hit_rate_turns_2plus"] > m["hit_rate"] > 0 and len(m["ttft_p50_ms_by_turn"]) == 3
        assert r["goodput"]["share"] == 1.0


@pytest.mark.timeout(60)
def test_multi_turn_through_the_grpc_and_openai_front_doors():
    """2 conversations x 2 turns on each backend, through the real servicer and HTTP app: the
    history each sends, and cached_tokens read from gRPC Usage and OpenAI's usage."""
    data = ConversationConfig(conversations=2, turns=2, user=LengthDist(12), output=LengthDist(3),
                              token_range=(100, 200), seed=3)

    async def main():
        core = FakeCore()
        async with serve_fake(core) as (address, url):
            out = {}
            for kind, target in (("grpc", address), ("openai", url), ("openai-chat", url)):
                start = len(core.seen)
                out[kind] = (await cli.bench(kind, target, data, [LoadConfig(concurrency=2, warmup=1)]),
                             core.seen[start + 1:])   # the warm-up request first
            return out

    for kind, ((report,), seen) in asyncio.run(main()).items():
        assert report["requests_completed"] == 4, (kind, report["errors"])
        m = report["multi_turn"]
        assert m["hit_rate_turns_2plus"] > 0.3 and m["prompt_tokens"] > 0, kind
        if kind == "grpc":   # turn 2: 12 + 3 + 12 tokens, the first 12 (whole blocks of 4) cached
            assert m["hit_rate_turns_2plus"] == pytest.approx(12 / 27) and m["hit_rate"] == pytest.approx(24 / 78)
        turn1 = [r for r in seen if r.WhichOneof("input") == "token_ids" and len(r.token_ids.ids) == 12]
        turn2 = [r for r in seen if (r.WhichOneof("input") == "chat" and len(r.chat.messages) == 3)
                 or (r.WhichOneof("input") == "token_ids" and len(r.token_ids.ids) == 12 + 3 + 12)
                 or (r.WhichOneof("input") == "prompt" and r.prompt.count("\n") == 2)]
        assert len(seen) == 4 and len(turn2) == 2, kind
        for r in turn2:
            if kind == "grpc":   # token ids: the turn-1 prompt, its reply's ids, 12 new ids
                (first,) = [f for f in turn1 if list(f.token_ids.ids) == list(r.token_ids.ids[:12])]
                assert list(r.token_ids.ids[12:15]) == reply_of(list(first.token_ids.ids), 3)
            elif kind == "openai-chat":
                user1, reply, user2 = r.chat.messages
                assert [m.role for m in r.chat.messages] == ["user", "assistant", "user"]
                assert len(user1.content.split()) == len(user2.content.split()) == 12
                assert reply.content == "".join(f" w{t}" for t in reply_of(
                    list(f"user: {user1.content}".encode()), 3))
            else:
                user1, reply, user2 = r.prompt.split("\n")
                assert len(user1.split()) == len(user2.split()) == 12
                assert reply == "".join(f" w{t}" for t in reply_of(list(user1.encode()), 3))
