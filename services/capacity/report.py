"""Print a plan (``services.capacity.search.plan``) as tables or JSON, and write Helm values.

Table columns, per pool: rank; layout; GPUs per instance; instances; batch (prompts per
prefill pass, sequences per decode step); seqs (sequences in flight: a PP decode instance keeps
several steps' micro-batches in flight); TTFT (prefill pass) or TPOT (one sequence's time per
token) in ms; tokens/s per instance; goodput tokens/s per GPU at the SLO; share of the time in
communication; the TP all-reduce's algorithm (ring, tree, one-shot: ``collectives``); GB per GPU
(weights + KV + activations); flags:
``no-fit`` (memory), ``slo`` (misses the target), ``OP`` (a layer's communication exceeds its
compute: over-parallelised), ``nd`` (not deployable by Cleave's chart), ``budget`` (instances
needed exceed ``--gpus``).
"""
from __future__ import annotations

import json
import math

MIB = 1 << 20


def _flags(c: dict) -> str:
    f = [name for name, on in (("no-fit", not c["fits"]), ("slo", c["fits"] and not c["meets_slo"]),
                               ("OP", c["over_parallelised"]), ("nd", not c["deployable"]),
                               ("budget", c["fits"] and c["meets_slo"] and not c["within_budget"])) if on]
    return ",".join(f)


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def pool_table(cands: list[dict], pool: str, top: int) -> list[str]:
    lat = "TTFT ms" if pool == "prefill" else "TPOT ms"
    head = f"{'#':>3} {'layout':<16} {'GPUs':>4} {'inst':>4} {'batch':>5} {'seqs':>5} {lat:>9} {'tok/s':>9} " \
           f"{'good/GPU':>9} {'comm':>5} {'TP alg':>8} {'GB/GPU':>7}  flags"
    rows = [head, "-" * len(head)]
    mine = [c for c in cands if c["pool"] == pool]
    for c in mine[:top]:
        inst = "-" if c["instances"] is None else str(c["instances"])
        rows.append(f"{c['rank']:>3} {c['layout']:<16} {c['gpus_per_instance']:>4} {inst:>4} {c['batch']:>5} "
                    f"{c.get('sequences', c['batch']):>5.0f} {_ms(c.get('ttft_s', c.get('tpot_s'))):>9} "
                    f"{c['throughput_tok_s']:>9.0f} {c['goodput_tok_s_per_gpu']:>9.0f} {c['comm_share']:>5.0%} "
                    f"{c.get('tp_algorithm') or '-':>8} {c['memory_per_gpu_bytes'] / 1e9:>7.1f}  {_flags(c)}")
    if len(mine) > top:
        rows.append(f"    ... {len(mine) - top} more layouts (--top N, or --format json)")
    return rows


def _rec_line(pool: str, r: dict) -> list[str]:
    if not r.get("layout"):
        return [f"{pool}: {r.get('note', 'nothing fits')}"]
    if not r.get("fits"):
        return [f"{pool}: no layout fits in memory on these GPUs (the closest: {r['layout']}); "
                f"add GPUs, use larger ones, or lower --weight-dtype/--kv-dtype"]
    lat = f"TTFT {_ms(r.get('ttft_s'))} ms" if pool == "prefill" else f"TPOT {_ms(r.get('tpot_s'))} ms"
    inst = r.get("instances")
    seqs = r.get("sequences") or r["batch"]
    flight = f" ({seqs:.0f} sequences in flight)" if seqs != r["batch"] else ""
    line = (f"{pool}: {inst if inst is not None else '?'} x {r['layout']} ({r['gpus_per_instance']} GPUs each), "
            f"batch {r['batch']}{flight}, {lat}, {r['throughput_tok_s']:.0f} tok/s per instance")
    out = [line]
    if r.get("note"):
        out.append(f"  note: {r['note']}")
    ru = r.get("runner_up")
    if ru:
        out.append(f"  runner-up: {ru['layout']} — {ru['why_lost']}")
    return out


def format_table(result: dict, top: int = 12) -> str:
    i = result["inputs"]
    load = f"batch {i['batch']}" if i["batch"] else f"{i['rate']:g} req/s"
    slo = ", ".join(s for s in (f"TTFT <= {i['ttft_s']:g} s" if i["ttft_s"] else "",
                                f"TPOT <= {i['tpot_s']:g} s" if i["tpot_s"] else "") if s) or "no SLO"
    lines = [f"cleave plan: {i['model']} ({i['params'] / 1e9:.1f} B params, {i['weight_dtype']} weights "
             f"{i['weight_bytes'] / 1e9:.1f} GB, {i['kv_dtype']} KV) on {i['gpus']} x {i['hardware']} "
             f"({i['gpus_per_node']} per node); prompt {i['prompt']}, output {i['output']}, {load}; {slo}"]
    for pool in ("prefill", "decode"):
        lines += ["", f"{pool} layouts (ranked)", *pool_table(result["candidates"], pool, top)]
    rec = result["recommendation"]
    lines += ["", "recommendation"]
    for pool in ("prefill", "decode"):
        lines += _rec_line(pool, rec[pool])
    if "total_gpus" in rec:
        verdict = "within" if rec["within_budget"] else "OVER"
        lines.append(f"total: {rec['total_gpus']} GPUs ({verdict} the budget of {i['gpus']}); "
                     f"KV handoff {_ms(rec.get('kv_handoff_s'))} ms per request")
    return "\n".join(lines)


def format_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=float, allow_nan=False)   # strict JSON for other tools


def helm_values(result: dict) -> dict:
    """Chart values (helm/cleave/values.yaml keys) that deploy the recommendation."""
    rec, inputs = result["recommendation"], result["inputs"]
    p, d = rec["prefill"], rec["decode"]
    if not p.get("layout") or not d.get("layout"):
        raise ValueError("the plan has no layout for one of the pools: nothing to deploy")
    gpu = inputs["hardware"] != "local"
    kv_tok = inputs.get("kv_bytes_per_token", 0)
    values = {
        "gpu": {"enabled": gpu},
        "prefill": {"replicaCount": p["instances"] or 1, "layout": {"tp": p["tp"], "cp": p["cp"]},
                    "gpusPerInstance": p["gpus_per_instance"] if gpu else 0},
        "decode": {"replicaCount": d["instances"] or 1, "layout": {"tp": d["tp"], "pp": d["pp"], "ep": d["ep"]},
                   "gpusPerInstance": d["gpus_per_instance"] if gpu else 0,
                   "maxBatch": int(d.get("sequences") or d["batch"])},
        "planner": {"prefill": {"minReplicas": 1, "maxReplicas": max(p["instances"] or 1, 1)},
                    "decode": {"minReplicas": 1, "maxReplicas": max(d["instances"] or 1, 1)}},
    }
    if kv_tok:
        tokens = d.get("sequences", d["batch"]) * (inputs["prompt"] + inputs["output"])
        values["decode"]["kvCacheMb"] = int(math.ceil(tokens * kv_tok / MIB))
    if inputs["ttft_s"]:
        values["planner"]["ttftTarget"] = inputs["ttft_s"]
    if inputs["tpot_s"]:
        values["planner"]["tpotTarget"] = inputs["tpot_s"]
    return values


def write_helm_values(result: dict, path: str) -> None:
    import yaml
    i = result["inputs"]
    header = (f"# Written by `cleave plan` for {i['model']} on {i['gpus']} x {i['hardware']}: the recommended\n"
              f"# layouts and instance counts. Use: helm install cleave helm/cleave -f {path}\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(helm_values(result), sort_keys=False))
