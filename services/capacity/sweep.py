"""``cleave plan sweep``: vary one dimension, print the curve, mark where returns diminish or turn negative.

Who calls what: ``cleave plan sweep --vary DIM`` (``services.capacity.cli``) builds a
:class:`SweepRequest` and calls :func:`sweep`; :func:`format_sweep` prints it (``--format json``
prints the dict).

Dimensions: ``tp``, ``pp`` (the base layout ``--tp/--pp/--ep`` with one of them replaced),
``link-bw`` (GB/s per link and direction; the profile's other figures kept), ``batch`` (prompts
per prefill pass and sequences per decode step), ``prompt`` (tokens).

Each point, latency at equal load: a prefill pass (TTFT) of ``--batch`` prompts and a decode
step (TPOT: one sequence's time per token) of ``--batch`` sequences (1 when not given), with the
share of each spent communicating and the TP all-reduce's algorithm; capacity: the decode
instance's tokens/s at the largest power-of-two step batch whose KV fits and whose TPOT meets
``--tpot`` (``memory.max_decode_batch``: each layout at the batch its memory allows; PP keeps
micro-batches in flight, ``sequences``), per GPU, and goodput per GPU (0 where nothing fits or
the TTFT misses ``--ttft``). Sweeping ``batch``, both use the value.

Returns. Between a point and the one before, the elasticity of a benefit ``B`` with respect to
the varied value ``x``: ``e = ln(B_i / B_(i-1)) / ln(x_i / x_(i-1))``, ``B`` = 1/TTFT, 1/TPOT or
tokens/s. ``e = 1`` is linear (twice the GPUs, twice as fast). A point is ``diminishing`` when
``0 <= e < threshold`` (default 0.5: doubling buys less than 2^0.5 = 1.41x) and ``negative``
when ``e < 0`` (worse than the point before). Benefits: tp, pp, link-bw: TTFT, TPOT and decode
tokens/s; batch: prefill and decode tokens/s; prompt: prefill tokens/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from services.capacity.cost import CostOptions, Layout, decode_step_time, decode_throughput, prefill_time
from services.capacity.hardware import GB, Hardware, with_overrides
from services.capacity.memory import max_decode_batch, memory_per_gpu
from services.capacity.models import ModelSpec

DIMENSIONS = ("tp", "pp", "link-bw", "batch", "prompt")
BENEFITS = {"tp": ("ttft", "tpot", "decode_tok_s"), "pp": ("ttft", "tpot", "decode_tok_s"),
            "link-bw": ("ttft", "tpot", "decode_tok_s"), "batch": ("prefill_tok_s", "decode_tok_s"),
            "prompt": ("prefill_tok_s",)}
_LABEL = {"ttft": "TTFT", "tpot": "TPOT", "decode_tok_s": "decode tok/s", "prefill_tok_s": "prefill tok/s"}


def default_values(vary: str, hw: Hardware) -> tuple:
    """The values swept when ``--values`` is not given."""
    if vary == "link-bw":
        return tuple(hw.link_bw / GB * f for f in (0.25, 0.5, 1, 2, 4))
    return {"tp": (1, 2, 4, 8, 16), "pp": (1, 2, 4, 8), "batch": (1, 4, 16, 64, 256, 1024),
            "prompt": (512, 1024, 2048, 4096, 8192, 16384, 32768)}[vary]


@dataclass(frozen=True)
class SweepRequest:
    """One sweep: ``vary`` over increasing ``values``; times in seconds, link-bw in GB/s."""

    model: ModelSpec
    hardware: Hardware
    vary: str
    values: tuple
    prompt: int
    output: int
    base: Layout = field(default_factory=Layout)
    batch: int = 0                     # 0: prefill 1 prompt, decode the largest batch that fits
    ttft_s: float | None = None
    tpot_s: float | None = None
    threshold: float = 0.5
    options: CostOptions = field(default_factory=CostOptions)

    def __post_init__(self) -> None:
        if self.vary not in DIMENSIONS:
            raise ValueError(f"--vary must be one of {', '.join(DIMENSIONS)}, got {self.vary!r}")
        if len(self.values) < 2 or any(v <= 0 for v in self.values):
            raise ValueError(f"a sweep needs at least two positive values, got {list(self.values)}")
        if any(b <= a for a, b in zip(self.values, self.values[1:])):
            raise ValueError(f"sweep values must increase, got {list(self.values)}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        for name in ("prompt", "output"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch < 0:
            raise ValueError(f"batch must be >= 0, got {self.batch}")


def _point(req: SweepRequest, value: float) -> dict:
    hw, lay, batch, prompt, model, opt = req.hardware, req.base, req.batch, req.prompt, req.model, req.options
    if req.vary in ("tp", "pp"):
        lay = replace(lay, **{req.vary: int(value)})
    elif req.vary == "link-bw":
        hw = with_overrides(hw, link_bw=value * GB)
    elif req.vary == "batch":
        batch = int(value)
    else:
        prompt = int(value)
    out = {"value": value, "layout": lay.label(), "gpus": lay.gpus}
    problem = lay.problem(model)
    if problem:
        return {**out, "problem": problem}
    ctx, per_seq, b = prompt + req.output / 2, prompt + req.output, batch or 1
    pre = prefill_time(model, hw, lay, opt, b, prompt)
    dec = decode_step_time(model, hw, lay, opt, b, ctx)
    cap_batch = b if req.vary == "batch" else max_decode_batch(model, hw, lay, opt, per_seq)
    cap = decode_step_time(model, hw, lay, opt, cap_batch, ctx) if cap_batch else None
    while cap and req.tpot_s is not None and cap.total_s > req.tpot_s and cap_batch > 1:
        cap_batch //= 2
        cap = decode_step_time(model, hw, lay, opt, cap_batch, ctx)
    fits = cap is not None and memory_per_gpu(model, hw, lay, opt, cap.sequences * per_seq, cap_batch).fits
    tput = decode_throughput(cap) if fits else 0.0
    meets = fits and (req.ttft_s is None or pre.total_s <= req.ttft_s) and \
        (req.tpot_s is None or cap.total_s <= req.tpot_s)
    return {**out, "batch": b, "fits": fits, "ttft_s": pre.total_s, "tpot_s": dec.total_s,
            "capacity_batch": cap_batch, "sequences": cap.sequences if fits else 0,
            "prefill_tok_s": b * prompt / pre.total_s, "decode_tok_s": tput, "decode_tok_s_per_gpu": tput / lay.gpus,
            "goodput_tok_s_per_gpu": tput / lay.gpus if meets else 0.0,
            "prefill_comm_share": pre.comm_share, "decode_comm_share": dec.comm_share,
            "prefill_tp_algorithm": pre.tp_algorithm, "decode_tp_algorithm": dec.tp_algorithm, "marks": {},
            "elasticity": {}}


def _benefit(p: dict, name: str) -> float:
    v = p.get(f"{name}_s") if name in ("ttft", "tpot") else p.get(name)
    if not v:
        return 0.0
    return 1.0 / v if name in ("ttft", "tpot") else v


def mark_returns(points: list[dict], benefits: tuple, threshold: float) -> dict:
    """Fill each point's ``elasticity`` and ``marks`` (module doc); return, per benefit, the
    first value whose returns diminish and the values whose returns are negative."""
    summary = {b: {"diminishing_from": None, "negative_at": []} for b in benefits}
    valid = [p for p in points if "problem" not in p]
    for prev, cur in zip(valid, valid[1:]):
        ratio = math.log(cur["value"] / prev["value"])
        for b in benefits:
            old, new = _benefit(prev, b), _benefit(cur, b)
            if not (old and new):
                continue
            e = math.log(new / old) / ratio
            cur["elasticity"][b] = e
            if e < 0:
                cur["marks"][b] = "negative"
                summary[b]["negative_at"].append(cur["value"])
            elif e < threshold:
                cur["marks"][b] = "diminishing"
            if e < threshold and summary[b]["diminishing_from"] is None:
                summary[b]["diminishing_from"] = cur["value"]
    return summary


def sweep(req: SweepRequest) -> dict:
    """The curve: ``{"inputs", "vary", "threshold", "points": [...], "returns": {benefit: ...}}``."""
    points = [_point(req, v) for v in req.values]
    returns = mark_returns(points, BENEFITS[req.vary], req.threshold)
    hw = req.hardware
    inputs = {"model": req.model.name, "hardware": hw.name, "topology": hw.topology, "links_per_gpu": hw.links_per_gpu,
              "link_bw": hw.link_bw, "nic_bw": hw.nic_bw, "gpus_per_node": hw.gpus_per_node, "prompt": req.prompt,
              "output": req.output, "batch": req.batch or None, "base_layout": req.base.label(),
              "ttft_s": req.ttft_s, "tpot_s": req.tpot_s, "weight_dtype": req.options.weight_dtype}
    return {"inputs": inputs, "vary": req.vary, "threshold": req.threshold, "points": points, "returns": returns}


def _v(value: float) -> str:
    return f"{value:g}"


def format_sweep(result: dict) -> str:
    """The sweep as a table, one row per value, and a line per benefit naming the knee."""
    i, vary = result["inputs"], result["vary"]
    batch = f"TTFT/TPOT at batch {i['batch'] or 1}" + ("" if vary == "batch" else
                                                         ", tok/s at the largest step batch that fits (cap)")
    lines = [f"cleave plan sweep: {i['model']} ({i['weight_dtype']}) on {i['hardware']} ({i['topology']}: "
             f"{i['links_per_gpu']} x {i['link_bw'] / GB:g} GB/s links per GPU, NIC {i['nic_bw'] / GB:g} GB/s, "
             f"{i['gpus_per_node']} per node); vary {vary} from {i['base_layout']}; prompt {i['prompt']}, output "
             f"{i['output']}; {batch}; returns diminish below elasticity {result['threshold']:g}"]
    head = (f"{vary:>8} {'layout':<12} {'GPUs':>4} {'TTFT ms':>9} {'TPOT ms':>8} {'comm P/D':>9} "
            f"{'TP alg P/D':>17} {'cap':>5} {'seqs':>5} {'dec tok/s':>9} {'tok/s/GPU':>9} {'good/GPU':>8}  marks")
    lines += [head, "-" * len(head)]
    for p in result["points"]:
        if "problem" in p:
            lines.append(f"{_v(p['value']):>8} {p['layout']:<12} {p['gpus']:>4}  not a layout: {p['problem']}")
            continue
        marks = ", ".join(f"{_LABEL[b]} {m}" for b, m in p["marks"].items())
        if not p["fits"]:
            marks = ", ".join(s for s in ("no-fit", marks) if s)
        algs = f"{p['prefill_tp_algorithm'] or '-'}/{p['decode_tp_algorithm'] or '-'}"
        lines.append(f"{_v(p['value']):>8} {p['layout']:<12} {p['gpus']:>4} {p['ttft_s'] * 1e3:>9.1f} "
                     f"{p['tpot_s'] * 1e3:>8.2f} {p['prefill_comm_share']:>4.0%}/{p['decode_comm_share']:<4.0%} "
                     f"{algs:>17} {p['capacity_batch']:>5} {p['sequences']:>5.0f} {p['decode_tok_s']:>9.0f} "
                     f"{p['decode_tok_s_per_gpu']:>9.0f} {p['goodput_tok_s_per_gpu']:>8.0f}  {marks}")
    lines.append("")
    for b, r in result["returns"].items():
        dim = f"diminishing from {vary}={_v(r['diminishing_from'])}" if r["diminishing_from"] is not None \
            else "no diminishing returns"
        neg = f"negative at {vary}={', '.join(_v(v) for v in r['negative_at'])}" if r["negative_at"] else "none negative"
        lines.append(f"{_LABEL[b]}: {dim}; {neg}")
    return "\n".join(lines)
