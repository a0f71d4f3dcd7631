"""Fakes for the multi-turn load generator tests: a backend in process, and a router core that
the real gRPC and HTTP front doors serve (``serve_fake``)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

from services.loadgen.backends import Timing


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reply_of(prompt, n: int) -> list[int]:
    """The deterministic reply of both fakes: ``n`` ids from the prompt."""
    return [(sum(prompt) + 7 * i) % 97 + 1 for i in range(n)]


class EchoBackend:
    """A ``cleave bench`` backend that replies :func:`reply_of` the prompt ids after
    ``delay`` s and reports as cached the longest prefix it shares with an earlier prompt.
    ``fail``: request ids answered with an error. Records ``(request, sent, answered)``
    (``time.perf_counter()`` seconds) and the most requests ever in flight."""

    def __init__(self, delay: float = 0.0, fail: tuple[str, ...] = ()) -> None:
        self.delay, self.fail = delay, fail
        self.log: list = []
        self.inflight = self.most = 0
        self.closed = False

    async def send(self, req) -> Timing:
        t = Timing(time.perf_counter())
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        await asyncio.sleep(self.delay)
        self.inflight -= 1
        prompt = list(req.prompt_ids)
        if req.request_id in self.fail:
            t.error = "UNAVAILABLE: scripted"
        else:
            t.cached_tokens = max((common_prefix(prompt, r.prompt_ids) for r, _, _ in self.log), default=0)
            t.output_ids = reply_of(prompt, req.max_tokens)
            t.chunks.append(time.perf_counter())
            t.prompt_tokens, t.output_tokens = len(prompt), req.max_tokens
        self.log.append((req, t.start, time.perf_counter()))
        return t

    async def close(self) -> None:
        self.closed = True


class FakeCore:
    """What ``router.server.InferenceServicer`` and ``router.openai_api.build_app`` need of a
    ``RouterCore``. A prompt is its token ids, the UTF-8 bytes of a text prompt, or those of
    its chat messages written ``role: content`` one a line; the reply is :func:`reply_of` it,
    each token's text ``" w<id>"``; ``cached_tokens`` is the longest prefix shared with an
    earlier prompt, whole blocks of 4. ``seen``: every request."""

    model_id = "fake-model"
    model = SimpleNamespace(max_position=1 << 20)
    codec = None
    cfg = SimpleNamespace(stream_buffer=1024)   # the front doors' readahead bound

    def __init__(self) -> None:
        from common.prom import RouterMetrics

        self.prom = RouterMetrics("fake-model", running=lambda: 0, waiting=lambda: 0)
        self.seen, self._prompts = [], []

    def refused(self, exc) -> None:
        pass

    async def generate(self, request, timeout_s=None, fill_max_tokens=False):
        from cleave.v1 import inference_pb2 as pb

        self.seen.append(request)
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            text = request.prompt if kind == "prompt" else "\n".join(f"{m.role}: {m.content}"
                                                                     for m in request.chat.messages)
            prompt = list(text.encode())
        cached = max((common_prefix(prompt, p) for p in self._prompts), default=0) // 4 * 4
        self._prompts.append(prompt)
        reply = reply_of(prompt, request.sampling.max_tokens)
        for i, tok in enumerate(reply):
            await asyncio.sleep(0)
            msg = pb.GenerateResponse(request_id=request.request_id or "r", token_ids=[tok], text=f" w{tok}")
            if i == len(reply) - 1:
                msg.finish_reason = pb.FINISH_REASON_LENGTH
                msg.usage.prompt_tokens, msg.usage.completion_tokens = len(prompt), len(reply)
                msg.usage.cached_tokens = cached
            yield msg


@contextlib.asynccontextmanager
async def serve_fake(core: FakeCore):
    """Serve ``core`` over gRPC and the OpenAI HTTP API on free ports of 127.0.0.1; yields
    ``(grpc address, HTTP base URL)``."""
    import grpc

    from cleave.v1 import inference_pb2_grpc
    from router.openai_api import start_http
    from router.server import InferenceServicer

    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    http = await start_http(core, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{http.port}/v1"
    finally:
        await http.stop()
        await server.stop(grace=None)
