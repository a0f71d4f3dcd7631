"""The capacity planner's formulas against hand-computed cases, the published memory arithmetic,
and the ``cleave plan`` interface (JSON shape, Helm values). Pure Python: no torch, no processes."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from services.capacity.cost import CostOptions, Layout, decode_step_time, kv_heads_per_rank, prefill_time
from services.capacity.memory import memory_per_gpu
from services.capacity.hardware import BUILTIN as GPUS, Hardware, get_hardware
from services.capacity.models import BUILTIN as MODELS, get_model, model_spec
from services.cli import main
from tests.conftest import run_plan

pytestmark = pytest.mark.unit

# one layer, round numbers: q/k/v/o 1024x1024 each, MLP 3 x 1024x4096, vocab 1000
ONE = model_spec("one", hidden_size=1024, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=128,
                 intermediate_size=4096, vocab_size=1000)
# an ideal device: 1 TFLOP/s, 100 GB/s, 10 GB/s links with 1 us latency, no overheads
IDEAL = Hardware(name="ideal", memory_bytes=80e9, flops={"bf16": 1e12}, mem_bw=1e11, link_bw=1e10,
                 link_latency_s=1e-6, nic_bw=1e9, nic_latency_s=1e-5, gpus_per_node=8, flops_eff=1.0,
                 mem_eff=1.0, link_eff=1.0, layer_overhead_s=0.0)
BF16 = CostOptions(weight_dtype="bf16", kv_dtype="bf16")


def test_parameter_counts_match_the_published_sizes():
    assert MODELS["llama-3.1-8b"].total_params() == pytest.approx(8.03e9, rel=0.01)
    assert MODELS["llama-3.1-70b"].total_params() == pytest.approx(70.6e9, rel=0.01)
    assert MODELS["llama-3.1-405b"].total_params() == pytest.approx(405.9e9, rel=0.01)
    assert MODELS["mixtral-8x7b"].total_params() == pytest.approx(46.7e9, rel=0.01)
    assert MODELS["mixtral-8x7b"].active_params() == pytest.approx(12.9e9, rel=0.02)
    assert MODELS["qwen3-30b-a3b"].total_params() == pytest.approx(30.5e9, rel=0.01)
    assert MODELS["qwen3-30b-a3b"].active_params() == pytest.approx(3.3e9, rel=0.05)


def test_one_layer_prefill_flops_and_bytes_by_hand():
    t = prefill_time(ONE, IDEAL, Layout(), BF16, batch=1, prompt=128)
    params = 4 * 1024 * 1024 + 3 * 1024 * 4096                 # 16,777,216
    attn = 4 * 128 * (129 / 2) * 8 * 128                          # causal: (T+1)/2 keys per query
    head = 2 * 1 * 1024 * 1000                                    # the last token's logits
    assert t.flops == pytest.approx(2 * 128 * params + attn + head)
    weights = params * 2
    kv = 128 * 2 * 8 * 128 * 2                                    # K and V of 128 tokens written
    act = 2 * 128 * (8 * 1024 + 2 * (8 + 16) * 128 + 3 * 4096)
    assert t.bytes == pytest.approx(weights + kv + act)
    compute = (2 * 128 * params + attn) / 1e12
    assert compute > (weights + kv + act) / 1e11                  # 128 tokens: compute bound here
    head_s = max(head / 1e12, 1000 * 1024 * 2 / 1e11)
    assert t.total_s == pytest.approx(compute + head_s)
    assert t.comm_s == 0 and t.pp_bubble_s == 0


def test_one_layer_decode_is_memory_bound_and_reads_the_kv():
    t = decode_step_time(ONE, IDEAL, Layout(), BF16, batch=4, context=1000)
    params = 4 * 1024 * 1024 + 3 * 1024 * 4096
    kv_read = 4 * 1000 * 2 * 8 * 128 * 2
    act = 2 * 4 * (8 * 1024 + 2 * 24 * 128 + 3 * 4096)
    assert t.bytes == pytest.approx(params * 2 + kv_read + act)
    assert t.memory_s == pytest.approx((params * 2 + kv_read + act) / 1e11)


def test_tp_adds_two_all_reduces_per_dense_layer():
    t = prefill_time(ONE, IDEAL, Layout(tp=2), BF16, batch=1, prompt=128)
    assert t.tp_s == pytest.approx(2 * IDEAL.comm_time("all_reduce", 128 * 1024 * 2, 2))


def test_ep_dispatch_and_combine_scale_with_imbalance():
    moe = model_spec("moe1", hidden_size=1024, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=128,
                     intermediate_size=2048, vocab_size=1000, num_experts=8, num_experts_per_tok=2)
    for imb in (1.0, 1.5):
        opt = CostOptions(expert_imbalance=imb)
        t = prefill_time(moe, IDEAL, Layout(ep=4), opt, batch=1, prompt=64)
        per_rank = 64 * 2 / 4 * 1024 * 2 * imb
        assert t.ep_s == pytest.approx(2 * IDEAL.comm_time("all_to_all", per_rank, 4))
        assert t.tp_s == 0
    ar = prefill_time(moe, IDEAL, Layout(ep=4), CostOptions(ep_exchange="all_reduce"), 1, 64)
    assert ar.ep_s == pytest.approx(IDEAL.comm_time("all_reduce", 64 * 1024 * 2, 4))


def test_pp_sends_and_bubble():
    two = model_spec("two", hidden_size=1024, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=128,
                     intermediate_size=4096, vocab_size=1000)
    one_mb = prefill_time(two, IDEAL, Layout(pp=2), CostOptions(micro_batches=1), batch=4, prompt=128)
    four_mb = prefill_time(two, IDEAL, Layout(pp=2), CostOptions(micro_batches=4), batch=4, prompt=128)
    # one micro-batch: the stages run in turn, the bubble is one stage time
    stage = one_mb.compute_s + one_mb.memory_s + one_mb.overhead_s
    assert one_mb.pp_bubble_s == pytest.approx(stage)
    assert one_mb.pp_send_s == pytest.approx(2 * IDEAL.comm_time("send_recv", 512 * 1024 * 2, 2))  # hidden, residual
    # four micro-batches: (m + pp - 1) stage times of a quarter batch, a bubble of one of them
    assert four_mb.pp_bubble_s == pytest.approx((four_mb.compute_s + four_mb.memory_s) / 4)
    assert four_mb.total_s < one_mb.total_s


def test_cp_ring_is_hidden_behind_compute_unless_the_link_is_slow():
    fast = prefill_time(ONE, IDEAL, Layout(cp=2), BF16, batch=1, prompt=8192)
    assert fast.cp_s == 0
    slow_link = Hardware(**{**IDEAL.to_json(), "link_bw": 1e6})
    slow = prefill_time(ONE, slow_link, Layout(cp=2), BF16, batch=1, prompt=8192)
    block = 4096 * 2 * 8 * 128 * 2
    attn = 4 * 4096 * 4096.5 * 8 * 128 / 1e12
    assert slow.cp_s == pytest.approx(slow_link.comm_time("send_recv", block, 2) - attn / 2)


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    llama = MODELS["llama-3.1-70b"]
    assert [kv_heads_per_rank(llama, t) for t in (1, 2, 8, 16, 64)] == [8, 4, 1, 1, 1]
    m16 = memory_per_gpu(llama, GPUS["h100"], Layout(tp=16), BF16, cached_tokens=1, pass_tokens=0)
    assert m16.kv_per_token == 2 * 80 * 1 * 128 * 2                # one whole head, not half of one
    assert Layout(tp=3).problem(llama) is not None                    # 64 heads
    assert Layout(tp=16).problem(llama) is None                       # 16 = 2 x 8 KV heads


def test_405b_fp8_weights_and_kv_room_under_pp2_and_pp4_on_256gb():
    """Hand arithmetic: a layer is 570,425,344 (attention) + 2,617,245,696 (MLP) + 32,768 (norms)
    parameters; the embedding and the LM head 128,256 x 16,384 each; FP8 = 1 byte."""
    llama, mi325x = MODELS["llama-3.1-405b"], GPUS["mi325x"]
    fp8 = CostOptions(weight_dtype="fp8", kv_dtype="fp8", reserve=0.1)
    layer, emb = 570_425_344 + 2_617_245_696 + 32_768, 128_256 * 16_384
    m2 = memory_per_gpu(llama, mi325x, Layout(pp=2), fp8, cached_tokens=0, pass_tokens=0)
    assert m2.weights == pytest.approx(63 * layer + emb + 16_384)   # last stage: 63 layers + LM head + norm
    assert m2.weights / 1e9 == pytest.approx(202.93, abs=0.01)
    assert m2.kv_per_token == 2 * 63 * 8 * 128                        # 129,024 bytes per token
    assert m2.kv_room_tokens == int((256e9 - 25.6e9 - m2.weights) // 129_024)   # ~213 k tokens
    assert 212_000 < m2.kv_room_tokens < 214_000
    m4 = memory_per_gpu(llama, mi325x, Layout(pp=4), fp8, cached_tokens=0, pass_tokens=0)
    assert m4.weights == pytest.approx(32 * layer + emb)              # stage 0: 32 of 126 layers + embedding
    assert m4.kv_per_token == 2 * 32 * 8 * 128
    assert m4.kv_room_tokens == int((256e9 - 25.6e9 - m4.weights) // 65_536)    # ~1.92 M tokens
    # the whole model does not fit one 256 GB GPU; PP2 leaves ~27 GB of KV room per GPU
    assert not memory_per_gpu(llama, mi325x, Layout(), fp8, 0, 0).fits
    assert m2.fits and m4.fits


def test_models_and_hardware_resolve_and_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        get_hardware("tpu")
    with pytest.raises(ValueError, match="run `cleave plan --calibrate` first"):
        get_hardware("local", str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="neither a built-in"):
        get_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144}))
    spec = get_model(str(tmp_path))
    assert spec.total_params() == MODELS["qwen3-30b-a3b"].total_params()
    for hw in GPUS.values():
        assert hw.source and hw.memory_bytes > 0


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_a_plan_reads_a_config_json_into_the_engines_model_config(tmp_path, model_type):
    """One model shape: ``cleave plan``'s model is the ModelConfig the engine reads from the same
    ``config.json`` (plus a name), so both count the same KV bytes per token in every format."""
    from dataclasses import asdict, fields

    from common.model import TORCH_DTYPES, ModelConfig
    from engine.hf_loader import config_from_dir
    moe = {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else {}
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": model_type, "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 1000, "intermediate_size": 1024, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": True, **moe}))
    plan, engine = get_model(str(tmp_path)), config_from_dir(str(tmp_path))
    assert isinstance(plan, ModelConfig) and plan.is_moe == bool(moe)
    assert {f.name: getattr(plan, f.name) for f in fields(ModelConfig)} == asdict(engine)
    for torch_name, name in TORCH_DTYPES.items():
        assert plan.kv_bytes_per_token(name) == engine.replace(dtype=torch_name).kv_bytes_per_token() \
            == 2 * 6 * 2 * 64 * {"fp32": 4, "bf16": 2, "fp16": 2}[name]


def test_json_shape_and_every_tp_pp_split_with_batch():
    code, out = run_plan("--model", "llama-3.1-70b", "--hardware", "h100", "--gpus", "16", "--prompt", "2048",
                     "--output", "256", "--batch", "8", "--ttft", "1", "--tpot", "0.05", "--format", "json")
    assert code == 0
    plan = json.loads(out)
    assert set(plan) >= {"candidates", "recommendation"}
    assert set(plan["recommendation"]) >= {"prefill", "decode"}
    keys = {"pool", "tp", "pp", "cp", "ep", "instances", "fits", "throughput_tok_s", "comm_share",
            "memory_per_gpu_bytes"}
    for c in plan["candidates"]:
        assert keys <= set(c) and c["pool"] in ("prefill", "decode") and isinstance(c["fits"], bool)
        assert ("ttft_s" in c) == (c["pool"] == "prefill") and ("tpot_s" in c) == (c["pool"] == "decode")
        assert c["instances"] == 1
    for pool in ("prefill", "decode"):
        splits = {(c["tp"], c["pp"]) for c in plan["candidates"] if c["pool"] == pool and c["cp"] == 1}
        want = {(tp, pp) for tp in (1, 2, 4, 8, 16) for pp in range(1, 17) if tp * pp <= 16}
        assert splits == want
    fits = {(c["tp"], c["pp"]): c["fits"] for c in plan["candidates"] if c["pool"] == "decode"}
    assert fits[1, 1] is False and fits[8, 1] is True               # 141 GB of weights
    rec = plan["recommendation"]["decode"]
    assert rec["fits"] and rec["runner_up"]["why_lost"]


def test_done_when_command_prints_tables_and_recommendation(tmp_path):
    values = tmp_path / "values.yaml"
    code, out = run_plan("--model", "llama-3.1-70b", "--hardware", "h100", "--gpus", "16", "--prompt", "2048",
                     "--output", "256", "--rate", "10", "--ttft", "1", "--tpot", "0.05",
                     "--helm-values", str(values))
    assert code == 0
    assert "prefill layouts (ranked)" in out and "decode layouts (ranked)" in out
    assert "recommendation" in out and "runner-up" in out
    chart = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "..", "helm", "cleave", "values.yaml")))
    written = yaml.safe_load(values.read_text())
    for pool in ("prefill", "decode"):
        assert set(written[pool]) <= set(chart[pool]), "only keys the chart has"
        assert set(written[pool]["layout"]) == set(chart[pool]["layout"])
        assert written[pool]["replicaCount"] >= 1
    assert written["gpu"]["enabled"] is True


def test_bad_input_is_one_clear_line(capsys):
    assert main(["plan", "--model", "llama-3.1-70b", "--hardware", "h100", "--gpus", "8"]) == 2
    assert "missing --prompt, --output" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-70b", "--hardware", "nope", "--gpus", "8", "--prompt", "1",
                 "--output", "1", "--batch", "1"]) == 2
    assert "unknown hardware" in capsys.readouterr().err


def test_local_profile_from_a_file_plans(tmp_path):
    prof = tmp_path / "local.json"
    local = Hardware(name="local", memory_bytes=4e9, flops={"fp32": 1e11}, mem_bw=1e10, link_bw=1e9,
                     link_latency_s=1e-4, nic_bw=1e9, nic_latency_s=1e-4, gpus_per_node=2, flops_eff=1.0,
                     mem_eff=1.0, link_eff=1.0, cores=2, act_bytes=4, ring_score_s=1e-8,
                     measured={"all_reduce": {2: [[1024, 1e-3], [1 << 20, 2e-3]]},
                               "send_recv": {2: [[1024, 1e-4], [1 << 20, 1e-3]]}})
    prof.write_text(json.dumps(local.to_json()))
    hw = get_hardware("local", str(prof))
    assert hw.comm_time("all_reduce", 1024, 2) == pytest.approx(1e-3)
    assert hw.comm_time("all_reduce", 1024, 4) == pytest.approx(1e-3 * (3 / 4) / (1 / 2))
    assert hw.oversubscription(4) == 2
    code, out = run_plan("--model", "smollm2-135m", "--hardware", "local", "--profile", str(prof), "--gpus", "4",
                     "--prompt", "128", "--output", "16", "--batch", "8", "--weight-dtype", "fp32", "--format", "json")
    assert code == 0 and json.loads(out)["recommendation"]["decode"]["tp"] in (1, 3)


def test_plan_json_separates_per_token_latency_from_throughput():
    code, out = run_plan("--model", "llama-3.1-405b", "--hardware", "mi355x", "--gpus", "8", "--prompt", "9400",
                     "--output", "680", "--batch", "256", "--weight-dtype", "int4", "--format", "json")
    assert code == 0
    dec = {c["layout"]: c for c in json.loads(out)["candidates"] if c["pool"] == "decode"}
    tp4, pp2 = dec["TP4"], dec["TP4xPP2"]
    assert (tp4["sequences"], tp4["micro_batches"]) == (256, 1)
    assert (pp2["sequences"], pp2["micro_batches"]) == (512, 2)
    assert pp2["tpot_s"] >= tp4["tpot_s"] > dec["TP8"]["tpot_s"]
    assert pp2["throughput_tok_s"] == pytest.approx(512 / pp2["tpot_s"])
    assert tp4["tp_algorithm"] in ("ring", "one_shot")
