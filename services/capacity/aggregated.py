"""Aggregated vs disaggregated: would decode instances that prefill their own prompts serve the
workload, within its SLOs, on fewer GPUs than the planner's prefill and decode pools?

Cleave serves aggregated with ``--prefill-instances 0`` (Helm ``prefill.replicaCount: 0``): each
step of a decode instance (``engine/scheduler.py``) runs one decode forward over its running
sequences, then, while prompts are pending, prefill chunks of at most C prompt tokens in all
(``--prefill-chunk-tokens``, 256), one forward per chunk; a prompt's first token is sampled from
its last chunk. The forwards are separate, so a step that carries a chunk lasts the decode step
plus the chunk's prefill, and every running stream waits for both: prefill-decoding
interference (DistServe, Zhong et al., OSDI 2024, §2), bounded per step by chunking
(Sarathi-Serve, Agrawal et al., OSDI 2024).

Notation, per aggregated instance of layout L (the decode pool's layouts, TP x PP x EP, G GPUs):
P prompt and O output tokens; S sequences in flight (PP micro-batches x batch B); D the decode
step at S (``cost.decode_step_time`` at context P + O/2, as the decode pool); n = ceil(P/C)
chunks per prompt; X_i the prefill of chunk i, min(C, P - iC) tokens attending to the iC before
it (``cost.chunk_prefill_time``); X_req = sum of X_i, prefill seconds per request; s the steps
whose chunk budget a request takes: n when P >= C, else 1 / floor(C/P) (short prompts share one).

- Steady state at S sequences: a stream leaves after O tokens, so S/O requests join per step
  and a share phi = s * S / O of the steps carries prefill. A stream's mean time per token is
      TPOT = D + S * X_req / O        (= D + phi x the prefill of a chunk step)
  which is also a request's TPOT (its mean over its O steps). Rate: r = S / (O * TPOT) req/s
  (Little's law, as the decode pool's capacity).
- The instance keeps up only while phi < 1, S < O / s: a step prefills at most C tokens, so the
  prompt-to-output ratio caps the batch (``limited_by: "prefill_budget"``).
- TTFT = TPOT (the step in flight) + W + n * D + X_req (its own n steps), W the mean wait for the
  chunk budget, M/D/1 (Pollaczek-Khinchine, deterministic service): the budget's time per
  request T = s * D + X_req, utilisation u = r * T (u < 1 exactly when phi < 1),
  W = u * T / (2 (1 - u)).
- Rate mode: B goes over powers of two, then bisects, to the largest whose TTFT and TPOT meet the
  SLOs (and that fits): capacity r, goodput per GPU r / G, instances ceil(rate / r);
  ``limited_by`` names what stopped B: "memory", "prefill_budget", "tpot", "ttft" or
  "max_batch". Batch mode: B = --batch (``limited_by: "batch"``), TTFT without W (as the
  pools' batch mode: no queueing).

Disaggregated, from the plan's recommendation: TTFT = 2 x prefill pass + KV handoff (rate mode,
what the prefill pool is sized on; batch mode: 1 x), TPOT the decode step's; goodput per GPU
1 / (G_p / r_p + G_d / r_d): prefill and decode instances in the ratio of their capacities.

Verdict: rate mode, the mode that meets both SLOs within --gpus on fewer GPUs, a tie going to
the higher goodput per GPU; batch mode, the higher goodput per GPU. When disaggregated wins and
--tpot is given, ``local_prefill_max_tokens`` suggests conditional disaggregation: the largest
multiple of 16 tokens (<= C) whose local prefill, one chunk after the context it extends, keeps
that step (recommended decode step + chunk) within the TPOT target.

Not modelled: prefix-cache hits (all P tokens are prefilled), the TPOT tail (a token whose step
carries a chunk waits D + X_i), the prompts' KV beyond one in progress, and, with PP, a chunk
is charged its whole pipeline pass.
"""
from __future__ import annotations

import math

