"""Router pieces without a server: input validation, incremental detokenization with stop
strings, the least-load policy, service config validation and worker records."""
from __future__ import annotations

import json
import math

import pytest

from cleave.v1 import inference_pb2 as pb
from common.config import RouterConfig
from common.errors import InvalidRequest
from common.flags import replace
from common.layout import ParallelConfig
from common.model import ModelConfig
from common.registry import WorkerRecord
from router.policy import LeastLoadPolicy, make_policy
from router.text import IncrementalText, TextCodec
from router.validate import check_sampling, prompt_ids_of, request_id_of, seed_of
from router.workers import WorkerHandle
from services.config import WorkerConfig
from tests.models import EOS_ID, write_byte_tokenizer

pytestmark = pytest.mark.unit

MODEL = ModelConfig(architecture="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0,
                    rms_norm_eps=1e-5, max_position=64, tie_word_embeddings=False)


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    write_byte_tokenizer(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> TextCodec:
    return TextCodec(_load_tokenizer(tmp_path_factory.mktemp("byte-tok")))


# ---- router/validate.py ----------------------------------------------------------------------

def test_a_request_without_an_id_gets_a_fresh_one():
    """Given ids are checked in tests/router/test_request_faults.py (the alphabet, both ways)."""
    made = request_id_of(pb.GenerateRequest())
    assert len(made) == 32 and made != request_id_of(pb.GenerateRequest())


def test_prompt_and_token_ids(codec):
    assert prompt_ids_of(pb.GenerateRequest(prompt="hi"), codec, MODEL) == [104, 105]
    assert prompt_ids_of(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 299])), codec, MODEL) == [1, 299]
    cases = [
        (pb.GenerateRequest(), "no input"),
        (pb.GenerateRequest(prompt="  \n"), "prompt is empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "token_ids is empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 300, 301, 300])),
         r"token_ids \[300, 301\] are outside the vocabulary: ids must be < 300"),
    ]
    for request, match in cases:
        with pytest.raises(InvalidRequest, match=match):
            prompt_ids_of(request, codec, MODEL)


def _chat(*messages):
    return pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]))


def test_chat(codec, tmp_path):
    ids = prompt_ids_of(_chat(("system", "be brief"), ("user", "hi")), codec, MODEL)
    assert codec.decode(ids) == "system\nbe brief\nuser\nhi\nassistant\n"   # special tokens skipped
    assert ids[0] == 257 and ids.count(258) == 2   # <|im_start|> first, one <|im_end|> per message
    for request, match in [
        (_chat(), "chat has no messages"),
        (_chat(("user", "hi"), ("robot", "x")), "chat message 1 has unknown role 'robot'"),
        (_chat(("user", " "), ("assistant", "")), "every chat message is empty"),
    ]:
        with pytest.raises(InvalidRequest, match=match):
            prompt_ids_of(request, codec, MODEL)
    plain = _load_tokenizer(tmp_path)
    plain.chat_template = None
    with pytest.raises(InvalidRequest, match="no chat template"):
        prompt_ids_of(_chat(("user", "hi")), TextCodec(plain), MODEL)


@pytest.mark.parametrize("kwargs,prompt_len,match", [
    (dict(max_tokens=0), 1, "sampling.max_tokens must be >= 1"),
    (dict(max_tokens=64), 1, "sampling.max_tokens=64 is above the model's limit.*64 tokens"),
    (dict(max_tokens=10), 60, r"prompt \(60 tokens\) \+ max_tokens \(10\) = 70 exceeds the context length 64.*to 4"),
    (dict(max_tokens=4, temperature=-0.5), 1, "sampling.temperature must be a finite number >= 0, got -0.5"),
    (dict(max_tokens=4, temperature=math.inf), 1, "sampling.temperature .* got inf"),
    (dict(max_tokens=4, temperature=math.nan), 1, "sampling.temperature .* got nan"),
    (dict(max_tokens=4, top_p=1.5), 1, r"sampling.top_p must be in \[0, 1\].*got 1.5"),
    (dict(max_tokens=4, top_p=math.nan), 1, "sampling.top_p .* got nan"),
    (dict(max_tokens=4, stop=["ok", ""]), 1, "sampling.stop contains an empty string"),
    (dict(max_tokens=4, stop=["s"] * 17), 1, "sampling.stop allows at most 16 strings"),
    (dict(max_tokens=4, stop=["s" * 257]), 1, "at most 256 characters"),
])
def test_check_sampling_rejects(kwargs, prompt_len, match):
    with pytest.raises(InvalidRequest, match=match):
        check_sampling(pb.SamplingParams(**kwargs), prompt_len, MODEL)


