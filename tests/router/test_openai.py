"""Fast checks of the HTTP front door, the metrics and ``cleave bench`` parts, without a stack.

The app is driven through Starlette's test client over a fake core whose ``generate`` yields
scripted deltas or raises a given error class, so every status mapping (503 included, which
the real stack cannot produce on demand) is checked through the real routes.
"""
from __future__ import annotations

import json
import types
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from cleave.v1 import inference_pb2
from common.errors import (Cancelled, CleaveError, DeadlineExceeded, Exhausted, InvalidRequest, NotFound,
                           Unavailable, http_status_of)
from common.prom import RouterMetrics, WorkerMetrics, layout_label
from router.openai_api import build_app
from router.openai_protocol import ChatRequest, CompletionRequest, chat_request, completion_request
from services.loadgen.backends import Timing
from services.loadgen.datasets import DatasetConfig, LengthDist, make_requests
from services.loadgen.report import Slo, summarize, table
from services.loadgen.runner import LoadConfig

pytestmark = pytest.mark.unit


class _Model:
    max_position = 64


class _Directory:
    def __init__(self, n: int) -> None:
        self.n = n

    def pool(self, name):
        return [object()] * self.n

    registered = pool


class FakeCore:
    """Yields ``script`` (text pieces) as deltas, or raises ``error`` before the first."""

    model_id = "fake-model"
    model = _Model()
    codec = None
    cfg = types.SimpleNamespace(stream_buffer=1024)   # the front doors' readahead bound

    def __init__(self, script=("Hel", "lo"), error: Exception | None = None, workers: int = 1,
                 cached: int = 0) -> None:
        self.script, self.error, self.seen, self.cached = script, error, [], cached
        self.directory = _Directory(workers)
        self.prom = RouterMetrics("fake-model", running=lambda: 0, waiting=lambda: 0)
        self.closed = 0

    def refused(self, exc) -> None:
        self.prom.failed(exc.code.name.lower(), None, 0)

    async def generate(self, request, timeout_s=None, fill_max_tokens=False):
        self.seen.append(request)
        try:
            if self.error is not None:
                raise self.error
            for i, text in enumerate(self.script):
                msg = inference_pb2.GenerateResponse(request_id="r1", token_ids=[i], text=text)
                if i == len(self.script) - 1:
                    msg.finish_reason = inference_pb2.FINISH_REASON_STOP
                    msg.usage.prompt_tokens = 3
                    msg.usage.completion_tokens = len(self.script)
                    msg.usage.cached_tokens = self.cached
                yield msg
        finally:
            self.closed += 1


def test_completion_body_becomes_one_generate_request():
    req = completion_request(CompletionRequest(prompt=[4, 5], max_tokens=7, temperature=0, top_k=-1, seed=3,
                                               stop="x", ignore_eos=True))
    assert list(req.token_ids.ids) == [4, 5] and req.sampling.max_tokens == 7
    assert (req.sampling.temperature, req.sampling.top_k, req.sampling.seed, list(req.sampling.stop)) == (0, 0, 3, ["x"])
    assert req.sampling.ignore_eos
    default = completion_request(CompletionRequest(prompt=["one"]))
    assert default.prompt == "one" and default.sampling.max_tokens == 16  # OpenAI's default
    assert default.sampling.temperature == 1.0 and default.sampling.top_p == 1.0 and not default.sampling.HasField("seed")


def test_chat_body_renders_roles_and_text_parts():
    req = chat_request(ChatRequest(messages=[{"role": "developer", "content": "be brief"},
                                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}],
                                   max_tokens=5, max_completion_tokens=9))
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "be brief"), ("user", "ab")]
    assert req.sampling.max_tokens == 9  # max_completion_tokens wins
    assert chat_request(ChatRequest(messages=[{"role": "user", "content": "x"}])).sampling.max_tokens == 0


