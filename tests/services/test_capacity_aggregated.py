"""``cleave plan``'s aggregated-vs-disaggregated comparison (``services/capacity/aggregated.py``):
the per-step formulas against hand computations on a toy cost, the verdicts, the JSON section,
the table and the Helm values. Pure Python: no torch, no processes."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from services.capacity import aggregated
from services.capacity.aggregated import aggregated_candidates, point, prefill_per_request, verdict
from services.capacity.cost import CostOptions, Layout, chunk_prefill_time, prefill_time
from services.capacity.hardware import BUILTIN as GPUS
from services.capacity.models import BUILTIN as MODELS
from services.capacity.search import PlanRequest, layouts, plan
from tests.conftest import run_plan

pytestmark = pytest.mark.unit

H100, L8 = GPUS["h100"], MODELS["llama-3.1-8b"]
CHART = os.path.join(os.path.dirname(__file__), "..", "..", "helm", "cleave")


class _Cost:
    """A ``Breakdown`` stand-in: what ``aggregated`` reads of one."""

    def __init__(self, total_s: float, sequences: float = 1, micro_batches: int = 1):
        self.total_s, self.sequences, self.micro_batches = total_s, sequences, micro_batches


@pytest.fixture
def toy(monkeypatch):
    """A toy cost: a decode step of S sequences takes 10 ms + 0.1 ms x S; a chunk of t tokens
    after ctx earlier ones 10 us x t + 1 ns x t x ctx. Memory is the real 8B on an H100."""
    monkeypatch.setattr(aggregated, "decode_step_time",
                        lambda model, hw, lay, opt, batch, ctx: _Cost(0.010 + 0.0001 * batch, batch))
    monkeypatch.setattr(aggregated, "chunk_prefill_time",
                        lambda model, hw, lay, opt, tokens, ctx: _Cost(1e-5 * tokens + 1e-9 * tokens * ctx))


def _req(**kw) -> PlanRequest:
    base = dict(model=L8, hardware=H100, gpus=1, prompt=1000, output=100, rate=1.0)
    return PlanRequest(**{**base, **kw})


def _lays(req: PlanRequest) -> list[Layout]:
    return layouts(req.model, req.gpus, "decode")


def test_a_chunk_without_context_is_the_prefill_pass():
    for lay in (Layout(1), Layout(2), Layout(2, 2)):
        assert chunk_prefill_time(L8, H100, lay, CostOptions(), 512, 0).total_s == \
            pytest.approx(prefill_time(L8, H100, lay, CostOptions(), 1, 512).total_s)
    longer = chunk_prefill_time(L8, H100, Layout(1), CostOptions(), 256, 3840).total_s
    assert longer > chunk_prefill_time(L8, H100, Layout(1), CostOptions(), 256, 0).total_s


def test_chunks_of_a_long_prompt_by_hand(toy):
    # 1000 tokens in 256-token chunks: 256 @ 0, 256 @ 256, 256 @ 512, 232 @ 768 earlier tokens
    pre = prefill_per_request(_req(), Layout(1))
    x = [0.00256, 0.00256 + 256 * 256e-9, 0.00256 + 256 * 512e-9, 0.00232 + 232 * 768e-9]
    assert pre["chunks"] == pre["steps"] == 4
    assert pre["x_req_s"] == pytest.approx(sum(x)) == pytest.approx(0.010374784)
    assert pre["chunk_step_s"] == pytest.approx(x[2])          # the fullest chunk step


def test_short_prompts_share_a_step_by_hand(toy):
    # 100-token prompts: 2 per 256-token step, each its own forward of 1 ms
    pre = prefill_per_request(_req(prompt=100), Layout(1))
    assert (pre["chunks"], pre["steps"]) == (1, 0.5)
    assert pre["x_req_s"] == pytest.approx(0.001) and pre["chunk_step_s"] == pytest.approx(0.002)
    p = point(_req(prompt=100), Layout(1), 8, pre)
    assert p["tpot_s"] == pytest.approx(0.0108 + 8 * 0.001 / 100)     # D + S X_req / O
    assert p["chunk_share"] == pytest.approx(0.5 * 8 / 100)


def test_the_per_step_formula_by_hand(toy):
    req = _req()
    p = point(req, Layout(1), 8, prefill_per_request(req, Layout(1)))
    # D = 10.8 ms at 8 sequences; X_req = 10.374784 ms; O = 100; n = s = 4
    assert p["decode_step_s"] == pytest.approx(0.0108)
    assert p["tpot_s"] == pytest.approx(0.0108 + 8 * 0.010374784 / 100) == pytest.approx(0.01162998272)
    assert p["capacity_rps"] == pytest.approx(8 / (100 * 0.01162998272)) == pytest.approx(6.878772043)
    assert p["chunk_share"] == pytest.approx(4 * 8 / 100)
    assert p["chunk_step_s"] == pytest.approx(0.0108 + 0.002691072)
    # M/D/1: T = 4 x 10.8 ms + X_req = 53.574784 ms, u = r T = 0.36853, W = u T / (2 (1 - u))
    assert p["ttft_s"] == pytest.approx(0.01162998272 + 0.015633210679 + 4 * 0.0108 + 0.010374784)
    assert p["ttft_s"] == pytest.approx(0.080837977)
    assert p["meets_slo"] and p["limited_by"] is None
    batch = point(req, Layout(1), 8, prefill_per_request(req, Layout(1)), queueing=False)
    assert batch["ttft_s"] == pytest.approx(4 * 0.0108 + 0.010374784)      # its own 4 steps


def test_the_chunk_budget_caps_the_batch(toy):
    # 4 chunk steps per request, 100 output tokens: S < 100 / 4 = 25 streams
    a = aggregated_candidates(_req(), [Layout(1)])[0]
    assert (a["layout"], a["batch"], a["limited_by"]) == ("TP1", 24, "prefill_budget")
    assert a["capacity_rps"] == pytest.approx(24 / (100 * (0.0124 + 24 * 0.010374784 / 100)))
    assert a["instances"] == 1 and a["gpus"] == 1 and a["within_budget"]


def test_slos_cap_the_batch(toy):
    req = _req(tpot_s=0.012)                       # 10 ms + 0.1 ms S + S x 0.10374784 ms <= 12 ms: S <= 9
    a = aggregated_candidates(req, _lays(req))[0]
    assert (a["batch"], a["limited_by"]) == (9, "tpot") and a["tpot_s"] <= 0.012
    req = _req(ttft_s=0.07)                        # 80.8 ms at 8 streams (by hand above)
    a = aggregated_candidates(req, _lays(req))[0]
    assert a["meets_slo"] and a["limited_by"] == "ttft" and a["ttft_s"] <= 0.07 and a["batch"] < 8
    assert point(req, Layout(1), a["batch"] + 1, prefill_per_request(req, Layout(1)))["ttft_s"] > 0.07
    req = _req(ttft_s=0.06)                        # batch 1: 4 x 10.1 ms + 10.37 ms + a step in flight > 60 ms
    a = aggregated_candidates(req, _lays(req))[0]
    assert not a["meets_slo"] and (a["batch"], a["limited_by"]) == (1, "ttft")
    assert verdict(req, a, _disagg())[1].startswith("disaggregated: chunked prefill breaks the TTFT SLO")


def _disagg(gpus=2, good=5.0, meets=True):
    return {"prefill_layout": "TP1", "decode_layout": "TP1", "prefill_instances": 1, "decode_instances": 1,
            "gpus": gpus, "meets_slo": meets, "within_budget": True, "goodput_rps_per_gpu": good}


def test_tight_tpot_and_long_prompts_prefer_disaggregated(toy):
    # at batch 1: 10.1 ms + 10.37 ms / 100 = 10.2 ms > 10.15 ms, in every layout
    req = _req(prompt=1000, tpot_s=0.01015, gpus=8)
    a = aggregated_candidates(req, _lays(req))[0]
    assert not a["meets_slo"] and a["limited_by"] == "tpot"
    winner, line = verdict(req, a, _disagg())
    assert winner == "disaggregated" and line.startswith("disaggregated: prefill interference breaks the TPOT SLO")


def test_short_prompts_low_rate_loose_tpot_prefer_aggregated(toy):
    req = _req(prompt=100, rate=1.0, tpot_s=0.1, ttft_s=1.0, gpus=8)
    a = aggregated_candidates(req, _lays(req))[0]
    assert a["meets_slo"] and (a["instances"], a["gpus"]) == (1, 1)
    winner, line = verdict(req, a, _disagg(gpus=2))
    assert winner == "aggregated" and line.startswith("aggregated: 1 GPU (1 x TP1) vs 2")
    # same GPUs: the higher goodput per GPU wins
    assert verdict(req, a, _disagg(gpus=1, good=1e9))[0] == "disaggregated"
    assert verdict(req, a, _disagg(gpus=1, good=0.1))[0] == "aggregated"
    assert verdict(req, a, _disagg(meets=False))[0] == "aggregated"


def test_real_model_long_prompts_at_rate_prefer_disaggregated():
    result = plan(PlanRequest(model=L8, hardware=H100, gpus=8, prompt=4000, output=200, rate=5, ttft_s=2,
                              tpot_s=0.01))
    cmp = result["aggregated_vs_disaggregated"]
    assert cmp["winner"] == "disaggregated" and cmp["verdict"].startswith("disaggregated:")
    a, d = cmp["aggregated"], cmp["disaggregated"]
    assert a["goodput_rps_per_gpu"] < d["goodput_rps_per_gpu"] and a["gpus"] >= d["gpus"]
    assert a["prefill_chunks"] == 16 and 0 < a["chunk_share"] < 1
    assert d["ttft_s"] == pytest.approx(2 * result["recommendation"]["prefill"]["ttft_s"] + d["kv_handoff_s"])


def test_real_model_short_prompts_low_rate_prefer_aggregated():
    result = plan(PlanRequest(model=L8, hardware=H100, gpus=8, prompt=200, output=200, rate=1, ttft_s=1,
                              tpot_s=0.1))
    cmp = result["aggregated_vs_disaggregated"]
    assert cmp["winner"] == "aggregated"
    assert (cmp["aggregated"]["gpus"], cmp["disaggregated"]["gpus"]) == (1, 2)
    assert cmp["local_prefill_max_tokens"] is None                      # no prefill pool to bypass


def test_json_section_and_existing_fields_unchanged():
    code, out = run_plan("--model", "llama-3.1-8b", "--hardware", "h100", "--gpus", "8", "--prompt", "4000",
                         "--output", "200", "--rate", "5", "--ttft", "2", "--tpot", "0.05", "--format", "json")
    assert code == 0
    got = json.loads(out)
    cmp = got.pop("aggregated_vs_disaggregated")
    assert set(cmp) == {"winner", "verdict", "prefill_chunk_tokens", "aggregated", "disaggregated",
                        "local_prefill_max_tokens", "local_prefill_note", "aggregated_layouts"}
    assert {"layout", "tp", "pp", "ep", "instances", "gpus", "gpus_per_instance", "batch", "sequences", "ttft_s",
            "tpot_s", "decode_step_s", "chunk_step_s", "chunk_share", "prefill_s_per_request", "capacity_rps",
            "goodput_rps_per_gpu", "goodput_tok_s_per_gpu", "meets_slo", "within_budget",
            "limited_by"} <= set(cmp["aggregated"])
    assert {"prefill_layout", "decode_layout", "prefill_instances", "decode_instances", "gpus", "ttft_s", "tpot_s",
            "kv_handoff_s", "goodput_rps_per_gpu", "goodput_tok_s_per_gpu", "meets_slo"} <= set(cmp["disaggregated"])
    assert cmp["verdict"].split(":")[0] == cmp["winner"]
    assert all(k == k.lower() and " " not in k for k in [*cmp, *cmp["aggregated"], *cmp["disaggregated"]])
    code, out = run_plan("--model", "llama-3.1-8b", "--hardware", "h100", "--gpus", "8", "--prompt", "4000",
                         "--output", "200", "--rate", "5", "--ttft", "2", "--tpot", "0.05", "--format", "json",
                         "--no-aggregated")
    assert json.loads(out) == got                                      # the rest is as before
    code, out = run_plan("--model", "llama-3.1-8b", "--hardware", "h100", "--gpus", "8", "--prompt", "4000",
                         "--output", "200", "--rate", "5", "--ttft", "2", "--tpot", "0.05")
    assert "aggregated vs disaggregated" in out and "verdict: disaggregated:" in out


def test_batch_mode_compares_goodput_per_gpu():
    result = plan(PlanRequest(model=L8, hardware=H100, gpus=8, prompt=4000, output=200, batch=8, ttft_s=2,
                              tpot_s=0.05))
    cmp = result["aggregated_vs_disaggregated"]
    a, d = cmp["aggregated"], cmp["disaggregated"]
    assert a["batch"] == 8 and a["instances"] == 1 and a["limited_by"] == "batch"
    better = "aggregated" if a["goodput_rps_per_gpu"] >= d["goodput_rps_per_gpu"] else "disaggregated"
    assert cmp["winner"] == better and "at batch 8" in cmp["verdict"]


def _chart_values():
    return yaml.safe_load(open(os.path.join(CHART, "values.yaml")))


def test_helm_values_serve_aggregated_when_it_wins(tmp_path):
    values = tmp_path / "values.yaml"
    code, out = run_plan("--model", "llama-3.1-8b", "--hardware", "h100", "--gpus", "8", "--prompt", "200",
                         "--output", "200", "--rate", "1", "--ttft", "1", "--tpot", "0.1", "--helm-values", str(values))
    assert code == 0 and "verdict: aggregated:" in out
    written, chart = yaml.safe_load(values.read_text()), _chart_values()
    assert written["prefill"]["replicaCount"] == 0 and written["decode"]["replicaCount"] == 1
    assert written["planner"]["prefill"] == {"minReplicas": 0, "maxReplicas": 1}
    assert written["decode"]["layout"] == {"tp": 1, "pp": 1, "ep": 1}
    for pool in ("prefill", "decode"):
        assert set(written[pool]) <= set(chart[pool]) and set(written[pool]["layout"]) == set(chart[pool]["layout"])
    assert "Aggregated serving" in values.read_text()
    pytest.importorskip("helm_python")
    from tests.helm_chart import Release, helm_python, render
    with helm_python.Chart.load(CHART) as loaded:
        release = Release(render(loaded, written))
    assert release.get("Deployment", "prefill")["spec"]["replicas"] == 0


def test_helm_values_keep_the_prefill_pool_when_disaggregated_wins(tmp_path):
    values = tmp_path / "values.yaml"
    code, _ = run_plan("--model", "llama-3.1-8b", "--hardware", "h100", "--gpus", "8", "--prompt", "4000",
                       "--output", "200", "--rate", "5", "--ttft", "2", "--tpot", "0.05", "--helm-values", str(values))
    assert code == 0
    written = yaml.safe_load(values.read_text())
    assert written["prefill"]["replicaCount"] >= 1 and written["planner"]["prefill"]["minReplicas"] == 1
