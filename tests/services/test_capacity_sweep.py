"""``cleave plan sweep``: curves over one dimension, the returns marks computed by hand, custom
hardware files (validated, with units) and ``--link-bw``. Pure Python."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from services.capacity.cost import Layout
from services.capacity.hardware import BUILTIN as GPUS
from services.capacity.hardware_file import load_hardware_file, profile_from_dict
from services.capacity.models import BUILTIN as MODELS
from services.capacity.sweep import SweepRequest, mark_returns, sweep
from services.cli import main
from tests.conftest import run_plan

pytestmark = pytest.mark.unit

L70 = MODELS["llama-3.1-70b"]


def test_marks_by_hand():
    pts = [{"value": v, "ttft_s": t, "decode_tok_s": d, "marks": {}, "elasticity": {}}
           for v, t, d in ((1, 1.0, 100), (2, 0.5, 300), (4, 0.4, 200), (8, 0.38, 190))]
    summary = mark_returns(pts, ("ttft", "decode_tok_s"), 0.5)
    assert pts[1]["elasticity"]["ttft"] == pytest.approx(1.0) and pts[1]["marks"] == {}
    assert pts[2]["elasticity"]["ttft"] == pytest.approx(math.log(1.25) / math.log(2))     # 0.32
    assert pts[2]["marks"] == {"ttft": "diminishing", "decode_tok_s": "negative"}
    assert pts[3]["elasticity"]["decode_tok_s"] == pytest.approx(math.log(0.95) / math.log(2))
    assert summary == {"ttft": {"diminishing_from": 4, "negative_at": []},
                       "decode_tok_s": {"diminishing_from": 4, "negative_at": [4, 8]}}


def test_tp_sweep_finds_negative_returns_on_a_mesh_node_only():
    mesh = GPUS["mi355x"]
    req = SweepRequest(model=L70, hardware=mesh, vary="tp", values=(1, 2, 4, 8, 16), prompt=8192, output=256)
    on_mesh = sweep(req)
    on_switch = sweep(replace(req, hardware=replace(mesh, topology="switch")))
    assert on_mesh["returns"]["ttft"]["negative_at"] == [2, 16]   # one link for TP2; the NIC for TP16
    assert on_switch["returns"]["ttft"]["negative_at"] == [16]
    two = on_mesh["points"][1]
    assert two["marks"]["ttft"] == "negative" and two["prefill_comm_share"] > 0.4
    assert two["prefill_tp_algorithm"] == "one_shot" and on_mesh["points"][3]["prefill_tp_algorithm"] == "ring"
    # TPOT at batch 1 keeps falling inside the node; tok/s is at each layout's largest fitting batch
    tpots = [p["tpot_s"] for p in on_mesh["points"][:4]]
    assert tpots == sorted(tpots, reverse=True)
    assert [p["capacity_batch"] for p in on_mesh["points"][:4]] == [32, 128, 256, 512]


def test_pp_sweep_trades_latency_for_throughput():
    req = SweepRequest(model=L70, hardware=GPUS["h100"], vary="pp", values=(1, 2, 4), prompt=2048, output=256,
                       base=Layout(tp=4))
    pts = sweep(req)["points"]
    assert pts[0]["tpot_s"] <= pts[1]["tpot_s"] <= pts[2]["tpot_s"]
    assert pts[0]["decode_tok_s"] < pts[1]["decode_tok_s"] < pts[2]["decode_tok_s"]
    assert pts[1]["sequences"] == 2 * pts[1]["capacity_batch"]
    assert pts[1]["marks"]["tpot"] == "negative" and "decode_tok_s" not in pts[1]["marks"]


def test_link_bw_batch_and_prompt_sweeps():
    link = sweep(SweepRequest(model=L70, hardware=GPUS["mi300x"], vary="link-bw", values=(32, 64, 128), prompt=8192,
                              output=256, base=Layout(tp=2)))["points"]
    assert link[0]["ttft_s"] > link[1]["ttft_s"] > link[2]["ttft_s"]
    assert link[0]["prefill_comm_share"] > link[2]["prefill_comm_share"]
    batch = sweep(SweepRequest(model=L70, hardware=GPUS["h100"], vary="batch", values=(1, 8, 64, 512), prompt=2048,
                               output=256, base=Layout(tp=4)))["points"]
    assert batch[1]["decode_tok_s"] > batch[0]["decode_tok_s"] and batch[3]["fits"] is False
    assert batch[3]["decode_tok_s"] == 0 and batch[3]["goodput_tok_s_per_gpu"] == 0
    prompt = sweep(SweepRequest(model=L70, hardware=GPUS["h100"], vary="prompt", values=(128, 1024, 65536),
                                prompt=1, output=1, base=Layout(tp=8)))
    assert prompt["returns"]["prefill_tok_s"]["negative_at"] == [65536]     # attention grows as prompt^2
    with pytest.raises(ValueError, match=r"sweep values must increase, got \[2, 1\]"):
        SweepRequest(model=L70, hardware=GPUS["h100"], vary="tp", values=(2, 1), prompt=1, output=1)
    with pytest.raises(ValueError, match="--vary must be one of tp, pp, link-bw, batch, prompt, got 'cp'"):
        SweepRequest(model=L70, hardware=GPUS["h100"], vary="cp", values=(1, 2), prompt=1, output=1)


def test_sweep_cli_table_and_json():
    code, out = run_plan("sweep", "--model", "llama-3.1-8b", "--hardware", "mi300x", "--vary", "tp", "--values", "1,2,4,8",
                     "--prompt", "8192", "--output", "128")
    assert code == 0 and "TTFT negative" in out and "TTFT: diminishing from tp=2; negative at tp=2" in out
    code, out = run_plan("sweep", "--model", "llama-3.1-8b", "--hardware", "mi300x", "--vary", "tp", "--values", "1,2,4,8",
                     "--prompt", "8192", "--output", "128", "--format", "json", "--link-bw", "448")
    data = json.loads(out)
    assert data["inputs"]["link_bw"] == 448e9 and data["returns"]["ttft"]["negative_at"] == []
    assert {"ttft_s", "tpot_s", "decode_tok_s_per_gpu", "goodput_tok_s_per_gpu", "prefill_comm_share",
            "decode_comm_share", "marks"} <= set(data["points"][0])


def test_hardware_file_with_units_and_clear_errors(tmp_path, capsys):
    f = tmp_path / "fast.yaml"
    f.write_text("base: mi300x\nname: mi300x-2x\nlink_gb_s: 128\n")
    fast = load_hardware_file(str(f))
    assert fast.link_bw == 128e9 and fast.links_per_gpu == 7 and fast.memory_bytes == GPUS["mi300x"].memory_bytes
    whole = profile_from_dict({"name": "n", "memory_gb": 96, "tflops": {"bf16": 500}, "hbm_tb_s": 3,
                               "gpus_per_node": 4, "topology": "mesh", "link_gb_s": 50, "nic_gb_s": 25,
                               "link_latency_us": 3})
    assert (whole.memory_bytes, whole.flops, whole.mem_bw, whole.links_per_gpu, whole.link_latency_s) == \
        (96e9, {"bf16": 500e12}, 3e12, 3, pytest.approx(3e-6))
    for data, msg in (({"base": "mi300x", "link_bw": 1}, r"unknown key\(s\) \['link_bw'\]"),
                      ({"base": "mi300x", "link_gb_s": "fast"}, r"link_gb_s must be a number, got 'fast'"),
                      ({"base": "mi300x", "link_gb_s": -5}, r"link_gb_s must be positive, got -5"),
                      ({"base": "tpu"}, r"base 'tpu' is not a built-in"),
                      ({"base": "mi300x", "links_per_gpu": 3}, r"needs a link to each of 7 peers, got links_per_gpu=3"),
                      ({"name": "n", "memory_gb": 1}, r"missing tflops, hbm_tb_s, gpus_per_node, topology"),
                      ({"base": "h100", "tflops": {"bf16": 0}}, r"tflops.bf16 must be positive, got 0"),
                      ([1, 2], r"expected a mapping")):
        with pytest.raises(ValueError, match=msg):
            profile_from_dict(data, "f.yaml")
    code, out = run_plan("--model", "llama-3.1-70b", "--hardware-file", str(f), "--gpus", "8", "--prompt", "2048",
                     "--output", "128", "--batch", "1", "--format", "json")
    ref = run_plan("--model", "llama-3.1-70b", "--hardware", "mi300x", "--link-bw", "128", "--gpus", "8", "--prompt",
               "2048", "--output", "128", "--batch", "1", "--format", "json")[1]
    assert code == 0 and json.loads(out)["candidates"] == json.loads(ref)["candidates"]
    assert main(["plan", "--model", "llama-3.1-70b", "--hardware", "h100", "--hardware-file", str(f), "--gpus", "8",
                 "--prompt", "1", "--output", "1", "--batch", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("link_gb_s: [\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_hardware_file(str(tmp_path / "bad.yaml"))