from services.capacity.cost import Layout, ceil_div, chunk_prefill_time, decode_step_time
from services.capacity.memory import memory_per_gpu

# ``req`` is a ``services.capacity.search.PlanRequest``; search imports this module, not the reverse.
BATCHES = tuple(2 ** i for i in range(11))   # 1 .. 1024, as the decode pool's search
BLOCK = 16           # tokens per KV block: --local-prefill-max-tokens is a multiple of it
SAMPLED_CHUNKS = 32  # longer prompts: the mean of this many evenly spaced chunks


def prefill_per_request(req: PlanRequest, lay: Layout) -> dict:
    """A prompt's chunked prefill on ``lay``: ``chunks`` (n), ``steps`` (s), ``x_req_s``
    (X_req) and ``chunk_step_s`` (the most prefill one step carries)."""
    P, C = req.prompt, req.prefill_chunk_tokens
    def one(tokens: int, ctx: int) -> float:
        return chunk_prefill_time(req.model, req.hardware, lay, req.options, tokens, ctx).total_s
    if P <= C:
        x, per_step = one(P, 0), C // P
        return {"chunks": 1, "steps": 1 / per_step, "x_req_s": x, "chunk_step_s": per_step * x}
    n, full = ceil_div(P, C), P // C
    idx = range(full) if full <= SAMPLED_CHUNKS else \
        sorted({round(i * (full - 1) / (SAMPLED_CHUNKS - 1)) for i in range(SAMPLED_CHUNKS)})
    xs = [one(C, i * C) for i in idx]
    x = sum(xs) / len(xs) * full + (one(P - full * C, full * C) if P > full * C else 0.0)
    return {"chunks": n, "steps": n, "x_req_s": x, "chunk_step_s": max(xs)}


def point(req: PlanRequest, lay: Layout, batch: float, pre: dict, queueing: bool = True) -> dict:
    """One aggregated instance at decode ``batch``: the module doc's formulas."""
    P, O = req.prompt, req.output
    t = decode_step_time(req.model, req.hardware, lay, req.options, batch, P + O / 2)
    S, D, x, s = t.sequences, t.total_s, pre["x_req_s"], pre["steps"]
    tpot = D + S * x / O
    rate = S / (O * tpot)
    share = s * S / O
    slot = s * D + x
    u = rate * slot
    own = pre["chunks"] * D + x
    if not queueing:
        ttft = own
    else:
        ttft = tpot + u * slot / (2 * (1 - u)) + own if u < 1 else math.inf
    mem = memory_per_gpu(req.model, req.hardware, lay, req.options, S * (P + O) + P,   # + the prompt in prefill
                         max(batch, min(P, req.prefill_chunk_tokens)))
    limit = ("memory" if not mem.fits else "prefill_budget" if share >= 1 else
             "tpot" if req.tpot_s is not None and tpot > req.tpot_s else
             "ttft" if req.ttft_s is not None and ttft > req.ttft_s else None)
    return {"batch": batch, "sequences": S, "micro_batches": t.micro_batches, "decode_step_s": D,
            "chunk_step_s": D + pre["chunk_step_s"], "prefill_s_per_request": x, "prefill_chunks": pre["chunks"],
            "chunk_share": min(share, 1.0), "tpot_s": tpot, "ttft_s": ttft if math.isfinite(ttft) else None,
            "capacity_rps": rate if share < 1 else 0.0, "fits": mem.fits, "memory_per_gpu_bytes": mem.used,
            "meets_slo": limit is None, "limited_by": limit}


def _search(req: PlanRequest, lay: Layout, pre: dict) -> dict:
    """The largest integer batch at which ``point`` meets everything (module doc), or the batch-1
    point when none does; ``limited_by`` says what stopped the batch from growing."""
    good = bad = None
    for b in BATCHES:
        p = point(req, lay, b, pre)
        if not p["meets_slo"]:
            bad = p
            break
        good = p
    if good is None:
        return bad
    if bad is not None:
        lo, hi = good["batch"], bad["batch"]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            p = point(req, lay, mid, pre)
            if p["meets_slo"]:
                lo, good = mid, p
            else:
                hi, bad = mid, p
    return {**good, "limited_by": bad["limited_by"] if bad else "max_batch"}


