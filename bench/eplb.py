"""Expert-parallel load balancing: decode step time and hotspot ratio before and after a live
rebalance, and what the switch costs, at EP 2 and EP 4 (gloo, CPU).

Run: ``python bench/eplb.py [--eps 2,4] [--seqs 32] [--steps 20] [--hidden 256]
[--intermediate 1024] [--layers 4]``.

Model: a seeded tiny Mixtral from ``tests.moe_models.make_tiny_mixtral`` (8 experts, top-2)
with the router biased towards experts 6 and 7 (``hot_experts={6: bias, 7: 0.7 * bias}``,
``--bias`` default 4.0, which at hidden 256 sends most pairs of every layer to them), which
the default EP split puts on the last EP rank; hidden / intermediate sizes are flags so the
expert matmuls, not the per-step overhead, dominate a step.

Per EP degree (``--redundant-experts`` = ep, so EP 2 has 5 slots per rank and EP 4 has 3), one
``engine.llm_engine.LLMEngine`` (the serving scheduler and executor, its EP ranks spawned)
switches to the *default* placement with the redundant slots (experts ``i % E``), prefills
``--seqs`` prompts of 16 random tokens, runs 3 warm-up decode steps, then ``--steps`` timed
decode steps ("before"); computes the balanced placement from the expert counts of those steps
(``services.experts.placement.balance``), applies it (``Executor.apply_placement``: weights
moved between ranks over gloo, between two steps) and runs ``--steps`` more ("after"). A step is
one ``LLMEngine.step()`` timed on rank 0 (every rank's share of a step ends before it returns);
the table gives the median over steps. Hotspot ratio = max / mean over EP ranks of the
(token, expert) pairs each rank actually computed during the phase (``Executor.rank_pairs``),
averaged over layers. MoE compute: per rank, the time inside the MoE blocks minus their
all-reduce (which waits for the slowest rank), per step; the table gives the slowest rank's.
Switch time: the ``apply_placement`` call. Timings on a shared 2-core machine are indicative
(EP 4 runs 4 rank processes on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def _hotspot(before: dict, after: dict) -> float:
    ratios = []
    for layer in before:
        delta = [b - a for a, b in zip(before[layer], after[layer])]
        ratios.append(max(delta) * len(delta) / max(1, sum(delta)))
    return sum(ratios) / len(ratios)


def _measure(path: str, ep: int, seqs: int, steps: int, redundant: int) -> dict:
    """Before / after a live rebalance on one engine of EP ``ep`` (see the module docstring)."""
    import torch

    from common.layout import ParallelConfig
    from engine.expert_placement import default_placement
    from engine.llm_engine import LLMEngine
    from engine.runtime.config import RuntimeConfig
    from services.experts.placement import balance

    new_tokens = 3 + 2 * steps + 1
    cfg = RuntimeConfig(model=path, device="cpu", transport="tcp", threads=1, parallel=ParallelConfig(ep=ep),
                        max_batch=seqs, num_blocks=seqs * (2 + (16 + new_tokens) // 16))
    with LLMEngine(cfg) as engine:
        ex, e = engine.executor, engine.model_config.num_experts
        layers = range(engine.model_config.num_layers)
        ex.apply_placement({layer: default_placement(e, ep, redundant) for layer in layers})
        ex.run_on_ranks(_moe_timers_on)
        gen = torch.Generator().manual_seed(0)
        for _ in range(seqs):
            engine.add_request(torch.randint(0, 256, (16,), generator=gen).tolist(), max_tokens=new_tokens,
                               ignore_eos=True)
        engine.step()                                          # the prefill of every prompt

        def step() -> float:
            t0 = time.perf_counter()
            engine.step()
            return time.perf_counter() - t0

        def phase() -> tuple[list[float], dict]:
            pairs0, counts0 = ex.rank_pairs(), ex.expert_counts()
            ex.run_on_ranks(_moe_compute)                       # reset the MoE timers
            times = [step() for _ in range(steps)]
            loads = {i: [b - a for a, b in zip(counts0[i], c)] for i, c in ex.expert_counts().items()}
            return times, {"pairs0": pairs0, "pairs1": ex.rank_pairs(), "loads": loads,
                           "moe_ms": max(ex.run_on_ranks(_moe_compute)) / steps * 1e3}

        for _ in range(3):
            step()
        t_before, before = phase()
        new = {layer: balance(loads, ep, default_placement(e, ep, redundant).slots)
               for layer, loads in before["loads"].items()}
        t0 = time.perf_counter()
        moved = ex.apply_placement(new)
        switch_s = time.perf_counter() - t0
        t_after, after = phase()
    return {"moe_before": before["moe_ms"], "moe_after": after["moe_ms"], "before": t_before, "after": t_after,
            "switch_s": switch_s, "bytes": moved["bytes"], "moved": moved["moved"],
            "pairs": (before["pairs0"], before["pairs1"], after["pairs0"], after["pairs1"])}


def _moe_timers_on(runner) -> None:
    """On every rank (``Executor.run_on_ranks``): time this rank's MoE blocks from now."""
    import torch.distributed as dist
    runner.bench_moe = _time_moe(runner.model, dist)


