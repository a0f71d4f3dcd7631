"""The OpenAI-compatible HTTP API, Prometheus metrics and ``cleave bench`` against the real stack.

Uses the session's ``tiny_stack`` (router + prefill + decode processes, tiny random Llama), so
no stack is started for this module alone. The HTTP side is driven by the official ``openai``
client where it can be, and by raw HTTP where the wire itself is checked (SSE framing, a
client that hangs up). Every test checks that the workers' free-block counts are back where
they were.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest

from cleave.v1 import inference_pb2
from tests.stack import metric_value, post_json, scrape_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPT_IDS = [5, 17, 99, 3, 42, 7]
CHAT = [("system", "You are terse."), ("user", "Name a colour.")]


@pytest.fixture
def model(client):
    return client.models.list().data[0].id


def test_models_and_health(tiny, client):
    info = tiny.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=5)
    models = client.models.list().data
    assert [m.id for m in models] == [info.model_id]
    with urllib.request.urlopen(tiny.http_url.removesuffix("/v1") + "/health", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"


def test_completion_equals_grpc_stream_and_not(tiny, client, model):
    grpc_out = tiny.generate(token_ids=PROMPT_IDS, max_tokens=12, ignore_eos=True)
    whole = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.object == "text_completion"
    assert whole.choices[0].text == grpc_out.text
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == \
        (grpc_out.usage.prompt_tokens, grpc_out.usage.completion_tokens) == (len(PROMPT_IDS), 12)
    assert whole.usage.total_tokens == len(PROMPT_IDS) + 12
    chunks = list(client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_out.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # a text prompt counts its tokens as the gRPC path does
    by_text = client.completions.create(model=model, prompt="hello there", max_tokens=4, temperature=0)
    assert by_text.usage.prompt_tokens == tiny.generate(prompt="hello there", max_tokens=4).usage.prompt_tokens


def test_chat_equals_grpc_stream_and_not(tiny, client, model):
    grpc_out = tiny.generate(chat=CHAT, max_tokens=10, ignore_eos=True)
    messages = [{"role": r, "content": c} for r, c in CHAT]
    whole = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == grpc_out.text
    assert whole.usage.prompt_tokens == grpc_out.usage.prompt_tokens
    assert whole.usage.completion_tokens == grpc_out.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == grpc_out.text
    assert chunks[-1].usage.prompt_tokens == grpc_out.usage.prompt_tokens


def test_sse_wire_ends_with_done(tiny):
    url = urllib.parse.urlsplit(tiny.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [1, 2, 3], "max_tokens": 5, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events = [line for line in resp.read().decode().split("\n\n") if line]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_and_seed(tiny, client, model):
    full = client.completions.create(model=model, prompt="abc", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[10:13]
    cut = client.completions.create(model=model, prompt="abc", max_tokens=40, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    assert tiny.generate(prompt="abc", max_tokens=40, ignore_eos=True, stop=[stop]).text == cut.text

    def sample(seed):
        return client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=24, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b != c
    assert a == tiny.generate(token_ids=[1, 2, 3], max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True).text


# the HTTP twins of tests/e2e/test_serving.py's gRPC bad-input cases, plus what only HTTP can get wrong
BAD = [
    ("/completions", dict(prompt="", max_tokens=4), 400, "prompt is empty"),
    ("/completions", dict(prompt="hi", max_tokens=0), 400, "max_tokens"),
    ("/completions", dict(prompt="hi", max_tokens=-3), 400, "max_tokens"),
    ("/completions", dict(prompt="hi", max_tokens=10_000_000), 400, "max_tokens"),
    ("/completions", dict(prompt=[1] * 500, max_tokens=100), 400, "context length"),
    ("/chat/completions", dict(messages=[{"role": "wizard", "content": "hi"}], max_tokens=4), 400, "unknown role"),
    ("/completions", dict(prompt=[1, 2, 10_000_000], max_tokens=4), 400, "vocabulary"),
    ("/completions", dict(prompt=[], max_tokens=4), 400, "empty"),
    ("/completions", dict(max_tokens=4), 400, "prompt"),
    ("/completions", dict(prompt="hi", max_tokens=4, temperature=-1.0), 400, "temperature"),
    ("/completions", dict(prompt="hi", max_tokens=4, top_p=1.5), 400, "top_p"),
    ("/completions", dict(prompt="hi", max_tokens=4, stop=[""]), 400, "stop"),
    ("/completions", dict(prompt="hi", max_tokens=4, n=2), 400, "n=2"),
    ("/completions", dict(prompt=["a", "b"], max_tokens=4), 400, "batched"),
    ("/completions", dict(prompt="hi", max_tokens=4, logprobs=6), 400, "logprobs"),
    ("/completions", dict(prompt="hi", max_tokens="many"), 400, "max_tokens"),
    ("/chat/completions", dict(messages=[], max_tokens=4), 400, "messages"),
    ("/completions", dict(model="gpt-nope", prompt="hi", max_tokens=4), 404, "gpt-nope"),
    ("/completions", dict(prompt=[1] * 380, max_tokens=4), 429, "prompt"),   # more KV than the cache holds
]


@pytest.mark.parametrize("path, body, status, needle", BAD, ids=[f"{b[2]}-{b[3]}" for b in BAD])
def test_bad_input_gets_status_and_openai_error_body(tiny, path, body, status, needle):
    for stream in (False, True):
        got, err = post_json(tiny, path, {**body, "stream": stream})
        assert got == status, err
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
        assert needle in err["error"]["message"]
    assert post_json(tiny, "/completions", dict(prompt=[1, 2], max_tokens=3))[0] == 200


def test_request_id_header_is_checked_like_grpc_and_names_the_request(tiny):
    status, err = post_json(tiny, "/completions", dict(prompt="hi", max_tokens=4), headers={"X-Request-Id": "bad id!"})
    assert status == 400 and "request_id" in err["error"]["message"]
    status, body = post_json(tiny, "/completions", dict(prompt=[1, 2], max_tokens=3), headers={"X-Request-Id": "http-id-1"})
    assert status == 200 and body["id"] == "cmpl-http-id-1"
    deadline = time.time() + 5
    while tiny.redis.hget("cleave:req:http-id-1", "state") != "finished" and time.time() < deadline:
        time.sleep(0.05)
    assert tiny.redis.hget("cleave:req:http-id-1", "completion_tokens") == str(body["usage"]["completion_tokens"])


def test_openai_client_raises_its_own_error_classes(client, model):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model, prompt="hi", max_tokens=4, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=model, prompt=[1] * 380, max_tokens=4)


def test_client_disconnect_mid_stream_cancels_and_frees_blocks(tiny):
    url = urllib.parse.urlsplit(tiny.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [3, 4, 5], "max_tokens": 300, "stream": True,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    rid = resp.getheader("X-Request-Id")
    assert resp.readline().startswith(b"data: ")  # the first token is out: the request is decoding
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 15
    while tiny.redis.hget(f"cleave:req:{rid}", "state") != "cancelled" and time.time() < deadline:
        time.sleep(0.1)
    assert tiny.redis.hget(f"cleave:req:{rid}", "state") == "cancelled"
    assert int(tiny.redis.hget(f"cleave:req:{rid}", "completion_tokens")) < 300


def test_metrics_move_by_exactly_the_requests_made(tiny, client, model):
    router = tiny.http_url.removesuffix("/v1") + "/metrics"
    workers = {name: f"http://127.0.0.1:{port}/metrics" for name, port in tiny.stack.metrics_ports.items()}
    before, wbefore = scrape_metrics(router), {n: scrape_metrics(u) for n, u in workers.items()}
    client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    list(client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=7, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True}))
    tiny.generate(token_ids=[9, 9], max_tokens=4, ignore_eos=True)  # gRPC: the same core, the same counters
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="hi", max_tokens=4, top_p=2)
    after, wafter = scrape_metrics(router), {n: scrape_metrics(u) for n, u in workers.items()}

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)
    assert delta("cleave_request_success_total", finish_reason="length") == 3
    assert delta("cleave_request_failures_total", reason="invalid_argument") == 1
    assert delta("cleave_time_to_first_token_seconds_count") == 3
    assert delta("cleave_e2e_request_latency_seconds_count") == 3
    assert delta("cleave_request_queue_time_seconds_count") == 3
    assert delta("cleave_request_prompt_tokens_sum") == len(PROMPT_IDS) + 3 + 2
    assert delta("cleave_request_generation_tokens_sum") == 5 + 7 + 4
    assert delta("cleave_inter_token_latency_seconds_count") == (5 - 1) + (7 - 1) + (4 - 1)
    assert delta("cleave_request_migrations_total") == 0
    assert metric_value(after, "cleave_num_requests_running") == 0 and metric_value(after, "cleave_num_requests_waiting") == 0
    assert not any("request_id" in dict(lbl) for _, lbl in after)
    for name in workers:
        pool = name.split("-")[0]
        got = wafter[name]
        labels = {dict(lbl)["pool"] for (n, lbl) in got if n.startswith("cleave_kv_cache_usage_perc")}
        assert labels == {pool}
        assert 0 <= metric_value(got, "cleave_kv_cache_usage_perc") <= 1
        transfers = metric_value(got, "cleave_kv_transfer_seconds_count") - metric_value(wbefore[name], "cleave_kv_transfer_seconds_count")
        assert transfers == 3, name  # three requests reached prefill, each pushed once and landed once
        if pool == "prefill":
            assert metric_value(got, "cleave_kv_transfer_bytes_total") > metric_value(wbefore[name], "cleave_kv_transfer_bytes_total")
            assert any(n == "cleave_prefill_queue_tokens" for n, _ in got)
            assert metric_value(got, "cleave_prefill_queue_tokens") == 0
        else:
            assert any(n == "cleave_batch_size" for n, _ in got) and metric_value(got, "cleave_batch_size") == 0


def test_cleave_bench_reports_what_it_sent_and_goodput_follows_the_slo(tiny):
    from services.loadgen.cli import bench
    from services.loadgen.datasets import DatasetConfig, LengthDist
    from services.loadgen.report import Slo, summarize
    from services.loadgen.runner import LoadConfig

    data = DatasetConfig(num_requests=6, prompt=LengthDist(16, "uniform", 0.5), output=LengthDist(6),
                         token_range=(1, 250))
    for backend, target in (("grpc", tiny.address), ("openai", tiny.http_url)):
        reports = asyncio.run(bench(backend, target, data, [LoadConfig(concurrency=2, warmup=1)],
                                    Slo(ttft_s=600.0, tpot_s=600.0)))
        (r,) = reports
        assert r["requests_sent"] == r["requests_completed"] == 6, r["errors"]
        assert r["output_tokens"] == 36
        assert r["goodput"]["share"] == 1.0 and r["goodput"]["good_requests"] == 6
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and r["tpot_ms"]["mean"] > 0
    # the same timings judged at a tighter SLO: the share drops (between 0 and 1 either way)
    from services.loadgen.backends import GrpcBackend
    from services.loadgen.datasets import make_requests
    from services.loadgen.runner import run_load

    async def timed():
        backend = GrpcBackend(tiny.address)
        try:
            return await run_load(backend, make_requests(data), LoadConfig(rate=50.0))
        finally:
            await backend.close()
    timings, seconds = asyncio.run(timed())
    ttfts = sorted(t.ttft for t in timings)
    loose = summarize(timings, seconds, Slo(ttft_s=ttfts[-1] + 1))["goodput"]["share"]
    tight = summarize(timings, seconds, Slo(ttft_s=(ttfts[0] + ttfts[-1]) / 2))["goodput"]["share"]
    assert loose == 1.0 and 0 <= tight < 1.0


def test_cleave_bench_command_prints_table_and_json(tiny, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--backend", "openai", "--target",
                           tiny.http_url, "--num-requests", "4", "--concurrency", "1,2", "--prompt-len", "8",
                           "--output-len", "4", "--token-range", "1:250", "--warmup", "0", "--no-progress",
                           "--goodput", "ttft:60000,tpot:60000", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "concurrency=1" in proc.stdout and "goodput" in proc.stdout
    reports = json.loads(out.read_text())
    assert [r["requests_sent"] for r in reports] == [4, 4]
    assert all(r["goodput"]["share"] == 1.0 for r in reports)


def test_cleave_bench_multi_turn_grows_the_history_and_hits_the_prefix_cache(tiny):
    """2 conversations x 2 turns: over gRPC, turn 2's prompt is turn 1's 16 tokens, its 4-token
    reply and 16 new tokens, and the prefill instance's prefix cache serves part of it; the
    command over the chat API prints the multi-turn figures."""
    from services.loadgen.cli import bench
    from services.loadgen.conversations import ConversationConfig
    from services.loadgen.datasets import LengthDist
    from services.loadgen.runner import LoadConfig

    data = ConversationConfig(conversations=2, turns=2, user=LengthDist(16), output=LengthDist(4),
                              token_range=(1, 250), seed=11)
    (r,) = asyncio.run(bench("grpc", tiny.address, data, [LoadConfig(concurrency=2, warmup=1)]))
    assert r["requests_completed"] == 4, r["errors"]
    m = r["multi_turn"]
    assert m["prompt_tokens"] == 2 * 16 + 2 * (16 + 4 + 16) and r["output_tokens"] == 16
    assert m["hit_rate_turns_2plus"] > 0 and all(v > 0 for v in m["ttft_p50_ms_by_turn"])
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--backend", "openai-chat", "--target",
                           tiny.http_url, "--conversations", "2", "--turns", "2", "--turn-tokens", "8",
                           "--output-len", "4", "--token-range", "1:250", "--warmup", "0", "--no-progress",
                           "--json", "-"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(proc.stdout)
    assert r["requests_completed"] == 4 and r["multi_turn"]["turns"] == 2, r["errors"]


def test_client_leaving_before_the_first_token_cancels_the_waiting_request(tiny):
    """A request queued for KV room (nothing sent yet) is cancelled when its client hangs up."""
    url = urllib.parse.urlsplit(tiny.http_url)
    metrics = tiny.http_url.removesuffix("/v1") + "/metrics"
    cancelled = metric_value(scrape_metrics(metrics), "cleave_request_failures_total", reason="cancelled")
    big = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    big.request("POST", "/v1/completions", json.dumps({"prompt": [4] * 8, "max_tokens": 300, "stream": True,
                                                       "ignore_eos": True}), {"Content-Type": "application/json"})
    resp = big.getresponse()
    assert resp.readline().startswith(b"data: ")  # decoding: 2 of the 47 KV blocks, growing to 39
    waiting = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    waiting.request("POST", "/v1/completions", json.dumps({"prompt": [5] * 360, "max_tokens": 4, "ignore_eos": True}),
                    {"Content-Type": "application/json"})   # 46 blocks: waits until big is done
    deadline = time.time() + 10
    while metric_value(scrape_metrics(metrics), "cleave_num_requests_waiting") != 1 and time.time() < deadline:
        time.sleep(0.05)
    assert metric_value(scrape_metrics(metrics), "cleave_num_requests_waiting") == 1
    waiting.sock.shutdown(2)
    waiting.close()
    while metric_value(scrape_metrics(metrics), "cleave_request_failures_total", reason="cancelled") != cancelled + 1 \
            and time.time() < deadline + 10:
        time.sleep(0.05)
    after = scrape_metrics(metrics)
    assert metric_value(after, "cleave_request_failures_total", reason="cancelled") == cancelled + 1
    assert metric_value(after, "cleave_num_requests_waiting") == 0
    big.sock.shutdown(2)
    big.close()