def aggregated_candidates(req: PlanRequest, lays: list[Layout]) -> list[dict]:
    """``lays`` (the decode pool's layouts) run aggregated, best first (rate mode: fewest GPUs,
    then smaller instances, then goodput per GPU; batch mode: goodput per GPU)."""
    out = []
    for lay in lays:
        pre = prefill_per_request(req, lay)
        c = point(req, lay, req.batch, pre, queueing=False) if req.batch else _search(req, lay, pre)
        c = {"tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "ep": lay.ep, "layout": lay.label(),
             "gpus_per_instance": lay.gpus, **c}
        cap = c["capacity_rps"] if c["meets_slo"] else 0.0
        if req.batch and c["meets_slo"]:
            c["limited_by"] = "batch"            # the batch is --batch's
        c["instances"] = 1 if req.batch else (ceil_div(req.rate, cap) if cap else None)
        c["gpus"] = lay.gpus * c["instances"] if c["instances"] else None
        c["within_budget"] = c["gpus"] is not None and c["gpus"] <= req.gpus
        c["goodput_rps_per_gpu"] = cap / lay.gpus
        c["goodput_tok_s_per_gpu"] = cap * req.output / lay.gpus
        out.append(c)
    if req.batch:
        key = lambda c: (not c["fits"], not c["meets_slo"], -c["goodput_rps_per_gpu"], c["tpot_s"])  # noqa: E731
    else:
        key = lambda c: (not c["fits"], not c["meets_slo"], not c["within_budget"], c["gpus"] or 1 << 30,  # noqa: E731
                         c["gpus_per_instance"], -c["goodput_rps_per_gpu"], c["tpot_s"])
    return sorted(out, key=key)


def disaggregated_summary(req: PlanRequest, result: dict) -> dict:
    """The plan's recommendation as one mode: layouts, instances, TTFT/TPOT, goodput per GPU."""
    rec = result["recommendation"]
    p, d = rec["prefill"], rec["decode"]
    if not p.get("layout") or not d.get("layout"):
        return {"meets_slo": False, "fits": False, "gpus": None, "within_budget": False,
                "goodput_rps_per_gpu": 0.0, "goodput_tok_s_per_gpu": 0.0, "note": "no layout fits"}
    handoff = rec.get("kv_handoff_s")
    if handoff is None:
        cand = next(c for c in result["candidates"] if c["pool"] == "prefill" and c["layout"] == p["layout"])
        handoff = cand["kv_handoff_s"]
    if req.rate:
        cap_p, cap_d, gpus = p.get("capacity_rps") or 0.0, d.get("capacity_rps") or 0.0, rec.get("total_gpus")
    else:
        cap_p, cap_d = p["throughput_tok_s"] / req.prompt, d["throughput_tok_s"] / req.output
        gpus = p["gpus_per_instance"] + d["gpus_per_instance"]
    meets = bool(p.get("meets_slo") and d.get("meets_slo"))
    good = 1 / (p["gpus_per_instance"] / cap_p + d["gpus_per_instance"] / cap_d) if meets and cap_p and cap_d else 0.0
    return {"prefill_layout": p["layout"], "decode_layout": d["layout"],
            "prefill_instances": p.get("instances"), "decode_instances": d.get("instances"), "gpus": gpus,
            "prefill_batch": p["batch"], "decode_batch": d["batch"], "sequences": d.get("sequences", d["batch"]),
            "ttft_s": (2 if req.rate else 1) * p["ttft_s"] + handoff, "tpot_s": d["tpot_s"], "kv_handoff_s": handoff,
            "fits": bool(p.get("fits") and d.get("fits")), "meets_slo": meets,
            "within_budget": gpus is not None and gpus <= req.gpus,
            "goodput_rps_per_gpu": good, "goodput_tok_s_per_gpu": good * req.output}


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f} ms"


