"""How ``cleave bench`` talks to a running Cleave: the gRPC API or the OpenAI HTTP API.

A backend's :meth:`send` runs one request to the end and returns a :class:`Timing`: when it
was sent, when each piece of output arrived (monotonic seconds) and how many tokens came.
Output is requested with ``ignore_eos`` so every request makes exactly ``max_tokens`` tokens
(the load is the one asked for, as in ``vllm bench serve``'s random dataset). The timing also
keeps the reply (token ids over gRPC, text over the OpenAI API), which a multi-turn
conversation puts into its history, and the prompt tokens the server's prefix cache served
(``Usage.cached_tokens``; OpenAI's ``usage.prompt_tokens_details.cached_tokens``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import grpc

from cleave.v1 import inference_pb2, inference_pb2_grpc
from services.loadgen.datasets import BenchRequest, render

BACKENDS = ("grpc", "openai", "openai-chat")


@dataclass
class Timing:
    """One request as the client saw it. Times are ``time.perf_counter()`` seconds."""

    start: float
    chunks: list[float] = field(default_factory=list)   # arrival of each piece of output
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0            # prompt tokens served from the server's prefix cache
    output_ids: list[int] = field(default_factory=list)   # the reply's token ids (gRPC)
    output_text: str = ""             # the reply's text (OpenAI API)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunks)

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunks[-1] - self.start

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (None for a single-token output)."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def reply(self) -> tuple[int, ...] | str:
        """The reply as a conversation's history holds it: token ids (gRPC) or text (OpenAI)."""
        return tuple(self.output_ids) if self.output_ids else self.output_text


class GrpcBackend:
    """``cleave.v1.Inference/Generate`` with the prompt as token ids."""

    def __init__(self, address: str, timeout_s: float = 600.0) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._timeout = timeout_s

    async def send(self, req: BenchRequest) -> Timing:
        if req.has_text:
            raise ValueError("the gRPC backend sends token ids; this conversation holds text")
        msg = inference_pb2.GenerateRequest(request_id=req.request_id, sampling=inference_pb2.SamplingParams(
            max_tokens=req.max_tokens, ignore_eos=True))
        msg.token_ids.ids.extend(req.prompt_ids)
        t = Timing(time.perf_counter(), prompt_tokens=len(req.prompt_ids))
        try:
            async for resp in self._stub.Generate(msg, timeout=self._timeout):
                if resp.token_ids:
                    t.chunks.append(time.perf_counter())
                    t.output_tokens += len(resp.token_ids)
                    t.output_ids.extend(resp.token_ids)
                if resp.HasField("usage") and resp.usage.prompt_tokens:
                    t.prompt_tokens = resp.usage.prompt_tokens
                    t.cached_tokens = resp.usage.cached_tokens
        except grpc.aio.AioRpcError as exc:
            t.error = f"{exc.code().name}: {exc.details()}"
        return t

    async def close(self) -> None:
        await self._channel.close()


class OpenAIBackend:
    """Streaming ``/v1/completions`` (prompt as token ids) or ``/v1/chat/completions`` (the
    prompt ids written as space-separated numbers in one user message) over aiohttp; a
    request with a ``history`` as :class:`~services.loadgen.datasets.BenchRequest` says.
    Output, prompt and cached tokens come from the final ``usage``
    (``stream_options.include_usage``)."""

    def __init__(self, base_url: str, model: str = "", chat: bool = False, timeout_s: float = 600.0) -> None:
        import aiohttp

        self._url = base_url.rstrip("/") + ("/chat/completions" if chat else "/completions")
        self._model = model
        self._chat = chat
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                              connector=aiohttp.TCPConnector(limit=0))

    def _body(self, req: BenchRequest) -> dict:
        body = {"model": self._model, "max_tokens": req.max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}, "temperature": 0}
        if self._chat:
            turns = req.history or (("user", req.prompt_ids),)
            body["messages"] = [{"role": role, "content": render(content)} for role, content in turns]
        elif req.history:   # text from the first turn on, so every turn starts with the last one's prompt
            body["prompt"] = "\n".join(render(content) for _, content in req.history)
        else:
            body["prompt"] = list(req.prompt_ids)
        return body

    async def send(self, req: BenchRequest) -> Timing:
        t = Timing(time.perf_counter(), prompt_tokens=len(req.prompt_ids))
        headers = {"X-Request-Id": req.request_id} if req.request_id else None
        try:
            async with self._session.post(self._url, json=self._body(req), headers=headers) as resp:
                if resp.status != 200:
                    t.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return t
                async for line in resp.content:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        t.error = event["error"].get("message", str(event["error"]))
                        break
                    choices = event.get("choices") or ()
                    if any(_has_output(c) for c in choices):
                        t.chunks.append(time.perf_counter())
                        t.output_text += "".join(_text(c) or "" for c in choices)
                    if event.get("usage"):
                        usage = event["usage"]
                        t.prompt_tokens = usage["prompt_tokens"]
                        t.output_tokens = usage["completion_tokens"]
                        t.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        except Exception as exc:  # connection refused, reset, timeout: the request failed
            t.error = f"{type(exc).__name__}: {exc}"
        return t

    async def close(self) -> None:
        await self._session.close()


def _text(choice: dict) -> str | None:
    delta = choice.get("delta")
    return delta.get("content") if delta is not None else choice.get("text")


def _has_output(choice: dict) -> bool:
    return bool(_text(choice)) or choice.get("finish_reason") is not None


def make_backend(kind: str, target: str, model: str = ""):
    """``kind`` in BACKENDS; ``target`` is ``host:port`` for gRPC, a base URL ending in ``/v1``
    for the OpenAI API."""
    if kind == "grpc":
        return GrpcBackend(target)
    if kind in ("openai", "openai-chat"):
        if not target.startswith(("http://", "https://")):
            raise ValueError(f"the OpenAI backend needs a base URL such as http://127.0.0.1:8000/v1, "
                             f"got {target!r}")
        return OpenAIBackend(target, model, chat=kind == "openai-chat")
    raise ValueError(f"backend must be one of {BACKENDS}, got {kind!r}")
