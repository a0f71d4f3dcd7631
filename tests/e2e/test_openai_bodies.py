"""OpenAI bodies answered exactly, on the real stack (``tiny_stack``: router + workers as processes).

Each input here was reported against some OpenAI-compatible server and gets its right answer:
explicit ``null`` is the default; logprobs equal ``transformers``' (chat and completions, echo,
streamed or not, and over gRPC); ``top_p: 0``, lone UTF-16 surrogates and token ids past 32
bits are 400s naming the parameter; the client's deadline header bounds a request; every
refusal is counted once in ``/metrics``. The property-based fuzz of both bodies is in
``tests/e2e/test_openai_fuzz.py``.
"""
from __future__ import annotations

import json

import openai
import pytest
import torch

from tests.parity import reference_logprobs
from tests.stack import metric_value, post_json, scrape_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPT_IDS = [5, 17, 99, 3, 42, 7, 61, 2]


def _raw(stack, path: str, text: str) -> tuple[int, dict]:
    """POST a body given as JSON text (escapes like ``\\ud83d`` stay as sent)."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(stack.http_url + path, data=text.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_explicit_null_means_the_default_on_both_endpoints(tiny):
    nulls = dict(stream=None, n=None, temperature=None, top_p=None, seed=None, stop=None, logprobs=None,
                 stream_options=None, ignore_eos=None, user=None, presence_penalty=None, logit_bias=None)
    status, body = post_json(tiny, "/completions", dict(prompt=PROMPT_IDS, max_tokens=3, echo=None, suffix=None,
                                                    best_of=None, **nulls))
    assert status == 200, body
    assert body["choices"][0]["logprobs"] is None and body["usage"]["completion_tokens"] <= 3
    usage = body["usage"]                                   # OpenAI's shape, cached tokens always present
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert usage["prompt_tokens"] == len(PROMPT_IDS)
    assert usage["total_tokens"] == len(PROMPT_IDS) + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < len(PROMPT_IDS)
    status, body = post_json(tiny, "/chat/completions", dict(
        messages=[{"role": "user", "content": "hi", "name": None}], max_tokens=3, max_completion_tokens=None,
        top_logprobs=None, tools=None, response_format=None, **nulls))
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"


BAD = [
    ("/completions", '{"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1, "top_p": 0, "seed": 1}', "top_p"),
    ("/completions", '{"prompt": "Hello \\ud83d world", "max_tokens": 2}', "prompt"),
    ("/chat/completions", '{"messages": [{"role": "user", "content": "Hello \\ud83d world"}], "max_tokens": 2}',
     "messages[0].content"),
    ("/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}',
     "messages[0].content"),
    ("/completions", '{"prompt": [4294967296], "max_tokens": 2}', "4294967296"),
    ("/completions", f'{{"prompt": [{2 ** 63}], "max_tokens": 2}}', str(2 ** 63)),
    ("/completions", '{"prompt": [[4294967296]], "max_tokens": 2}', "4294967296"),
    ("/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', "logprobs"),
    ("/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}',
     "top_logprobs"),
    ("/completions", '{"prompt": "x", "logprobs": 6}', "logprobs"),
]


@pytest.mark.parametrize("path, text, needle", BAD, ids=[b[2] for b in BAD])
def test_bad_bodies_get_a_400_naming_the_parameter(tiny, path, text, needle):
    for stream in ("false", "true"):
        status, err = _raw(tiny, path, text[:-1] + f', "stream": {stream}}}')
        assert status == 400, err
        assert err["error"]["type"] == "invalid_request_error" and needle in err["error"]["message"], err


def test_every_refusal_is_counted_once(tiny):
    router = tiny.http_url.removesuffix("/v1") + "/metrics"
    wizard = {"messages": [{"role": "wizard", "content": "hi"}]}
    for body in (wizard, {**wizard, "max_tokens": 4}, {"prompt": "x", "top_p": 0}, {"prompt": 5}):
        before = metric_value(scrape_metrics(router), "cleave_request_failures_total", reason="invalid_argument")
        path = "/chat/completions" if "messages" in body else "/completions"
        assert post_json(tiny, path, body)[0] == 400
        after = metric_value(scrape_metrics(router), "cleave_request_failures_total", reason="invalid_argument")
        assert after - before == 1, body


def test_the_client_deadline_header_bounds_a_request(tiny):
    body = dict(prompt=[3, 4, 5], max_tokens=300, ignore_eos=True)
    status, err = post_json(tiny, "/completions", body, headers={"X-Request-Timeout": "0.05"})
    assert status == 504 and err["error"]["type"] == "timeout_error", err
    status, err = post_json(tiny, "/completions", body, headers={"X-Request-Timeout": "soon"})
    assert status == 400 and "X-Request-Timeout" in err["error"]["message"]


# ---- logprobs ---------------------------------------------------------------------------------------

def test_completion_echo_logprobs_equal_transformers(tiny, tiny_llama_dir):
    """lm-evaluation-harness' local-completions request: prompt ids, echo, logprobs, max_tokens 0
    or 1; the prompt's log-likelihood from the OpenAI SDK equals transformers'."""
    ctx, cont = PROMPT_IDS[:5], PROMPT_IDS[5:]
    want, tol = reference_logprobs(tiny_llama_dir, PROMPT_IDS)
    with openai.OpenAI(base_url=tiny.http_url, api_key="unused", max_retries=0) as client:
        for max_tokens in (0, 1):
            out = client.completions.create(model=client.models.list().data[0].id, prompt=[PROMPT_IDS], echo=True,
                                            logprobs=2, max_tokens=max_tokens, temperature=0)
            lp = out.choices[0].logprobs
            assert len(lp.tokens) == len(PROMPT_IDS) + max_tokens == len(lp.text_offset)
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            got = sum(lp.token_logprobs[len(ctx):len(PROMPT_IDS)])
            assert got == pytest.approx(sum(float(want[i - 1, PROMPT_IDS[i]]) for i in range(len(ctx), len(PROMPT_IDS))),
                                        abs=len(cont) * tol)
            for i in range(1, len(PROMPT_IDS)):
                assert lp.token_logprobs[i] == pytest.approx(float(want[i - 1, PROMPT_IDS[i]]), abs=tol)
                assert len(lp.top_logprobs[i]) in (2, 3)                 # top 2, and the chosen token
                assert max(lp.top_logprobs[i].values()) == pytest.approx(float(want[i - 1].max()), abs=tol)
            assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
            if max_tokens:                                               # the greedy token's own logprob
                assert lp.token_logprobs[-1] == pytest.approx(float(want[-1].max()), abs=tol)
            else:
                assert out.usage.completion_tokens == 0 and out.choices[0].finish_reason == "length"


def test_chat_logprobs_equal_grpc_and_transformers_streamed_or_not(tiny, client, tiny_llama_dir):
    """Streamed, whole and gRPC runs are one code path (within its bound: batch mates may
    differ); transformers is another, within the bound of ``tests.engine.test_logprobs``."""
    _, tol = reference_logprobs(tiny_llama_dir, PROMPT_IDS * 4)       # a bound for this context
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = whole.choices[0].logprobs.content
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(content) == 6 and [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=tol)
    grpc_msgs = list(tiny.stub.Generate(__import__("tests.stack", fromlist=["request"]).request(
        chat=[("user", "Name a colour.")], max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3), timeout=60))
    ids = [t for m in grpc_msgs for t in m.token_ids]
    entries = [e for m in grpc_msgs for e in m.logprobs]
    assert [e.token_id for e in entries] == ids
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=tol)
    prompt_len = grpc_msgs[-1].usage.prompt_tokens
    from engine.source import load_tokenizer, resolve_model
    from router.text import TextCodec
    prompt = TextCodec(load_tokenizer(resolve_model(tiny_llama_dir))).render_chat([("user", "Name a colour.")])
    assert len(prompt) == prompt_len
    want, tol = reference_logprobs(tiny_llama_dir, prompt + ids)
    for i, e in enumerate(content):
        row = want[prompt_len - 1 + i]
        assert e.logprob == pytest.approx(float(row[ids[i]]), abs=tol)
        assert e.top_logprobs[0].logprob == pytest.approx(float(row.max()), abs=tol)
        assert e.bytes == list(e.token.encode("utf-8"))
        assert ids[i] == int(torch.argmax(row)) or float(row.max() - row[ids[i]]) < 2 * tol   # greedy


def test_streamed_completion_logprobs_add_up_to_the_whole(tiny, tiny_llama_dir):
    _, tol = reference_logprobs(tiny_llama_dir, PROMPT_IDS + [0] * 5)  # one code path, run twice
    body = dict(prompt=PROMPT_IDS, max_tokens=5, temperature=0, logprobs=1, echo=True, ignore_eos=True)
    status, whole = post_json(tiny, "/completions", body)
    assert status == 200
    import urllib.request
    req = urllib.request.Request(tiny.http_url + "/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.read().decode().split("\n\n")
                  if line.startswith("data: {")]
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"] and e["choices"][0]["logprobs"]]
    joined = {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "text_offset")}
    want = whole["choices"][0]["logprobs"]
    assert joined["tokens"] == want["tokens"] and joined["text_offset"] == want["text_offset"]
    assert joined["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], abs=tol)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole["choices"][0]["text"]