def _limit_reason(req: PlanRequest, a: dict) -> str:
    """Why an aggregated instance serves no more than it does."""
    C, P, O, S = req.prefill_chunk_tokens, req.prompt, req.output, a["sequences"]
    budget = (f"a step prefills at most {C} prompt tokens, so {P}-token prompts ({a['prefill_chunks']} chunk(s) each) "
              f"and {O}-token outputs cap an aggregated instance at {S:.0f} streams")
    return {"prefill_budget": budget,
            "tpot": f"prefill interference caps its batch at {S:.0f}: more streams bring more prompt chunks, "
                    f"and TPOT passes {_ms(req.tpot_s)} (decode step {_ms(a['decode_step_s'])}, "
                    f"{a['chunk_share']:.0%} of steps carry a chunk)",
            "ttft": f"waiting for the {C}-token chunk budget pushes TTFT past {req.ttft_s} s above {S:.0f} streams",
            "memory": f"KV memory caps its batch at {S:.0f} streams",
            "batch": f"at {S:.0f} streams an aggregated instance spends {1 - a['decode_step_s'] / a['tpot_s']:.0%} "
                     f"of its time prefilling, {_ms(a['tpot_s'] - a['decode_step_s'])} more per token than the "
                     f"decode step",
            }.get(a["limited_by"], f"its batch of {S:.0f} streams")


def _agg_failure(req: PlanRequest, a: dict) -> str:
    """Why no aggregated instance meets the SLO (``a``: the best one's batch-1 point)."""
    C, P, O = req.prefill_chunk_tokens, req.prompt, req.output
    ttft = "unbounded" if a["ttft_s"] is None else f"{a['ttft_s']:.3g} s"
    return {"memory": "an aggregated instance does not fit in memory even at batch 1",
            "prefill_budget": f"{P}-token prompts need {a['prefill_chunks']} steps of {C} tokens each while a stream "
                              f"stays {O} steps: the chunk budget cannot keep up",
            "tpot": f"prefill interference breaks the TPOT SLO: aggregated TPOT {_ms(a['tpot_s'])} (decode step "
                    f"{_ms(a['decode_step_s'])} + {_ms(a['prefill_s_per_request'])} of prefill per request, spread "
                    f"over {O} tokens) > {_ms(req.tpot_s)}",
            "ttft": f"chunked prefill breaks the TTFT SLO: {a['prefill_chunks']} step(s) of {C} tokens plus queueing "
                    f"give TTFT {ttft} > {req.ttft_s} s",
            }.get(a["limited_by"], "it misses the SLO")