@pytest.mark.parametrize("body, match", [
    (dict(prompt="a", n=3), "n=3"), (dict(prompt=["a", "b"]), "batched"), (dict(prompt="a", max_tokens=0), "0 only with echo"),
    (dict(prompt="a", presence_penalty=0.5), "presence_penalty"), (dict(prompt="a", top_k=-2), "top_k"),
    (dict(prompt="a", seed=-1), "seed"), (dict(prompt="a", max_tokens=2 ** 40), "out of range"),
    (dict(prompt=[1, -2]), ">= 0"),
])
def test_unsupported_or_bad_parameters_are_refused(body, match):
    with pytest.raises(InvalidRequest, match=match):
        completion_request(CompletionRequest(**body))


@pytest.mark.parametrize("exc, status, kind", [
    (InvalidRequest("x"), 400, "invalid_request_error"), (NotFound("x"), 404, "not_found_error"),
    (Exhausted("x"), 429, "rate_limit_error"), (Unavailable("x"), 503, "service_unavailable_error"),
    (DeadlineExceeded("x"), 504, "timeout_error"), (Cancelled("x"), 499, "cancelled_error"),
    (CleaveError("x"), 500, "internal_error"), (RuntimeError("x"), 500, "internal_error"),
])
def test_error_classes_map_to_http_status_through_the_routes(exc, status, kind):
    assert http_status_of(exc)[:2] == (status, kind)
    core = FakeCore(error=exc)
    with TestClient(build_app(core)) as http:
        for stream in (False, True):
            resp = http.post("/v1/completions", json={"prompt": "hi", "stream": stream})
            assert resp.status_code == status
            assert resp.json()["error"]["type"] == kind and "x" in resp.json()["error"]["message"]
    assert core.closed == 2


def test_no_route_answers_a_plain_text_500():
    """An exception escaping a route becomes OpenAI's error body naming the request, counted."""
    class Broken(FakeCore):
        def generate(self, request, timeout_s=None, fill_max_tokens=False):
            raise KeyError("a bug")
    core = Broken()
    with TestClient(build_app(core)) as http:
        resp = http.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "req-500"})
        assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
        err = resp.json()["error"]
        assert err["type"] == "internal_error" and "req-500" in err["message"] and "KeyError" in err["message"]
        assert 'cleave_http_internal_errors_total{model_name="fake-model"} 1.0' in http.get("/metrics").text
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 500
        assert http.get("/v1/models").status_code == 200                          # still serving


def test_null_fields_read_as_defaults_and_logprobs_map_to_the_wire():
    req = completion_request(CompletionRequest(prompt="a", stream=None, n=None, echo=None, logprobs=None,
                                               max_tokens=None, top_p=None))
    assert req.sampling.max_tokens == 16 and not req.sampling.logprobs and not req.sampling.prompt_logprobs
    echo = completion_request(CompletionRequest(prompt=[1, 2], echo=True, logprobs=3, max_tokens=0))
    assert (echo.sampling.logprobs, echo.sampling.top_logprobs, echo.sampling.prompt_logprobs) == (True, 3, True)
    assert completion_request(CompletionRequest(prompt=[1], echo=True, max_tokens=0)).sampling.prompt_logprobs
    assert not completion_request(CompletionRequest(prompt=[1], echo=True, max_tokens=2)).sampling.prompt_logprobs
    chat = chat_request(ChatRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=None))
    assert (chat.sampling.logprobs, chat.sampling.top_logprobs, chat.sampling.prompt_logprobs) == (True, 0, False)


