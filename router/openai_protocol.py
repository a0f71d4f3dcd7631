"""OpenAI wire format -> ``cleave.v1`` requests, for the HTTP front door (``router.openai_api``).

Requests (``/v1/completions``, ``/v1/chat/completions``) are parsed into pydantic models that
keep unknown fields (clients send ``user``, ``metadata``...), then turned into one
``GenerateRequest``. An explicit ``null`` is the field's default, for every field (OpenAI's
schema allows ``null`` for each optional parameter). What OpenAI defines and Cleave does not
do (``n`` > 1, penalties, ``logit_bias``, tools, ``suffix``, batched prompts) is refused with
a 400 that says so, never silently ignored. Extensions, as vLLM spells them: ``top_k`` (0 or
-1 = off) and ``ignore_eos``.

Defaults are OpenAI's: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 16 for completions;
chat without ``max_tokens`` / ``max_completion_tokens`` may fill the context.

Logprobs (``router.openai_shape`` shapes them): chat ``logprobs: true`` with ``top_logprobs``
0-20; completions ``logprobs`` 0-5 and ``echo`` (the prompt's own logprobs, with
``max_tokens`` 0 or more). They are of the raw model output (``engine.logprobs``).

Errors are ``common.errors`` classes raised here (``InvalidRequest`` naming the parameter);
the front door gives them OpenAI's error body.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cleave.v1 import inference_pb2
from common.config import MAX_TOP_LOGPROBS
from common.errors import InvalidRequest

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
COMPLETION_MAX_LOGPROBS = 5  # OpenAI's bound on /v1/completions logprobs
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
_MAX_TOKEN_ID = 2 ** 32 - 1  # the wire type's (uint32) bound; the vocabulary is checked later


class _Body(BaseModel):
    """A request object: unknown fields kept, an explicit ``null`` read as "not given"."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
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
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class Message(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None


def _text(value: str, param: str) -> str:
    """``value`` when it is valid Unicode (encodable as UTF-8), else InvalidRequest naming ``param``
    (JSON may carry lone UTF-16 surrogates such as ``"\\ud83d"``; no tokenizer takes them)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{param} holds a lone UTF-16 surrogate ({value[exc.start]!r} at character "
                             f"{exc.start}); send valid Unicode text") from None
    return value


def _refuse_unsupported(req: _Sampling) -> None:
    if req.n != 1:
        raise InvalidRequest(f"n={req.n} is not supported: Cleave returns one choice per request "
                             f"(send n=1, or several requests)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise InvalidRequest(f"{name} is not supported; leave it unset or 0")
    if req.logit_bias:
        raise InvalidRequest("logit_bias is not supported; leave it unset")
    if isinstance(req, CompletionRequest):
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
    if req.top_p is not None and not 0 < req.top_p <= 1:  # NaN fails too
        raise InvalidRequest(f"top_p must be in (0, 1] (1 = off), got {req.top_p}")
    if req.top_k is not None and req.top_k < -1:
        raise InvalidRequest(f"top_k must be >= 0 (0 or -1 = off), got {req.top_k}")
    if req.seed is not None and req.seed < 0:
        raise InvalidRequest(f"seed must be >= 0, got {req.seed}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    for s in stop:
        _text(s, "stop")
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


def _logprobs_count(value: int | None, most: int, param: str) -> int | None:
    if value is not None and not 0 <= value <= most:
        raise InvalidRequest(f"{param} must be in 0..{most}, got {value}")
    return value


def completion_request(req: CompletionRequest) -> inference_pb2.GenerateRequest:
    """The ``GenerateRequest`` of a ``/v1/completions`` body. Raises InvalidRequest."""
    max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise InvalidRequest("max_tokens must be >= 1 (0 only with echo, to score the prompt)")
    out = inference_pb2.GenerateRequest(sampling=_sampling(req, max_tokens))
    top = _logprobs_count(req.logprobs, COMPLETION_MAX_LOGPROBS, "logprobs")
    if top is not None:
        out.sampling.logprobs = True
        out.sampling.top_logprobs = top
    # echo with max_tokens 0 still runs the prompt through a worker: its answer is the prompt's
    out.sampling.prompt_logprobs = req.echo and (top is not None or max_tokens == 0)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequest(f"prompt holds {len(prompt)} prompts; batched prompts are not supported, "
                                 f"send one request per prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        out.prompt = _text(prompt, "prompt")
    else:
        bad = [t for t in prompt if not 0 <= t <= _MAX_TOKEN_ID]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is not a token id: ids must be >= 0 and "
                                 f"below the vocabulary size")
        out.token_ids.ids.extend(prompt)
        if not prompt:
            out.token_ids.SetInParent()  # an empty list is "token_ids is empty", not "no input"
    return out


def chat_request(req: ChatRequest) -> inference_pb2.GenerateRequest:
    """The ``GenerateRequest`` of a ``/v1/chat/completions`` body (``max_tokens`` 0 = not
    given: the core fills it from the context left). Raises InvalidRequest."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    out = inference_pb2.GenerateRequest(sampling=_sampling(req, max_tokens))
    if max_tokens == 0:
        raise InvalidRequest("max_tokens must be >= 1 (how many tokens to generate)")
    top = _logprobs_count(req.top_logprobs, MAX_TOP_LOGPROBS, "top_logprobs")
    if top is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true")
    if req.logprobs:
        out.sampling.logprobs = True
        out.sampling.top_logprobs = top or 0
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            kinds = sorted({p.type for p in m.content if p.type != "text"})
            if kinds:
                raise InvalidRequest(f"message {i} has content parts of type {kinds}; only text is supported")
            content = "".join(_text(p.text or "", f"messages[{i}].content") for p in m.content)
        else:
            content = _text(m.content or "", f"messages[{i}].content")
        role = _text(m.role, f"messages[{i}].role")
        out.chat.messages.add(role=_ROLE_ALIASES.get(role, role), content=content)
    return out