def verdict(req: PlanRequest, a: dict | None, d: dict) -> tuple[str | None, str]:
    """(winner, one line): "aggregated" or "disaggregated" (None when neither works) and why."""
    a_ok = a is not None and a["meets_slo"] and (bool(req.batch) or a["within_budget"])
    d_ok = d["meets_slo"] and (bool(req.batch) or d["within_budget"])
    if not a_ok and not d_ok:
        why = _agg_failure(req, a) if a is not None and not a["meets_slo"] else "over the GPU budget"
        return None, f"neither: disaggregated misses the SLO or the budget; aggregated: {why}"
    if not a_ok:
        why = _agg_failure(req, a) if a is not None and not a["meets_slo"] else \
            f"aggregated needs {a['gpus']} GPUs, over the budget of {req.gpus}" if a else "no aggregated layout"
        return "disaggregated", f"disaggregated: {why}"
    agg = (f"{a['instances']} x {a['layout']}" if req.rate else a["layout"])
    dis = (f"{d['prefill_instances']} x {d['prefill_layout']} prefill + {d['decode_instances']} x "
           f"{d['decode_layout']} decode" if req.rate else f"{d['prefill_layout']} + {d['decode_layout']}")
    if not d_ok:
        return "aggregated", f"aggregated: {agg} meets the SLO; disaggregated ({dis}) does not, or exceeds --gpus"
    ga, gd = a["goodput_rps_per_gpu"], d["goodput_rps_per_gpu"]
    per_gpu = (f"{ga:.3g} req/s per GPU vs {gd:.3g} disaggregated" if ga >= gd else
               f"{gd:.3g} req/s per GPU vs {ga:.3g} aggregated")
    cost = (f"chunked prefill adds {_ms(a['tpot_s'] - a['decode_step_s'])} of TPOT "
            f"({a['chunk_share']:.0%} of steps carry a chunk)")
    if req.rate and a["gpus"] != d["gpus"]:
        if a["gpus"] < d["gpus"]:
            return "aggregated", (f"aggregated: {_gpus(a['gpus'])} ({agg}) vs {d['gpus']} ({dis}): at "
                                  f"{req.rate:g} req/s a separate prefill instance and the KV handoff cost more "
                                  f"than the interference; {cost}")
        return "disaggregated", (f"disaggregated: {_gpus(d['gpus'])} ({dis}) vs {a['gpus']} ({agg}): "
                                 f"{_limit_reason(req, a)} ({per_gpu})")
    same = f"same {_gpus(a['gpus'])}, " if req.rate else f"at batch {req.batch}, "
    if ga >= gd:
        return "aggregated", f"aggregated: {same}more goodput per GPU ({per_gpu}); {cost}"
    return "disaggregated", f"disaggregated: {same}more goodput per GPU ({per_gpu}): {_limit_reason(req, a)}"


def local_prefill_max_tokens(req: PlanRequest, result: dict) -> tuple[int | None, str]:
    """Conditional disaggregation (module doc): the suggested ``--local-prefill-max-tokens``."""
    d = result["recommendation"]["decode"]
    if req.tpot_s is None or not d.get("layout"):
        return None, "give --tpot to size --local-prefill-max-tokens"
    lay = Layout(d["tp"], d["pp"], d["cp"], d["ep"])
    step = lambda n: d["tpot_s"] + chunk_prefill_time(req.model, req.hardware, lay, req.options, n,  # noqa: E731
                                                      max(0, req.prompt - n)).total_s
    best = 0
    for n in range(BLOCK, req.prefill_chunk_tokens + 1, BLOCK):
        if step(n) > req.tpot_s:
            break
        best = n
    if not best:
        return 0, (f"0 (the default): even {BLOCK} tokens of local prefill push a decode step past the TPOT target "
                   f"({_ms(step(BLOCK))} > {_ms(req.tpot_s)})")
    return best, (f"--local-prefill-max-tokens {best}: a prompt whose uncached part is at most {best} tokens (a "
                  f"conversation's next turn) prefills on its decode instance in one step ({_ms(step(best))} <= "
                  f"{_ms(req.tpot_s)} TPOT), without the KV handoff and the prefill queue")


def compare(req: PlanRequest, result: dict) -> dict:
    """The plan's ``aggregated_vs_disaggregated`` section (module doc)."""
    lays = [Layout(c["tp"], c["pp"], c["cp"], c["ep"]) for c in result["candidates"] if c["pool"] == "decode"]
    cands = aggregated_candidates(req, sorted(set(lays), key=lambda lay: (lay.gpus, lay.pp, lay.tp, lay.ep)))
    a = cands[0] if cands else None
    d = disaggregated_summary(req, result)
    winner, line = verdict(req, a, d)
    out = {"winner": winner, "verdict": line, "prefill_chunk_tokens": req.prefill_chunk_tokens,
           "aggregated": a, "disaggregated": d, "local_prefill_max_tokens": None, "local_prefill_note": "",
           "aggregated_layouts": [{k: c[k] for k in ("layout", "instances", "gpus", "batch", "sequences", "ttft_s",
                                                     "tpot_s", "goodput_rps_per_gpu", "meets_slo", "limited_by")}
                                  for c in cands]}
    if winner == "disaggregated":
        out["local_prefill_max_tokens"], out["local_prefill_note"] = local_prefill_max_tokens(req, result)
    return out