@pytest.mark.parametrize("header", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_deadline_header_is_refused_and_counted(header):
    core = FakeCore()
    with TestClient(build_app(core)) as http:
        resp = http.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Timeout": header})
        assert resp.status_code == 400 and "X-Request-Timeout" in resp.json()["error"]["message"]
        assert 'reason="invalid_argument"} 1.0' in http.get("/metrics").text
        ok = http.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Timeout": "2.5"})
        assert ok.status_code == 200
    assert core.seen[-1].sampling.max_tokens == 16


def test_stream_frames_and_mid_stream_error():
    core = FakeCore()
    with TestClient(build_app(core)) as http:
        body = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}).text
        events = [e for e in body.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert '"role": "assistant"' in events[0] and '"usage"' in events[-2]
        assert http.get("/v1/models").json()["data"][0]["id"] == "fake-model"
        assert http.get("/health").status_code == 200
        assert http.get("/v1/nope").json()["error"]["type"] == "not_found_error"
    assert core.seen[0].sampling.max_tokens == 4 and core.closed == 1

    class Failing(FakeCore):
        async def generate(self, request, timeout_s=None, fill_max_tokens=False):
            yield inference_pb2.GenerateResponse(request_id="r2", token_ids=[1], text="a")
            raise Unavailable("decode instance vanished")
    with TestClient(build_app(Failing())) as http:
        events = [e for e in http.post("/v1/completions", json={"prompt": [1], "stream": True}).text.split("\n\n") if e]
        assert '"service_unavailable_error"' in events[-2] and events[-1] == "data: [DONE]"
    with TestClient(build_app(FakeCore(workers=0))) as http:
        assert http.get("/health").status_code == 503


@pytest.mark.parametrize("cached", [0, 2])
def test_usage_has_openai_shape_with_cached_prompt_tokens(cached):
    """``usage`` of chat and completions, whole and as the stream's include_usage chunk:
    OpenAI's fields, ``prompt_tokens_details.cached_tokens`` always present (0: none cached)."""
    want = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": cached}}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    text = {"prompt": "hi", "max_tokens": 4}
    with TestClient(build_app(FakeCore(cached=cached))) as http:
        for route, body, obj, chunk_obj in (("/v1/chat/completions", chat, "chat.completion", "chat.completion.chunk"),
                                            ("/v1/completions", text, "text_completion", "text_completion")):
            whole = http.post(route, json=body).json()
            assert whole["object"] == obj and whole["usage"] == want
            events = [e.removeprefix("data: ") for e in
                      http.post(route, json={**body, "stream": True,
                                             "stream_options": {"include_usage": True}}).text.split("\n\n") if e]
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert (last["object"], last["choices"], last["usage"]) == (chunk_obj, [], want)
            assert all("usage" not in json.loads(e) for e in events[:-2])
            plain = http.post(route, json={**body, "stream": True}).text   # no include_usage: no usage chunk
            assert '"usage"' not in plain


def test_router_metrics_exposition():
    m = RouterMetrics("m", running=lambda: 2, waiting=lambda: 1)
    m.first_token(0.05)
    m.tokens(0.03, 3)
    m.finished("stop", 10, 4, 0.2, 0.01, attempts=2)
    m.failed("unavailable", None, attempts=1)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(m.exposition().decode()) for s in fam.samples}
    get = lambda name, **lbl: samples[(name, tuple(sorted({"model_name": "m", **lbl}.items())))]  # noqa: E731
    assert get("cleave_inter_token_latency_seconds_count") == 3
    assert get("cleave_inter_token_latency_seconds_sum") == pytest.approx(0.03)
    assert get("cleave_request_success_total", finish_reason="stop") == 1
    assert get("cleave_request_failures_total", reason="unavailable") == 1
    assert get("cleave_request_migrations_total") == 1
    assert get("cleave_request_prompt_tokens_sum") == 10
    assert (get("cleave_num_requests_running"), get("cleave_num_requests_waiting")) == (2, 1)


def test_worker_metrics_labels_and_sampled_gauges():
    wid = ["?"]
    m = WorkerMetrics("prefill", lambda: wid[0], layout_label({"tp": 2, "pp": 1, "cp": 1, "ep": 1}))
    m.gauges.add("cleave_prefill_queue_tokens", "q", lambda: 7)
    m.gauges.add("cleave_expert_hotspot_ratio{layer}", "h", lambda: {0: 1.5, 1: 1.0})
    wid[0] = "prefill-a"
    m.transfer(0.01, 1000)
    m.transfer_failed()
    fams = {f.name: f for f in text_string_to_metric_families(
        __import__("prometheus_client").generate_latest(m.registry).decode())}
    labels = {"pool": "prefill", "worker_id": "prefill-a", "layout": "tp2-pp1-cp1-ep1"}
    assert fams["cleave_prefill_queue_tokens"].samples[0].labels == labels
    assert {s.labels["layer"]: s.value for s in fams["cleave_expert_hotspot_ratio"].samples} == {"0": 1.5, "1": 1.0}
    assert [s.value for s in fams["cleave_kv_transfer_bytes"].samples if s.name.endswith("_total")] == [1000]


