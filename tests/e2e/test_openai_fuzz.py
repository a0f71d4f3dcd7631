"""Property-based fuzz of both OpenAI request bodies against the real stack (``tiny_stack``).

Hypothesis builds bodies from every field either endpoint knows, each value drawn from the
field's own type, its edges (0, negative, past 32 and 64 bits, ``null``, lone surrogates) or
any other JSON value. Every answer must be a 200 (a stream ending in ``[DONE]`` without a
server-side error event) or a 4xx with OpenAI's error body; never a 5xx. After the run the
server still answers a normal request and every KV block is free again. A few hundred bodies
in the default tier, 1,000 in the ``slow`` tier.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

_INTS = st.one_of(st.integers(-2, 24), st.sampled_from([0, -1, 2 ** 31, 2 ** 32, 2 ** 63, -(2 ** 63), 10 ** 30]))
_FLOATS = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, -0.0, 1e300, float("inf"), float("nan")]))
_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "hi", "\ud83d", "a\udc00b", "<|im_end|>", "\x00"]))
_ANY = st.recursive(st.one_of(st.none(), st.booleans(), _INTS, _FLOATS, _TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_TEXT, inner, max_size=3)),
                    max_leaves=6)


def _field(valid, edge=None):
    """(a valid value, a broken one: an edge of the field's type, ``null`` or any JSON value)."""
    return valid, st.one_of(edge, st.none(), _ANY) if edge is not None else st.one_of(st.none(), _ANY)


_TOKEN_LISTS = st.lists(st.integers(0, 300), min_size=1, max_size=8)
_WORDS = st.text(min_size=1, max_size=3)
_COMMON = {
    "model": _field(st.just(""), st.sampled_from(["nope", "\ud83d"])),
    "max_tokens": _field(st.integers(1, 24), _INTS), "temperature": _field(st.floats(0, 2), _FLOATS),
    "top_p": _field(st.floats(0.01, 1), _FLOATS), "top_k": _field(st.integers(-1, 50), _INTS),
    "seed": _field(st.integers(0, 2 ** 63), _INTS),
    "stop": _field(st.one_of(_WORDS, st.lists(_WORDS, max_size=3)), st.one_of(_TEXT, st.lists(_TEXT, max_size=3))),
    "stream": _field(st.booleans()), "stream_options": _field(st.just({"include_usage": True}), st.dictionaries(_TEXT, _ANY)),
    "ignore_eos": _field(st.booleans()), "n": _field(st.just(1), _INTS),
    "presence_penalty": _field(st.just(0.0), _FLOATS), "frequency_penalty": _field(st.just(0.0), _FLOATS),
    "logit_bias": _field(st.just({}), st.dictionaries(_TEXT, _FLOATS, max_size=2)), "user": _field(_TEXT),
}
_COMPLETION = {
    **_COMMON, "logprobs": _field(st.integers(0, 5), _INTS), "echo": _field(st.booleans()),
    "best_of": _field(st.just(1), _INTS), "suffix": _field(st.just(""), _TEXT),
    "prompt": _field(st.one_of(st.text(min_size=1, max_size=20), _TOKEN_LISTS, st.lists(_TOKEN_LISTS, min_size=1, max_size=1)),
                     st.one_of(_TEXT, st.lists(_INTS, max_size=3), st.lists(_TEXT, max_size=2))),
}
_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(min_size=1, max_size=12)})
_BAD_PART = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "", "text"])}, optional={"text": _ANY})
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                  "content": st.one_of(st.text(min_size=1, max_size=20), st.lists(_PART, min_size=1, max_size=2))})
_BAD_MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["tool", "wizard", ""]), _ANY)},
                                     optional={"content": st.one_of(_TEXT, st.lists(_BAD_PART, max_size=2), _ANY)})
_CHAT = {
    **_COMMON, "max_completion_tokens": _field(st.integers(1, 24), _INTS), "logprobs": _field(st.booleans()),
    "top_logprobs": _field(st.integers(0, 20), _INTS), "tools": _field(st.just([]), st.lists(_ANY, max_size=1)),
    "response_format": _field(st.just({"type": "text"}), st.fixed_dictionaries({"type": _TEXT})),
    "messages": _field(st.lists(_MESSAGE, min_size=1, max_size=3),
                       st.lists(st.one_of(_MESSAGE, _BAD_MESSAGE), max_size=3)),
}


def _bodies(fields: dict, required: str):
    """A body of valid values for some fields (``required`` always), then 0-2 of its fields
    (or absent ones) broken: most bodies are served, every field is also tried broken."""
    names = sorted(fields)

    @st.composite
    def body(draw):
        present = draw(st.sets(st.sampled_from(names), max_size=8)) | {required}
        out = {k: draw(fields[k][0]) for k in sorted(present)}
        for k in draw(st.lists(st.sampled_from(names), max_size=2)):
            out[k] = draw(fields[k][1])
        if draw(st.integers(0, 9)) == 0:
            del out[required]
        return out
    return body()


COMPLETION = _bodies(_COMPLETION, "prompt")
CHAT = _bodies(_CHAT, "messages")


def _send(url: str, body: dict) -> tuple[int, str]:
    data = json.dumps(body).encode()  # NaN and Infinity go as Python's json writes them
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def check_answer(status: int, text: str, body: dict) -> None:
    assert status == 200 or 400 <= status < 500, f"{status} for {body!r}: {text[:300]}"
    if status != 200:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], text
        return
    if text.startswith("data: "):
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", f"stream of {body!r} did not end with [DONE]"
        for e in events[:-1]:
            obj = json.loads(e.removeprefix("data: "))
            assert "error" not in obj or not str(obj["error"].get("code", "")).startswith("5"), (body, obj)
    else:
        assert json.loads(text)["choices"], text


def _fuzz(tiny_stack, body: dict, chat: bool) -> None:
    url = tiny_stack.http_url + ("/chat/completions" if chat else "/completions")
    if isinstance(body.get("model"), str) and body["model"] == "":
        body = {**body, "model": tiny_stack.stub and _model_id(tiny_stack)}
    check_answer(*_send(url, body), body)


def _model_id(stack) -> str:
    with urllib.request.urlopen(stack.http_url + "/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def _run(tiny_stack, examples: int) -> None:
    before = tiny_stack.free_blocks()

    @settings(max_examples=examples, deadline=None, derandomize=False, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(COMPLETION.map(lambda b: (b, False)), CHAT.map(lambda b: (b, True))))
    def fuzz(body):
        _fuzz(tiny_stack, *body)

    fuzz()
    status, text = _send(tiny_stack.http_url + "/completions", {"prompt": [1, 2, 3], "max_tokens": 3})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] >= 1
    assert tiny_stack.wait_free_blocks(before) == before, "KV blocks leaked"


def test_fuzzed_bodies_never_get_a_5xx(tiny_stack):
    _run(tiny_stack, 300)


@pytest.mark.slow
def test_fuzzed_bodies_never_get_a_5xx_many(tiny_stack):
    _run(tiny_stack, 1000)
