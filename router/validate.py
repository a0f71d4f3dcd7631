"""Input validation of public ``Generate`` requests: every rule with a message a person can act on.

Called by ``router.server`` before anything is queued; raises ``InvalidRequest``
(gRPC ``INVALID_ARGUMENT``).
"""
from __future__ import annotations

import math
import re
import secrets
import uuid

from cleave.v1 import inference_pb2
from common.config import MAX_TOP_LOGPROBS
from common.errors import InvalidRequest
from common.model import ModelConfig
from router.text import CHAT_ROLES, TextCodec

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# a prompt longer than this many characters per token of context cannot fit, whatever the
# tokenizer's normalizer does (slack over TextCodec.max_token_chars, which is an upper bound)
_CHARS_SLACK = 2


def request_id_of(request: inference_pb2.GenerateRequest) -> str:
    if not request.request_id:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(request.request_id):  # fullmatch: "$" would allow a trailing "\n"
        raise InvalidRequest(f"request_id {request.request_id[:64]!r} must be 1-128 characters "
                             f"of letters, digits, '.', '_', ':' or '-'")
    return request.request_id


def check_input_size(request: inference_pb2.GenerateRequest, codec: TextCodec, model: ModelConfig) -> None:
    """Cheap size checks before tokenizing: input that cannot fit the context is refused
    without spending tokenizer time on it (megabyte prompts)."""
    kind = request.WhichOneof("input")
    limit = model.max_position
    if kind == "token_ids":
        n = len(request.token_ids.ids)
        if n > limit:
            raise InvalidRequest(f"token_ids has {n} tokens; the context holds {limit}")
        return
    if kind == "prompt":
        chars = len(request.prompt)
    elif kind == "chat":
        chars = sum(len(m.content) + len(m.role) for m in request.chat.messages)
    else:
        return
    most = limit * codec.max_token_chars * _CHARS_SLACK
    if chars > most:
        raise InvalidRequest(f"the {kind} has {chars} characters, more than {limit} tokens of context "
                             f"can hold (at most {most}); shorten it")


def prompt_ids_of(request: inference_pb2.GenerateRequest, codec: TextCodec, model: ModelConfig) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("the request has no input: set one of prompt, token_ids or chat")
    if kind == "prompt":
        if not request.prompt.strip():
            raise InvalidRequest("prompt is empty")
        ids = codec.encode(request.prompt)
    elif kind == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidRequest("token_ids is empty")
        bad = sorted({t for t in ids if t >= model.vocab_size})
        if bad:
            raise InvalidRequest(f"token_ids {bad[:5]} are outside the vocabulary: ids must be "
                                 f"< {model.vocab_size}")
    else:
        messages = [(m.role, m.content) for m in request.chat.messages]
        if not messages:
            raise InvalidRequest("chat has no messages")
        for i, (role, _) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidRequest(f"chat message {i} has unknown role {role!r}; use one of "
                                     f"{', '.join(CHAT_ROLES)}")
        if not any(content.strip() for _, content in messages):
            raise InvalidRequest("every chat message is empty")
        try:
            ids = codec.render_chat(messages)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        except Exception as exc:  # template errors (e.g. roles in an order it rejects)
            raise InvalidRequest(f"the model's chat template rejected these messages: {exc}") from None
    if not ids:
        raise InvalidRequest("the input tokenizes to no tokens")
    return ids


def check_sampling(sampling: inference_pb2.SamplingParams, prompt_len: int, model: ModelConfig) -> None:
    limit = model.max_position
    if sampling.max_tokens < 1 and not sampling.prompt_logprobs:
        raise InvalidRequest("sampling.max_tokens must be >= 1 (how many tokens to generate; 0 only "
                             "with prompt_logprobs, to score the prompt)")
    if sampling.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"sampling.top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {sampling.top_logprobs}")
    if sampling.top_logprobs and not (sampling.logprobs or sampling.prompt_logprobs):
        raise InvalidRequest("sampling.top_logprobs needs sampling.logprobs or sampling.prompt_logprobs")
    if sampling.max_tokens >= limit:
        raise InvalidRequest(f"sampling.max_tokens={sampling.max_tokens} is above the model's limit: "
                             f"the context holds {limit} tokens, prompt included")
    if prompt_len + sampling.max_tokens > limit:
        raise InvalidRequest(f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) = "
                             f"{prompt_len + sampling.max_tokens} exceeds the context length {limit}; "
                             f"shorten the prompt or lower max_tokens to {max(0, limit - prompt_len)}")
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise InvalidRequest(f"sampling.temperature must be a finite number >= 0, got {sampling.temperature}")
    if not math.isfinite(sampling.top_p) or not 0 <= sampling.top_p <= 1:
        raise InvalidRequest(f"sampling.top_p must be in [0, 1] (0 or 1 = off), got {sampling.top_p}")
    if any(not s for s in sampling.stop):
        raise InvalidRequest("sampling.stop contains an empty string")
    if len(sampling.stop) > 16 or any(len(s) > 256 for s in sampling.stop):
        raise InvalidRequest("sampling.stop allows at most 16 strings of at most 256 characters")


def seed_of(sampling: inference_pb2.SamplingParams) -> int:
    return sampling.seed if sampling.HasField("seed") else secrets.randbits(63)