def test_datasets_are_deterministic_with_lengths_from_their_distribution():
    cfg = DatasetConfig(num_requests=200, prompt=LengthDist(40, "uniform", 0.5), output=LengthDist(10, "normal", 0.2),
                        token_range=(5, 9), prefix_len=6, num_prefixes=2, seed=1)
    a, b = make_requests(cfg), make_requests(cfg)
    assert a == b
    assert all(14 + 6 <= len(r.prompt_ids) <= 66 for r in a) and all(5 <= t < 9 for r in a for t in r.prompt_ids)
    assert a[0].prompt_ids[:6] == a[2].prompt_ids[:6] != a[1].prompt_ids[:6]
    assert 9 <= sum(r.max_tokens for r in a) / len(a) <= 11
    assert LengthDist(7).sample(random.Random(0)) == 7
    with pytest.raises(ValueError, match="distribution"):
        LengthDist(5, "zipf")


def test_report_figures_and_goodput_from_known_timings():
    def timing(ttft, gap, n):
        return Timing(start=0.0, chunks=[ttft + i * gap for i in range(n)], prompt_tokens=4, output_tokens=n)
    timings = [timing(0.1, 0.01, 5), timing(0.3, 0.02, 5), timing(0.2, 0.0, 1), Timing(0.0, error="UNAVAILABLE")]
    r = summarize(timings, 2.0, Slo.parse("ttft:250,tpot:15"), "concurrency=2")
    assert (r["requests_sent"], r["requests_completed"], r["requests_failed"]) == (4, 3, 1)
    assert r["output_tokens"] == 11 and r["output_token_throughput"] == 5.5
    assert r["ttft_ms"]["mean"] == pytest.approx(200.0) and r["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert r["tpot_ms"]["mean"] == pytest.approx(15.0)
    assert r["goodput"]["good_requests"] == 2 and r["goodput"]["share"] == 0.5 and r["goodput"]["rate"] == 1.0
    assert summarize(timings, 2.0, Slo.parse("ttft:1000"))["goodput"]["share"] == 0.75
    assert "concurrency=2" in table([r])
    for bad in ("ttft", "ttft:x", "itl:5", "ttft:-1", ""):
        with pytest.raises(ValueError):
            Slo.parse(bad)
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig(concurrency=2, rate=1.0)


class _CountingBackend:
    """Records what was sent and the most requests ever in flight."""

    def __init__(self) -> None:
        self.sent, self.inflight, self.most = [], 0, 0

    async def send(self, req):
        import asyncio

        self.inflight += 1
        self.most = max(self.most, self.inflight)
        self.sent.append(req)
        await asyncio.sleep(0.002)
        self.inflight -= 1
        return Timing(start=0.0, chunks=[0.001], prompt_tokens=len(req.prompt_ids), output_tokens=1)


@pytest.mark.parametrize("load", [LoadConfig(concurrency=3, warmup=2), LoadConfig(rate=2000.0, max_concurrency=2)],
                         ids=["closed-loop", "poisson-capped"])
def test_runner_sends_each_request_once_within_its_concurrency(load):
    import asyncio

    from services.loadgen.runner import run_load

    requests = make_requests(DatasetConfig(num_requests=20, prompt=LengthDist(3), output=LengthDist(2),
                                           token_range=(1, 50), seed=4))
    backend = _CountingBackend()
    timings, seconds = asyncio.run(run_load(backend, requests, load))
    assert len(timings) == 20 and all(t.ok for t in timings) and seconds > 0
    measured = backend.sent[load.warmup:]
    assert sorted(map(id, measured)) == sorted(map(id, requests))  # every request once, warm-up apart
    assert 1 < backend.most <= (load.concurrency or load.max_concurrency)