def test_check_sampling_accepts_limits():
    check_sampling(pb.SamplingParams(max_tokens=4, temperature=0.0, top_p=0.0), 60, MODEL)
    check_sampling(pb.SamplingParams(max_tokens=63, top_p=1.0, stop=["s"] * 16), 1, MODEL)
    check_sampling(pb.SamplingParams(max_tokens=1, stop=["s" * 256]), 63, MODEL)


def test_seed_of():
    assert seed_of(pb.SamplingParams(seed=0)) == 0
    assert seed_of(pb.SamplingParams(seed=2 ** 64 - 1)) == 2 ** 64 - 1
    drawn = {seed_of(pb.SamplingParams()) for _ in range(8)}
    assert len(drawn) > 1 and all(0 <= s < 2 ** 63 for s in drawn)


# ---- router/text.py --------------------------------------------------------------------------

def _stream(codec, ids, stop=(), chunk=1, final=True):
    inc = IncrementalText(codec, stop)
    deltas = [inc.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    if final:
        deltas.append(inc.add([], final=True))
    return inc, deltas


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "a🙂b🎉 end", "ÿ€𝄞"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_multibyte_never_yields_replacement_char(codec, text, chunk):
    ids = codec.encode(text)
    assert len(ids) > len(text)  # some characters really are split across byte tokens
    inc, deltas = _stream(codec, ids, chunk=chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == codec.decode(ids) == text
    assert not inc.stopped


def test_special_tokens_produce_no_text(codec):
    ids = codec.encode("ok") + [EOS_ID]
    _, deltas = _stream(codec, ids)
    assert "".join(deltas) == "ok"


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_stop_string_spanning_tokens(codec, chunk):
    ids = codec.encode("Hello STOP world STOP again")
    inc, deltas = _stream(codec, ids, stop=["STOP"], chunk=chunk)
    assert "".join(deltas) == "Hello "
    assert inc.stopped and inc.emitted == "Hello "
    assert inc.add(codec.encode("more")) == "" and inc.add([], final=True) == ""


def test_earliest_of_several_stops_wins(codec):
    ids = codec.encode("one two three")
    inc, deltas = _stream(codec, ids, stop=["three", "wo"], chunk=1)
    assert "".join(deltas) == "one t" and inc.stopped


def test_multibyte_stop_string(codec):
    ids = codec.encode("價格是🙂五元")
    inc, deltas = _stream(codec, ids, stop=["🙂五"])
    assert "".join(deltas) == "價格是" and inc.stopped
    assert all("\ufffd" not in d for d in deltas)


def test_hold_back_released_at_final(codec):
    inc = IncrementalText(codec, ["XYZ"])
    out = inc.add(codec.encode("abcXY"))
    assert out == "abc"                     # the last len("XYZ") - 1 characters are held back
    assert inc.add(codec.encode("Q")) == "X"
    assert inc.add(codec.encode("XY")) == "YQ"
    assert inc.add([], final=True) == "XY"
    assert inc.emitted == "abcXYQXY" and not inc.stopped


def test_no_stop_means_no_hold_back(codec):
    inc = IncrementalText(codec)
    assert inc.add(codec.encode("ab")) == "ab"
    assert inc.add(codec.encode("c")) == "c"


# ---- router/policy.py ------------------------------------------------------------------------

def _handle(worker_id, pool="decode", free=100, running=0, waiting=0, queued=0, block_size=16,
            inflight=0, inflight_tokens=0) -> WorkerHandle:
    record = WorkerRecord(pool=pool, worker_id=worker_id, address=f"{worker_id}:1", incarnation="i",
                          layout={"tp": 1}, capacity={"total_blocks": 200, "block_size": block_size},
                          load={"free_blocks": free, "running": running, "waiting": waiting,
                                "queued_tokens": queued})
    return WorkerHandle(record, channel=None, stub=None, inflight=inflight, inflight_tokens=inflight_tokens)


def _ids(handles):
    return [h.record.worker_id for h in handles]


def test_rank_decode_filters_by_room_then_least_load():
    policy = LeastLoadPolicy()
    workers = [
        _handle("full", free=1),                          # 2 blocks needed for 17 tokens
        _handle("busy", free=50, running=5),
        _handle("idle-small", free=10),
        _handle("idle-big", free=40),
        _handle("inflight", free=50, inflight=1),         # one request on its way
        _handle("reserved", free=3, inflight_tokens=32),  # 3 - 2 blocks already promised
    ]
    assert _ids(policy.rank_decode(workers, 17)) == ["idle-big", "idle-small", "inflight", "busy"]
    # exactly enough room counts; block size comes from the worker's capacity
    assert _ids(policy.rank_decode([_handle("exact", free=2)], 32)) == ["exact"]
    assert _ids(policy.rank_decode([_handle("exact", free=2)], 33)) == []
    assert _ids(policy.rank_decode([_handle("big-blocks", free=1, block_size=64)], 64)) == ["big-blocks"]
    # ties broken by worker id, deterministically
    assert _ids(policy.rank_decode([_handle("b"), _handle("a")], 1)) == ["a", "b"]


# the in-flight counting that spreads a burst over equal decode workers is tested on real
# workers in tests/router/test_fake_workers.py (test_a_burst_spreads_over_equal_decode_workers)


def test_rank_prefill_least_queued_tokens():
    policy = make_policy("least-load")
    workers = [_handle("p1", pool="prefill", queued=100), _handle("p2", pool="prefill", queued=10),
               _handle("p3", pool="prefill", queued=10, inflight_tokens=95),
               _handle("p4", pool="prefill", queued=10, inflight=1)]
    assert _ids(policy.rank_prefill(workers, 8)) == ["p2", "p4", "p1", "p3"]
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random")


# ---- common/config.py, services/config.py ------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(pool="both"), r"pool must be one of \('prefill', 'decode'\), got 'both'"),
    (dict(port=70000), "port must be in 0..65535.*got 70000"),
    (dict(port=-1), "got -1"),
    (dict(key_prefix="cleave"), "must be non-empty and end with ':', got 'cleave'"),
    (dict(key_prefix=""), "got ''"),
    (dict(transport="rdma"), r"transport must be one of \('ucx', 'tcp', 'fake'\), got 'rdma'"),
    (dict(max_batch=0), "max_batch must be >= 1, got 0"),
    (dict(threads=-2), "threads must be >= 0, got -2"),
    (dict(heartbeat_s=5.0, ttl_s=5.0), "need 0 < heartbeat_s < ttl_s, got heartbeat_s=5.0 ttl_s=5.0"),
    (dict(heartbeat_s=0.0), "heartbeat_s=0.0"),
    (dict(heartbeat_s=float("nan")), "heartbeat_s=nan"),
    (dict(drain_timeout_s=float("nan")), "drain_timeout_s must be >= 0, got nan"),
    (dict(max_reservation_s=float("inf")), "need 0 < max_reservation_s < inf"),
    (dict(max_reservations_per_caller=0), "max_reservations_per_caller >= 1"),
    (dict(parallel=ParallelConfig(cp=2)), "decode instance is laid out tp x pp x ep; got cp=2"),
    (dict(pool="prefill", parallel=ParallelConfig(pp=2)), "prefill instance is laid out tp x cp; got pp=2"),
])
def test_worker_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):   # by flat names: runtime fields are its RuntimeConfig's
        replace(WorkerConfig(pool="decode"), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(port=65536), "got 65536"),
    (dict(key_prefix="x"), "got 'x'"),
    (dict(redis_url=""), "needs a Redis URL"),
    (dict(request_timeout_s=-1.0), r"request_timeout_s must be a finite number >= 0 \(0 = none\), got -1.0"),
    (dict(request_timeout_s=float("nan")), "request_timeout_s must be a finite number >= 0 .* got nan"),
    (dict(request_timeout_s=float("inf")), "request_timeout_s must be a finite number >= 0 .* got inf"),
    (dict(transfer_timeout_s=-1.0), "transfer_timeout_s must be a finite number > 0, got -1.0"),
    (dict(discovery_s=0.0), "discovery_s must be a finite number > 0, got 0.0"),
    (dict(admission_wait_s=-1.0), "got -1.0 and 256"),
    (dict(admission_wait_s=float("nan")), "got nan and 256"),
    (dict(max_queued=-3), "got 10.0 and -3"),
    (dict(max_attempts=0), "max_attempts must be >= 1, got 0"),
])
def test_router_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


