"""Fault kinds where one request's input, bad bytes or a slow Redis could hurt others (unit tier).

Each test pins the right value of one input from the fault report (issue 10) and its siblings:
validation anchoring and sizes, tokenizing off the event loop, undecodable bytes, the
internal-API token, and request state that Redis outages neither delay nor lose. Counting
attempts as made and never retrying a failure the worker marks as the request's own are tested
on real workers in tests/router/test_fake_workers.py.
"""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from cleave.v1 import inference_pb2 as pb
from cleave.v1 import worker_pb2, worker_pb2_grpc
from common.config import RouterConfig
from common.errors import InvalidRequest
from common.grpc_util import add_service
from common.model import ModelConfig
from router.validate import check_input_size, request_id_of

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MODEL = ModelConfig(architecture="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0,
                    rms_norm_eps=1e-5, max_position=64, tie_word_embeddings=False)


# ---- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", ["t2-nl\n", "a" * 128 + "\n", "x\ny", "\n", "a" * 129, "é", "a b", "slash/no"])
def test_request_ids_outside_the_promised_alphabet_are_refused(rid):
    with pytest.raises(InvalidRequest, match=r"1-128 characters of letters, digits"):
        request_id_of(pb.GenerateRequest(request_id=rid))


@pytest.mark.parametrize("rid", ["a" * 128, "req-1:2_3.x", "abc.DEF_1:2-3", "Z"])
def test_request_ids_in_the_alphabet_pass(rid):
    assert request_id_of(pb.GenerateRequest(request_id=rid)) == rid


class NeverTokenize:
    """A codec whose tokenizer must not be reached: the size check comes first."""

    max_token_chars = 4

    def encode(self, text):
        raise AssertionError("tokenized an input that cannot fit")


@pytest.mark.parametrize("req", [
    pb.GenerateRequest(prompt="x" * (64 * 4 * 2 + 1)),
    pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="y" * 600)])),
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 65)),
])
def test_inputs_that_cannot_fit_are_refused_before_tokenizing(req):
    with pytest.raises(InvalidRequest, match="context"):
        check_input_size(req, NeverTokenize(), MODEL)


def test_inputs_that_may_fit_pass_the_size_check():
    check_input_size(pb.GenerateRequest(prompt="x" * (64 * 4 * 2)), NeverTokenize(), MODEL)
    check_input_size(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 64)), NeverTokenize(), MODEL)


def test_tokenizing_runs_off_the_event_loop(redis_url):
    """While one prompt is being tokenized, the event loop keeps running other requests' work."""
    from router.core import RouterCore
    from router.text import TextCodec
    from common.registry import connect_redis

    started, release = threading.Event(), threading.Event()

    class SlowTokenizer:
        chat_template = None

        def get_vocab(self):
            return {"ab": 0}

        def encode(self, text, add_special_tokens=True):
            started.set()
            assert release.wait(10), "the loop never ran while tokenizing"
            return [1, 2]

    async def main():
        core = RouterCore(RouterConfig(redis_url=redis_url), "m", MODEL, TextCodec(SlowTokenizer()),
                          connect_redis(redis_url))
        admitted = asyncio.create_task(core._admit(pb.GenerateRequest(
            prompt="hello", sampling=pb.SamplingParams(max_tokens=4))))
        while not started.is_set():
            await asyncio.sleep(0.01)
        release.set()  # only reachable when the loop is free while the tokenizer blocks
        rid, ids = await admitted
        await core.client.aclose()
        return ids

    assert asyncio.run(main()) == [1, 2]


# ---- bad bytes and the internal token ----------------------------------------------------------

class InfoOnly(worker_pb2_grpc.PrefillServicer):
    async def Info(self, request, context):
        return worker_pb2.WorkerInfo(free_blocks=7)


async def _serve(servicer, token=None):
    server = grpc.aio.server()
    add_service(server, servicer, worker_pb2.DESCRIPTOR.services_by_name["Prefill"], token)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _raw_call(address, method, payload, metadata=()):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(payload, timeout=10, metadata=metadata)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details()


