"""Enumerate each pool's layouts, cost them, rank them, and recommend one per pool.

Who calls what: ``cleave plan`` builds a :class:`PlanRequest` and calls :func:`plan`, which
returns ``{"candidates": [...], "recommendation": {"prefill": {...}, "decode": {...}}}`` (the
JSON contract of issue 14; ``services.capacity.report`` prints it).

Candidates. Prefill: every TP x PP x CP (x EP for MoE) layout of at most ``gpus`` GPUs the
engine's split rules allow; decode: TP x PP (x EP). Cleave deploys prefill instances with
``pp == ep == 1`` and decode instances with ``cp == 1`` (the Helm chart's layouts); other
candidates are costed and shown with ``deployable: false`` and never recommended while a
deployable one fits.

- ``--batch B``: each candidate is one instance at batch B (B prompts in one prefill pass; B
  sequences in a decode step), including those that do not fit (``fits: false``). A PP decode
  instance keeps ``micro_batches`` such steps in flight (``sequences`` = micro_batches x B, all
  of whose KV must fit): ``tpot_s`` is what one sequence waits per token, ``throughput_tok_s``
  what the instance makes (``services.capacity.cost``).
- ``--rate R``: each candidate's batch is the largest one that fits its memory and meets the
  SLO — prefill: ``2 * pass + KV handoff <= TTFT`` (a request may wait for the pass in flight,
  then rides the next one); decode: ``TPOT <= target`` — giving its capacity per instance
  (prefill ``B / pass``, decode ``sequences / (output * TPOT)`` requests/s, Little's law); then
  ``instances = ceil(R / capacity)``.

Ranking, per pool: fits, meets the SLO, deployable, within the GPU budget, then goodput per
GPU (tokens/s of SLO-meeting work per GPU), then latency. The recommendation is, in rate
mode, the deployable candidate needing the fewest GPUs (ties go to the smaller instance —
replicas scale and fail independently — then to goodput per GPU), in batch
mode the top-ranked deployable one; the runner-up is the next distinct candidate, with the
reason it ranked lower. ``services.capacity.aggregated`` then compares that disaggregated
recommendation with aggregated serving (decode instances prefilling their own prompts) on the
same GPU budget: the ``aggregated_vs_disaggregated`` section.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.model import dtype_bytes
from services.capacity.cost import (CostOptions, Layout, ceil_div, decode_step_time, decode_throughput,
                                    kv_handoff_time, prefill_time)
from services.capacity.memory import memory_per_gpu
from services.capacity.hardware import Hardware
from services.capacity.models import ModelSpec

BATCHES = tuple(2 ** i for i in range(11))       # 1 .. 1024


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for. Times in seconds; ``batch`` xor ``rate`` (requests/s)."""

    model: ModelSpec
    hardware: Hardware
    gpus: int
    prompt: int
    output: int
    batch: int = 0
    rate: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    options: CostOptions = field(default_factory=CostOptions)
    prefill_chunk_tokens: int = 256     # aggregated: prompt tokens a decode instance prefills per step
    compare_aggregated: bool = True     # add the "aggregated_vs_disaggregated" section

    def __post_init__(self) -> None:
        for name in ("gpus", "prompt", "output", "prefill_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.batch > 0) == (self.rate > 0):
            raise ValueError(f"give exactly one of batch (got {self.batch}) and rate (got {self.rate}), positive")
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")


def layouts(model: ModelSpec, gpus: int, pool: str) -> list[Layout]:
    """Every layout of at most ``gpus`` GPUs the engine can split ``model`` into, for ``pool``."""
    eps = [e for e in range(1, gpus + 1) if model.is_moe and model.num_experts % e == 0] or [1]
    out = []
    for tp in range(1, gpus + 1):
        for ep in eps:
            for pp in range(1, gpus + 1):
                for cp in ((1, 2, 4, 8, 16, 32) if pool == "prefill" else (1,)):
                    lay = Layout(tp, pp, cp, ep)
                    if lay.gpus <= gpus and lay.problem(model) is None:
                        out.append(lay)
    return out


def deployable(lay: Layout, pool: str) -> bool:
    return (lay.pp == 1 and lay.ep == 1) if pool == "prefill" else lay.cp == 1


def _base(req: PlanRequest, pool: str, lay: Layout) -> dict:
    return {"pool": pool, "tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "ep": lay.ep, "layout": lay.label(),
            "gpus_per_instance": lay.gpus, "deployable": deployable(lay, pool)}


def _prefill_at(req: PlanRequest, lay: Layout, batch: int) -> dict:
    t = prefill_time(req.model, req.hardware, lay, req.options, batch, req.prompt)
    mem = memory_per_gpu(req.model, req.hardware, lay, req.options, batch * req.prompt, batch * req.prompt)
    handoff = kv_handoff_time(req.model, req.hardware, req.options, req.prompt, lay, lay)
    return {"batch": batch, "sequences": batch, "ttft_s": t.total_s, "kv_handoff_s": handoff, "fits": mem.fits,
            "throughput_tok_s": batch * req.prompt / t.total_s, **_shared(t, mem)}


def _decode_at(req: PlanRequest, lay: Layout, batch: int) -> dict:
    ctx = req.prompt + req.output / 2
    t = decode_step_time(req.model, req.hardware, lay, req.options, batch, ctx)
    mem = memory_per_gpu(req.model, req.hardware, lay, req.options, t.sequences * (req.prompt + req.output), batch)
    return {"batch": batch, "sequences": t.sequences, "micro_batches": t.micro_batches, "tpot_s": t.total_s,
            "fits": mem.fits, "throughput_tok_s": decode_throughput(t), **_shared(t, mem)}


def _shared(t, mem) -> dict:
    """The fields both pools' candidates have: communication, memory, every term."""
    return {"comm_share": t.comm_share, "over_parallelised": t.over_parallelised, "tp_algorithm": t.tp_algorithm,
            "memory_per_gpu_bytes": mem.used, "memory": _mem(mem), "terms": t.as_dict()}


def _mem(mem) -> dict:
    return {"weights": mem.weights, "kv": mem.kv, "activations": mem.activations, "reserve": mem.reserve,
            "capacity": mem.capacity, "kv_room_tokens": mem.kv_room_tokens}


def _meets(req: PlanRequest, pool: str, c: dict, queueing: bool) -> bool:
    if pool == "prefill":
        return req.ttft_s is None or (2 if queueing else 1) * c["ttft_s"] + c["kv_handoff_s"] <= req.ttft_s
    return req.tpot_s is None or c["tpot_s"] <= req.tpot_s


def _candidate(req: PlanRequest, pool: str, lay: Layout) -> dict:
    at = _prefill_at if pool == "prefill" else _decode_at
    if req.batch:
        c = {**_base(req, pool, lay), "instances": 1, **at(req, lay, req.batch)}
        c["meets_slo"] = c["fits"] and _meets(req, pool, c, False)
    else:
        best = None
        for b in BATCHES if pool == "decode" else BATCHES[:7]:
            c = at(req, lay, b)
            if not c["fits"]:
                break
            ok = _meets(req, pool, c, True)
            gain = best is None or c["throughput_tok_s"] > 1.02 * best[0]["throughput_tok_s"]
            if ok and gain:
                best = (c, True)
            elif best is None:
                best = (c, False)
            if req.ttft_s is None and pool == "prefill" and not gain:
                break
        c, ok = best if best else (at(req, lay, 1), False)
        c = {**_base(req, pool, lay), **c, "meets_slo": ok and c["fits"]}
        per_req = req.prompt if pool == "prefill" else req.output
        cap = c["throughput_tok_s"] / per_req if c["meets_slo"] else 0.0
        c["capacity_rps"] = cap
        c["instances"] = ceil_div(req.rate, cap) if cap else None
    c["gpus"] = lay.gpus * c["instances"] if c["instances"] else None
    c["within_budget"] = c["gpus"] is not None and c["gpus"] <= req.gpus
    c["goodput_tok_s_per_gpu"] = c["throughput_tok_s"] / lay.gpus if c["meets_slo"] else 0.0
    return c


def _latency(c: dict) -> float:
    return c.get("ttft_s", c.get("tpot_s"))


def _overflow(c: dict) -> float:
    """Orders layouts that do not fit by how far they are from fitting (bytes per GPU)."""
    return 0.0 if c["fits"] else c["memory_per_gpu_bytes"]


def rank_key(c: dict):
    return (not c["fits"], _overflow(c), not c["meets_slo"], not c["deployable"], not c["within_budget"],
            -c["goodput_tok_s_per_gpu"], _latency(c))


def _pick_key(rate_mode: bool):
    if not rate_mode:
        return rank_key
    return lambda c: (not c["fits"], _overflow(c), not c["meets_slo"], not c["deployable"], c["gpus"] or 1 << 30,
                      c["gpus_per_instance"], -c["goodput_tok_s_per_gpu"], _latency(c))


def _why_lost(req: PlanRequest, best: dict, other: dict) -> str:
    lat = "TTFT" if best["pool"] == "prefill" else "TPOT"
    if not other["fits"]:
        return f"does not fit: {other['memory_per_gpu_bytes'] / 1e9:.1f} GB per GPU"
    if not other["meets_slo"]:
        return f"misses the {lat} target ({_latency(other):.3g} s at batch {other['batch']})"
    if not other["deployable"]:
        return "Cleave cannot deploy it (prefill pools run pp=ep=1, decode pools cp=1)"
    if req.rate and other["gpus"] != best["gpus"]:
        return (f"needs {other['gpus']} GPUs ({other['instances']} x {other['layout']}) "
                f"vs {best['gpus']} ({best['instances']} x {best['layout']})")
    if req.rate and other["gpus_per_instance"] != best["gpus_per_instance"]:
        return (f"same {best['gpus']} GPUs in larger instances ({other['gpus_per_instance']} vs "
                f"{best['gpus_per_instance']} GPUs): replicas scale and fail independently")
    if other["goodput_tok_s_per_gpu"] < best["goodput_tok_s_per_gpu"]:
        return (f"lower goodput per GPU ({other['goodput_tok_s_per_gpu']:.0f} vs "
                f"{best['goodput_tok_s_per_gpu']:.0f} tok/s)")
    return (f"a near tie on GPUs and goodput; higher {lat} ({_latency(other) * 1e3:.4g} ms vs "
            f"{_latency(best) * 1e3:.4g} ms)")


def _recommend(req: PlanRequest, pool: str, cands: list[dict]) -> dict:
    ordered = sorted(cands, key=_pick_key(bool(req.rate)))
    if not ordered:
        return {"pool": pool, "layout": None, "note": "no layout of the model fits these GPUs"}
    best = ordered[0]
    rec = {k: best.get(k) for k in ("tp", "pp", "cp", "ep", "layout", "instances", "gpus", "gpus_per_instance",
                                    "batch", "sequences", "ttft_s", "tpot_s", "throughput_tok_s", "capacity_rps",
                                    "goodput_tok_s_per_gpu", "comm_share", "fits", "meets_slo", "deployable")
           if k in best}
    notes = []
    if not best["fits"]:
        notes.append("no layout fits in memory")
    elif not best["meets_slo"]:
        notes.append("no layout meets the SLO; this is the fastest that fits")
    if not best["deployable"]:
        notes.append("no layout Cleave deploys fits; this one needs engine support")
    rec["note"] = "; ".join(notes)
    runner = ordered[1] if len(ordered) > 1 else None
    rec["runner_up"] = None if runner is None else {
        "layout": runner["layout"], "tp": runner["tp"], "pp": runner["pp"], "cp": runner["cp"],
        "ep": runner["ep"], "instances": runner["instances"], "why_lost": _why_lost(req, best, runner)}
    return rec


def plan(req: PlanRequest) -> dict:
    """The whole plan: ranked candidates of both pools and the recommendation (see module doc)."""
    out, rec = [], {}
    for pool in ("prefill", "decode"):
        cands = sorted((_candidate(req, pool, lay) for lay in layouts(req.model, req.gpus, pool)), key=rank_key)
        for i, c in enumerate(cands):
            c["rank"] = i + 1
        out += cands
        rec[pool] = _recommend(req, pool, cands)
    p, d = rec["prefill"], rec["decode"]
    if req.rate and p.get("gpus") and d.get("gpus"):
        total = p["gpus"] + d["gpus"]
        rec["total_gpus"] = total
        rec["within_budget"] = total <= req.gpus
        if p.get("layout") and d.get("layout"):
            rec["kv_handoff_s"] = kv_handoff_time(req.model, req.hardware, req.options, req.prompt,
                                                  Layout(p["tp"], p["pp"], p["cp"], p["ep"]),
                                                  Layout(d["tp"], d["pp"], d["cp"], d["ep"]))
    result = {"candidates": out, "recommendation": rec, "inputs": _inputs(req)}
    if req.compare_aggregated:
        from services.capacity.aggregated import compare     # imports this module
        result["aggregated_vs_disaggregated"] = compare(req, result)
    return result


def _inputs(req: PlanRequest) -> dict:
    o = req.options
    return {"model": req.model.name, "model_source": req.model.source, "hardware": req.hardware.name,
            "hardware_source": req.hardware.source, "gpus": req.gpus, "gpus_per_node": req.hardware.gpus_per_node,
            "prompt": req.prompt, "output": req.output, "batch": req.batch or None, "rate": req.rate or None,
            "ttft_s": req.ttft_s, "tpot_s": req.tpot_s, "weight_dtype": o.weight_dtype, "kv_dtype": o.kv_dtype,
            "expert_imbalance": o.expert_imbalance, "params": req.model.total_params(),
            "weight_bytes": req.model.total_params() * dtype_bytes(o.weight_dtype),
            "kv_bytes_per_token": req.model.kv_bytes_per_token(o.kv_dtype)}