def test_configs_defaults_are_valid():
    WorkerConfig(pool="prefill")
    replace(WorkerConfig(pool="decode"), port=65535, transport="fake", threads=0)
    RouterConfig(port=0, admission_wait_s=0, max_queued=0)
    with pytest.raises(ValueError, match="tp must be >= 1, got 0"):
        ParallelConfig(tp=0)


# ---- common/registry.py --------------------------------------------------------------------

def test_worker_record_hash_round_trip():
    record = WorkerRecord(pool="decode", worker_id="decode-1", address="10.0.0.1:5000", incarnation="abc",
                          layout={"tp": 2, "pp": 1, "cp": 1, "ep": 1},
                          capacity={"total_blocks": 512, "block_size": 16},
                          load={"free_blocks": 300, "running": 4, "waiting": 0, "queued_tokens": 0},
                          model_id="tiny", compat_hash="deadbeef")
    flat = record.to_hash()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())  # Redis HSET values
    assert json.loads(flat["load"])["free_blocks"] == 300
    assert WorkerRecord.from_hash(flat) == record
    # optional fields may be missing from an older worker's hash
    minimal = {k: flat[k] for k in ("pool", "worker_id", "address", "incarnation")}
    old = WorkerRecord.from_hash(minimal)
    assert (old.layout, old.capacity, old.load, old.model_id, old.compat_hash) == ({}, {}, {}, "", "")
    with pytest.raises(KeyError):
        WorkerRecord.from_hash({"pool": "decode"})