def test_undecodable_bytes_and_missing_tokens_are_refused_clearly(caplog):
    async def main():
        server, address = await _serve(InfoOnly(), token="s3cret")
        try:
            good = worker_pb2.InfoRequest().SerializeToString()
            auth = (("authorization", "Bearer s3cret"),)
            return await asyncio.gather(*(asyncio.to_thread(_raw_call, address, "/cleave.v1.Prefill/Info", *a) for a in [
                (b"\x12\x05ab", auth),              # truncated: not a message
                (good, ()),                         # no token
                (good, (("authorization", "Bearer nope"),)),
                (good, auth),
            ]))
        finally:
            await server.stop(None)

    bad_bytes, no_token, wrong_token, ok = asyncio.run(main())
    assert bad_bytes[0] == grpc.StatusCode.INVALID_ARGUMENT and "not a valid cleave.v1.InfoRequest" in bad_bytes[1]
    assert no_token[0] == wrong_token[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "CLEAVE_INTERNAL_TOKEN" in no_token[1]
    assert ok == (grpc.StatusCode.OK, "")
    assert not [r for r in caplog.records if r.exc_info]  # one line of log, no traceback


# ---- request state: Redis off the request path ---------------------------------------------------

def test_request_state_waits_for_redis_and_ends_terminal(redis_url):
    """While Redis is unreachable, updates return at once and are kept; once it answers, the
    latest state is written, with a TTL; a late non-terminal state never overwrites a terminal one."""
    import redis.asyncio as aioredis

    from engine.parallel import free_port
    from router.state import RequestStore

    async def main():
        dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True,
                                 socket_connect_timeout=0.2)
        store = RequestStore(dead, "cleave:", ttl_s=60, live_ttl_s=900, write_timeout_s=0.5)
        t0 = time.perf_counter()
        store.update("r1", state="queued", prompt_tokens=3)
        store.update("r1", state="decoding")
        store.update("r1", state="finished", completion_tokens=4)
        store.update("r1", state="decoding")       # late: ignored
        store.update("r2", state="prefilling")
        returned_in = time.perf_counter() - t0
        assert not await store.flush() and store.pending == 2
        live = aioredis.from_url(redis_url, decode_responses=True)
        store._client = live                        # Redis is back
        assert await store.flush() and store.pending == 0
        r1, r2 = await live.hgetall("cleave:req:r1"), await live.hgetall("cleave:req:r2")
        ttl1, ttl2 = await live.ttl("cleave:req:r1"), await live.ttl("cleave:req:r2")
        await live.aclose()
        await dead.aclose()
        return returned_in, r1, r2, ttl1, ttl2

    returned_in, r1, r2, ttl1, ttl2 = asyncio.run(main())
    assert r1 == {"state": "finished", "prompt_tokens": "3", "completion_tokens": "4"}
    assert r2 == {"state": "prefilling"}
    assert 0 < ttl1 <= 60 and 60 < ttl2 <= 900   # nothing without an expiry, even mid-flight
    assert returned_in < 5.0                     # sanity only: no call waited on the dead Redis


# ---- decode reservations: bounded per caller and in lifetime ------------------------------------

def test_reservations_are_bounded_per_caller_and_in_lifetime():
    import functools

    from common.errors import Exhausted
    from common.flags import replace
    from engine.runtime.fake import FakeExecutor
    from services.config import WorkerConfig
    from services.decode import DecodeService
    from services.worker import WorkerHost

    cfg = replace(WorkerConfig(pool="decode"), block_size=4, num_blocks=100, transport="tcp",
                  max_reservations_per_caller=2, max_reservation_s=60)
    host = WorkerHost(cfg, make=functools.partial(FakeExecutor, model_config=MODEL))
    service = DecodeService(host)
    far = time.time() + 10_000

    def reserve(caller):
        return service._reserve(worker_pb2.ReserveRequest(request_id="r", num_prompt_tokens=4, max_tokens=4,
                                                          deadline_unix=far), caller)

    first = reserve("host:ipv4:10.0.0.1")
    assert first.deadline_unix <= time.time() + 60           # capped, not the far deadline asked for
    reserve("host:ipv4:10.0.0.1")
    with pytest.raises(Exhausted, match="already holds 2 reservations .* per-caller limit is 2"):
        reserve("host:ipv4:10.0.0.1")
    reserve("host:ipv4:10.0.0.2")                             # another caller is not affected
    for _ in range(5):                                        # nor a router on the same host: its own
        reserve("router-a")                                   # budget scales with the KV (99 blocks)
    assert service.caller_limit("router-a") == host.blocks.total
    service._release(first.transfer_id)
    reserve("host:ipv4:10.0.0.1")                             # room again once one is gone
    host.executor.close()
