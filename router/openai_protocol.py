"""OpenAI wire format <-> ``cleave.v1`` messages, for the HTTP front door (``router.openai_api``).

Requests (``/v1/completions``, ``/v1/chat/completions``) are parsed into pydantic models that
keep unknown fields (clients send ``user``, ``metadata``...), then turned into one
``GenerateRequest``. What OpenAI defines and Cleave does not do (``n`` > 1, ``logprobs``,
``echo``, penalties, ``logit_bias``, tools, batched prompts) is refused with a 400 that says
so, never silently ignored. Extensions, as vLLM spells them: ``top_k`` (0 or -1 = off) and
``ignore_eos``.

Defaults are OpenAI's: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 16 for completions;
chat without ``max_tokens`` / ``max_completion_tokens`` may fill the context.

Errors (:func:`error_body`) have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``; the HTTP status comes from ``common.errors.http_status_of``, the same error
classes that give the gRPC status.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from cleave.v1 import inference_pb2
from common.errors import InvalidRequest

FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: Any = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[ContentPart], None] = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None


def _refuse_unsupported(req: _Sampling) -> None:
    if req.n != 1:
        raise InvalidRequest(f"n={req.n} is not supported: Cleave returns one choice per request "
                             f"(send n=1, or several requests)")
    if req.logprobs not in (None, False, 0):
        raise InvalidRequest("logprobs are not supported; leave logprobs unset")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise InvalidRequest(f"{name} is not supported; leave it unset or 0")
    if req.logit_bias:
        raise InvalidRequest("logit_bias is not supported; leave it unset")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise InvalidRequest("echo is not supported; leave it false")
        if req.best_of not in (None, 1):
            raise InvalidRequest(f"best_of={req.best_of} is not supported; leave it unset or 1")
        if req.suffix:
            raise InvalidRequest("suffix is not supported; leave it unset")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise InvalidRequest("tools are not supported; leave tools unset")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise InvalidRequest(f"response_format {req.response_format.get('type')!r} is not supported; "
                                 f"only text")


def _sampling(req: _Sampling, max_tokens: int | None) -> inference_pb2.SamplingParams:
    _refuse_unsupported(req)
    if max_tokens is not None and max_tokens < 0:
        raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
    if req.top_k is not None and req.top_k < -1:
        raise InvalidRequest(f"top_k must be >= 0 (0 or -1 = off), got {req.top_k}")
    if req.seed is not None and req.seed < 0:
        raise InvalidRequest(f"seed must be >= 0, got {req.seed}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        params = inference_pb2.SamplingParams(
            max_tokens=max_tokens or 0, stop=stop, ignore_eos=req.ignore_eos,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0))
        if req.seed is not None:
            params.seed = req.seed
    except ValueError as exc:  # out of the wire type's range (e.g. max_tokens >= 2**32)
        raise InvalidRequest(f"a sampling parameter is out of range: {exc}") from None
    return params


def completion_request(req: CompletionRequest) -> inference_pb2.GenerateRequest:
    """The ``GenerateRequest`` of a ``/v1/completions`` body. Raises InvalidRequest."""
    max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    out = inference_pb2.GenerateRequest(sampling=_sampling(req, max_tokens))
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequest(f"prompt holds {len(prompt)} prompts; batched prompts are not supported, "
                                 f"send one request per prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        out.prompt = prompt
    else:
        if any(t < 0 for t in prompt):
            raise InvalidRequest("prompt token ids must be >= 0")
        out.token_ids.ids.extend(prompt)
        if not prompt:
            out.token_ids.SetInParent()  # an empty list is "token_ids is empty", not "no input"
    return out


def chat_request(req: ChatRequest) -> inference_pb2.GenerateRequest:
    """The ``GenerateRequest`` of a ``/v1/chat/completions`` body (``max_tokens`` 0 = not
    given: the front door fills it from the context left). Raises InvalidRequest."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    out = inference_pb2.GenerateRequest(sampling=_sampling(req, max_tokens))
    if max_tokens == 0:
        raise InvalidRequest("max_tokens must be >= 1 (how many tokens to generate)")
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            kinds = sorted({p.type for p in m.content if p.type != "text"})
            if kinds:
                raise InvalidRequest(f"message {i} has content parts of type {kinds}; only text is supported")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        out.chat.messages.add(role=_ROLE_ALIASES.get(m.role, m.role), content=content)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shaper:
    """Builds the response objects of one request (``chat`` or text completion)."""

    def __init__(self, chat: bool, model: str, request_id: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage=usage(prompt_tokens, completion_tokens))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(prompt_tokens, completion_tokens))


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

