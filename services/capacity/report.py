"""Print a plan (``services.capacity.search.plan``) as tables or JSON, and write Helm values.

Table columns, per pool: rank; layout; GPUs per instance; instances; batch (prompts per
prefill pass, sequences per decode step); seqs (sequences in flight: a PP decode instance keeps
several steps' micro-batches in flight); TTFT (prefill pass) or TPOT (one sequence's time per
token) in ms; tokens/s per instance; goodput tokens/s per GPU at the SLO; share of the time in
communication; the TP all-reduce's algorithm (ring, tree, one-shot: ``collectives``); GB per GPU
(weights + KV + activations); flags:
``no-fit`` (memory), ``slo`` (misses the target), ``OP`` (a layer's communication exceeds its
compute: over-parallelised), ``nd`` (not deployable by Cleave's chart), ``budget`` (instances
needed exceed ``--gpus``). Then the aggregated-vs-disaggregated comparison
(``services.capacity.aggregated``): each mode's layout, GPUs, TTFT, TPOT, goodput per GPU and
the verdict; with ``--helm-values``, aggregated serving when it wins.
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
    if result.get("aggregated_vs_disaggregated"):
        lines += ["", *comparison_lines(result["aggregated_vs_disaggregated"], bool(i["rate"]))]
    return "\n".join(lines)


def _status(m: dict, rate: bool) -> str:
    if not m.get("fits", True):
        return "no-fit"
    if not m["meets_slo"]:
        return "slo"
    return "met" if not rate or m["within_budget"] else "budget"


def comparison_lines(cmp: dict, rate: bool) -> list[str]:
    """The ``aggregated_vs_disaggregated`` section (``services.capacity.aggregated``) as text."""
    head = (f"{'mode':<14} {'layout':<28} {'GPUs':>4} {'batch':>5} {'TTFT ms':>9} {'TPOT ms':>8} "
            f"{'req/s/GPU':>9} {'out tok/s/GPU':>13}  SLO")
    lines = [f"aggregated vs disaggregated (aggregated: decode instances prefill {cmp['prefill_chunk_tokens']} "
             f"prompt tokens per step)", head, "-" * len(head)]
    d, a = cmp["disaggregated"], cmp["aggregated"]
    if d.get("prefill_layout"):
        inst = lambda n: f"{n} x " if rate and n else ""  # noqa: E731
        lay = f"{inst(d['prefill_instances'])}{d['prefill_layout']} + {inst(d['decode_instances'])}{d['decode_layout']}"
        gpus = "-" if d["gpus"] is None else str(d["gpus"])
        lines.append(f"{'disaggregated':<14} {lay:<28} {gpus:>4} {d['decode_batch']:>5} {_ms(d['ttft_s']):>9} "
                     f"{_ms(d['tpot_s']):>8} {d['goodput_rps_per_gpu']:>9.3g} {d['goodput_tok_s_per_gpu']:>13.0f}  "
                     f"{_status(d, rate)}")
    if a:
        lay = f"{a['instances']} x {a['layout']}" if rate and a["instances"] else a["layout"]
        gpus = "-" if a["gpus"] is None else str(a["gpus"])
        lines.append(f"{'aggregated':<14} {lay:<28} {gpus:>4} {a['batch']:>5} {_ms(a['ttft_s']):>9} "
                     f"{_ms(a['tpot_s']):>8} {a['goodput_rps_per_gpu']:>9.3g} {a['goodput_tok_s_per_gpu']:>13.0f}  "
                     f"{_status(a, rate)}")
        lines.append(f"  aggregated: decode step {_ms(a['decode_step_s'])} ms, a step with a chunk "
                     f"{_ms(a['chunk_step_s'])} ms, {a['chunk_share']:.0%} of steps carry one, "
                     f"{_ms(a['prefill_s_per_request'])} ms of prefill per request in {a['prefill_chunks']} chunk(s); "
                     f"batch {'from --batch' if a['limited_by'] == 'batch' else 'limited by ' + str(a['limited_by'])}")
    lines.append(f"verdict: {cmp['verdict']}")
    if cmp.get("local_prefill_note"):
        lines.append(f"conditional: {cmp['local_prefill_note']}")
    return lines


def format_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=float, allow_nan=False)   # strict JSON for other tools


def aggregated_wins(result: dict) -> bool:
    return (result.get("aggregated_vs_disaggregated") or {}).get("winner") == "aggregated"


def helm_values(result: dict) -> dict:
    """Chart values (helm/cleave/values.yaml keys) that deploy the recommendation; when the
    comparison says aggregated wins, its decode instances and ``prefill.replicaCount: 0`` (the
    planner may start one prefill instance if TTFT breaks its target)."""
    rec, inputs = result["recommendation"], result["inputs"]
    p, d = rec["prefill"], rec["decode"]
    if aggregated_wins(result):
        return _aggregated_values(result)
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
    return _with_targets(values, inputs)


def _with_targets(values: dict, inputs: dict) -> dict:
    """``values`` with the planner's TTFT/TPOT targets (seconds) from the plan's SLOs, when given."""
    if inputs["ttft_s"]:
        values["planner"]["ttftTarget"] = inputs["ttft_s"]
    if inputs["tpot_s"]:
        values["planner"]["tpotTarget"] = inputs["tpot_s"]
    return values


def _aggregated_values(result: dict) -> dict:
    """Aggregated serving: no prefill instance; the decode pool runs the aggregated layout."""
    inputs, a = result["inputs"], result["aggregated_vs_disaggregated"]["aggregated"]
    p = result["recommendation"]["prefill"]
    gpu = inputs["hardware"] != "local"
    n = a["instances"] or 1
    values = {
        "gpu": {"enabled": gpu},
        "prefill": {"replicaCount": 0,
                    "layout": {"tp": p.get("tp") or 1, "cp": p.get("cp") or 1},
                    "gpusPerInstance": (p.get("gpus_per_instance") or 1) if gpu else 0},
        "decode": {"replicaCount": n, "layout": {"tp": a["tp"], "pp": a["pp"], "ep": a["ep"]},
                   "gpusPerInstance": a["gpus_per_instance"] if gpu else 0, "maxBatch": int(a["sequences"])},
        "planner": {"prefill": {"minReplicas": 0, "maxReplicas": 1},
                    "decode": {"minReplicas": 1, "maxReplicas": max(n, 1)}},
    }
    kv_tok = inputs.get("kv_bytes_per_token", 0)
    if kv_tok:       # the streams' KV and one prompt being prefilled
        tokens = a["sequences"] * (inputs["prompt"] + inputs["output"]) + inputs["prompt"]
        values["decode"]["kvCacheMb"] = int(math.ceil(tokens * kv_tok / MIB))
    return _with_targets(values, inputs)


def write_helm_values(result: dict, path: str) -> None:
    import yaml
    i = result["inputs"]
    header = (f"# Written by `cleave plan` for {i['model']} on {i['gpus']} x {i['hardware']}: the recommended\n"
              f"# layouts and instance counts. Use: helm install cleave helm/cleave -f {path}\n")
    if aggregated_wins(result):
        header += ("# Aggregated serving (prefill.replicaCount: 0): decode instances prefill their own prompts.\n"
                   f"# {result['aggregated_vs_disaggregated']['verdict']}\n"
                   "# The planner may start one prefill instance if TTFT passes its target (planner.prefill).\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(helm_values(result), sort_keys=False))