def _moe_compute(runner) -> float:
    """This rank's MoE compute seconds since the last call (and start again from 0)."""
    seconds, runner.bench_moe["compute"] = runner.bench_moe["compute"], 0.0
    return seconds


def _time_moe(model, dist) -> dict:
    """Wrap this rank's MoE blocks and ``dist.all_reduce`` so that ``out["compute"]`` collects
    the seconds spent in the blocks minus the all-reduce (which also waits for slower ranks)."""
    out = {"compute": 0.0, "reduce": 0.0}
    reduce = dist.all_reduce

    def timed_reduce(*a, **kw):
        t0 = time.perf_counter()
        try:
            return reduce(*a, **kw)
        finally:
            out["reduce"] += time.perf_counter() - t0

    dist.all_reduce = timed_reduce
    for block in model.moe_blocks().values():
        def timed(x, _forward=block.forward):
            t0, r0 = time.perf_counter(), out["reduce"]
            y = _forward(x)
            out["compute"] += time.perf_counter() - t0 - (out["reduce"] - r0)
            return y
        block.forward = timed
    return out


def run(args) -> None:
    from tests.moe_models import make_tiny_mixtral

    tmp = tempfile.mkdtemp(prefix="cleave-eplb-")
    make_tiny_mixtral(tmp, seed=0, hot_experts={6: args.bias, 7: 0.7 * args.bias}, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers)
    print(f"skewed tiny Mixtral: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"8 experts top-2, router biased to experts 6 and 7; {args.seqs} sequences, {args.steps} steps per phase\n")
    print("| EP | slots/rank | hotspot before | hotspot after | MoE compute, slowest rank before / after (ms/step) | "
          "step before (ms) | step after (ms) | step speed-up | switch (ms) | experts moved | bytes moved |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for ep in args.eps:
        r = _measure(tmp, ep, args.seqs, args.steps, ep)
        pairs = r["pairs"]                   # snapshots of {layer: [pairs of EP rank 0..ep-1]}
        hot_before = _hotspot(pairs[0], pairs[1])
        hot_after = _hotspot(pairs[2], pairs[3])
        before = statistics.median(r["before"]) * 1e3
        after = statistics.median(r["after"]) * 1e3
        slots = (8 + ep) // ep
        print(f"| {ep} | {slots} | {hot_before:.2f} | {hot_after:.2f} | {r['moe_before']:.1f} / {r['moe_after']:.1f} | "
              f"{before:.2f} | {after:.2f} | {before / after:.2f}x | {r['switch_s'] * 1e3:.1f} | {r['moved']} | "
              f"{r['bytes'] / 1e6:.2f} MB |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eps", default="2,4", help="EP degrees to measure, comma-separated")
    p.add_argument("--seqs", type=int, default=32, help="sequences in the decode batch")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps before and after the switch")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny model")
    p.add_argument("--intermediate", type=int, default=1024, help="expert intermediate size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--bias", type=float, default=4.0, help="router bias towards expert 6 (0.7x for expert 7)")
    args = p.parse_args()
    args.eps = [int(x) for x in args.eps.split(",") if x]
    run(args)


if __name__ == "__main__":
    main()
