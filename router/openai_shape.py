"""``cleave.v1`` responses -> OpenAI response objects, for the HTTP front door (``router.openai_api``).

:class:`Shaper` builds the objects of one request: a whole ``chat.completion`` /
``text_completion``, or its stream chunks. Logprobs (``GenerateResponse.logprobs`` and
``prompt_logprobs``, one ``TokenLogprob`` per token) take OpenAI's two shapes:

* chat: ``choices[].logprobs.content[]`` = ``{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}]}``;
* completions: ``choices[].logprobs`` = ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``; ``top_logprobs[i]`` maps token text to log-probability and always holds the
  chosen token too (OpenAI: "up to logprobs + 1 elements"; tokens spelled alike keep the
  likelier value, as the object is keyed by text); the prompt's first token has
  ``null`` for both (nothing predicts it). ``text_offset`` counts characters into the choice's
  ``text`` (with ``echo``, the prompt text first), running on across stream chunks.

Token text is ``TextCodec.token_text`` and ``bytes`` its UTF-8 bytes.

``usage`` is OpenAI's: ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and
``prompt_tokens_details.cached_tokens`` (prompt tokens served from a prefix cache; always
present, 0 when none were), from the last message's ``Usage``.
"""
from __future__ import annotations

import time

from cleave.v1 import inference_pb2

FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def usage_of(u: inference_pb2.Usage) -> dict:
    """OpenAI's ``usage`` object of a ``cleave.v1.Usage``."""
    return usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Shaper:
    """Builds the response objects of one request (``chat`` or text completion).

    ``codec``: the router's ``TextCodec`` (token text for logprobs); ``logprobs``: whether the
    request asked for them; ``echo``: the prompt text a completion with ``echo`` starts with."""

    def __init__(self, chat: bool, model: str, request_id: str, codec=None, logprobs: bool = False,
                 echo: str = "") -> None:
        self.chat, self.model, self.codec = chat, model, codec
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.logprobs = logprobs
        self.echo = echo
        self._offset = 0  # completions: text_offset of the next token

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _lead(self, msg: inference_pb2.GenerateResponse) -> tuple[str, list]:
        """The first message's text and logprob entries (the echoed prompt's first)."""
        return self.echo + msg.text, [*msg.prompt_logprobs, *msg.logprobs]

    def whole(self, messages: list[inference_pb2.GenerateResponse]) -> dict:
        """The whole response from every message of a finished request."""
        text, entries = self._lead(messages[0])
        text += "".join(m.text for m in messages[1:])
        entries += [e for m in messages[1:] for e in m.logprobs]
        last = messages[-1]
        finish = FINISH.get(last.finish_reason)
        total = usage_of(last.usage)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._shape(entries), "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage=total)
        choice = {"index": 0, "text": text, "logprobs": self._shape(entries), "finish_reason": finish}
        return self._envelope("text_completion", [choice], usage=total)

    def chunk(self, msg: inference_pb2.GenerateResponse | None, first: bool = False, role: bool = False) -> dict | None:
        """One stream chunk for ``msg`` (None when it carries nothing to send); ``role``: chat's
        opening chunk that names the assistant."""
        if msg is None:
            text, entries, finish = None, [], None
        else:
            text, entries = self._lead(msg) if first else (msg.text, list(msg.logprobs))
            finish = FINISH.get(msg.finish_reason) if msg.finish_reason else None
            if not (text or entries or finish):
                return None
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": self._shape(entries) if msg else None,
                      "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": self._shape(entries), "finish_reason": finish}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, last: inference_pb2.GenerateResponse) -> dict:
        """The stream's usage chunk (``stream_options.include_usage``): no choices, the ``usage``
        of ``last``, the request's last message."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage_of(last.usage))

    # ---- logprobs -------------------------------------------------------------------------------
    def _shape(self, entries: list) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries], "refusal": None}
        tokens, own, tops, offsets = [], [], [], []
        for e in entries:
            token = self.codec.token_text(e.token_id)
            tokens.append(token)
            offsets.append(self._offset)
            self._offset += len(token)
            if e.HasField("logprob"):
                own.append(e.logprob)
                top: dict[str, float] = {}
                for t in e.top:  # two ids with one text keep the likelier (the dict is keyed by text)
                    top.setdefault(self.codec.token_text(t.token_id), t.logprob)
                top.setdefault(token, e.logprob)
                tops.append(top)
            else:
                own.append(None)
                tops.append(None)
        return {"tokens": tokens, "token_logprobs": own, "top_logprobs": tops, "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.codec.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _chat_entry(self, e: inference_pb2.TokenLogprob) -> dict:
        return {**self._token(e.token_id, e.logprob),
                "top_logprobs": [self._token(t.token_id, t.logprob) for t in e.top]}