def test_serve_layout_flags_are_validated_against_the_model(tmp_path):
    from services.cli import _parser, check_layouts, pool_layouts
    from tests.models import make_tiny_llama

    make_tiny_llama(str(tmp_path), seed=0)  # 8 heads, 4 KV heads, 4 layers
    args = _parser().parse_args(["serve", "--prefill-tp", "3"])
    with pytest.raises(ValueError, match=r"prefill layout: tp=3 does not divide the 8 attention heads"):
        check_layouts(str(tmp_path), [("prefill", pool_layouts(args)[0])])
    args = _parser().parse_args(["serve", "--decode-pp", "5"])
    with pytest.raises(ValueError, match=r"decode layout: pp=5 stages is more than the model's 4 layers"):
        check_layouts(str(tmp_path), [("decode", pool_layouts(args)[1])])
    args = _parser().parse_args(["serve", "--decode-ep", "2"])
    with pytest.raises(ValueError, match=r"ep=2 needs a mixture-of-experts model"):
        check_layouts(str(tmp_path), [("decode", pool_layouts(args)[1])])
    args = _parser().parse_args(["serve", "--prefill-tp", "2", "--prefill-cp", "2", "--decode-tp", "4"])
    prefill, decode = pool_layouts(args)
    check_layouts(str(tmp_path), [("prefill", prefill), ("decode", decode)])  # valid: no error
    assert (prefill.world_size, decode.world_size) == (4, 4)


def test_kv_aware_prefill_weighs_uncached_tokens_against_the_queue():
    policy = make_policy("kv-aware")
    workers = [_handle("cold", pool="prefill", queued=0), _handle("warm", pool="prefill", queued=300),
               _handle("hot", pool="prefill", queued=600)]
    # 1000-token prompt: warm computes 200 + 300 queued = 500, cold 1000, hot 100 + 600 = 700
    assert _ids(policy.rank_prefill(workers, 1000, {"warm": 800, "hot": 900})) == ["warm", "hot", "cold"]
    assert _ids(policy.rank_prefill(workers, 1000)) == ["cold", "warm", "hot"]      # blind: the queue


def test_kv_aware_decode_prefers_the_instance_holding_the_prefix_until_it_is_busy():
    policy = make_policy("kv-aware")
    warm = _handle("warm", free=100, running=3)
    cold = _handle("cold", free=100)
    # 500-token history on warm: receiving 20 tokens + 3 sequences x 64 beats receiving 520
    assert _ids(policy.rank_decode([cold, warm], 520, {"warm": 500})) == ["warm", "cold"]
    busy = _handle("warm", free=100, running=9)       # 20 + 9 x 64 = 596 > 520
    assert _ids(policy.rank_decode([cold, busy], 520, {"warm": 500})) == ["cold", "warm"]
    # room counts only the blocks the instance lacks: 2 free blocks hold 32 uncached tokens
    tight = _handle("tight", free=2)
    assert _ids(policy.rank_decode([tight], 520, {"tight": 496})) == ["tight"]
    assert _ids(policy.rank_decode([tight], 520, {"tight": 480})) == []
    assert _ids(make_policy("least-load").rank_decode([tight], 520, {"tight": 496})) == []


def test_every_routing_policy_flag_value_has_a_policy():
    from common.config import ROUTING_POLICIES, RouterConfig
    from router.policy import DEFAULT_POLICY, POLICIES
    assert set(ROUTING_POLICIES) == set(POLICIES) and RouterConfig().routing_policy == DEFAULT_POLICY
    with pytest.raises(ValueError, match="routing_policy must be one of"):
        RouterConfig(routing_policy="random")
