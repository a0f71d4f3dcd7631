"""Expert-parallel load balancing: decode step time and hotspot ratio before and after a live
rebalance, and what the switch costs, at EP 2 and EP 4 (gloo, CPU).

Run: ``python bench/eplb.py [--eps 2,4] [--seqs 32] [--steps 20] [--hidden 256]
[--intermediate 1024] [--layers 4]``.

Model: a seeded tiny Mixtral from ``tests.moe_models.make_tiny_mixtral`` (8 experts, top-2)
with the router biased towards experts 6 and 7 (``hot_experts={6: bias, 7: 0.7 * bias}``,
``--bias`` default 4.0, which at hidden 256 sends most pairs of every layer to them), which
the default EP split puts on the last EP rank; hidden / intermediate sizes are flags so the
expert matmuls, not the per-step overhead, dominate a step.

Per EP degree (``--redundant-experts`` = ep, so EP 2 has 5 slots per rank and EP 4 has 3), every
rank: loads its shard, switches to the *default* placement with the redundant slots (experts
``i % E``), prefills ``--seqs`` prompts of 16 random tokens, runs 3 warm-up decode steps, then
``--steps`` timed decode steps ("before"); computes the balanced placement from the expert
counts of those steps (``services.experts.placement.balance``, identical on every rank), applies it
(``engine.expert_move.apply_placement``: weights moved between ranks over gloo) and runs
``--steps`` more ("after"). A step is timed between two barriers; the table gives the median
over steps of the slowest rank. Hotspot ratio = max / mean over EP ranks of the (token, expert)
pairs each rank actually computed during the phase (``MoEBlock.rank_pairs``), averaged over
layers. MoE compute: per rank, the time inside the MoE blocks minus their all-reduce (which
waits for the slowest rank), per step; the table gives the slowest rank's. Switch time: barrier to barrier around ``apply_placement``, slowest rank. Timings on a
shared 2-core machine are indicative (EP 4 runs 4 rank processes on 2 cores).
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


def _rank(groups, path: str, seqs: int, steps: int, redundant: int) -> dict:
    import torch
    import torch.distributed as dist

    from engine.batch import ForwardBatch
    from common.model import CacheConfig
    from engine.expert_placement import default_placement
    from services.experts.placement import balance
    from engine.loader import load_model

    torch.set_num_threads(1)
    config, model = load_model(path, groups=groups)
    moe_s = _time_moe(model, dist)
    ep, e = groups.ep.size, config.num_experts
    model.apply_placement({layer: default_placement(e, ep, redundant) for layer in model.moe_blocks()})
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (16,), generator=gen).tolist() for _ in range(seqs)]
    per_seq = -(-(16 + 3 + 2 * steps + 1) // 16)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    kv = model.allocate_kv_cache(CacheConfig(block_size=16, num_blocks=per_seq * seqs))
    with torch.inference_mode():
        out = [[t] for t in model(ForwardBatch.prefill(prompts, tables, 16), kv).argmax(-1).tolist()]

        def step() -> float:
            batch = ForwardBatch.decode([o[-1] for o in out], [16 + len(o) - 1 for o in out], tables, 16)
            dist.barrier(group=groups.ep.group)
            t0 = time.perf_counter()
            for o, tok in zip(out, model(batch, kv).argmax(-1).tolist()):
                o.append(tok)
            dist.barrier(group=groups.ep.group)
            return time.perf_counter() - t0

        def phase() -> tuple[list[float], dict]:
            pairs0, counts0 = model.rank_pairs(), model.expert_counts()
            moe_s["compute"] = 0.0
            times = [step() for _ in range(steps)]
            loads = {i: (c - counts0[i]).tolist() for i, c in model.expert_counts().items()}
            return times, {"pairs0": pairs0, "pairs1": model.rank_pairs(), "loads": loads,
                           "moe_ms": moe_s["compute"] / steps * 1e3}

        for _ in range(3):
            step()
        t_before, before = phase()
        new = {layer: balance(loads, ep, default_placement(e, ep, redundant).slots)
               for layer, loads in before["loads"].items()}
        dist.barrier(group=groups.ep.group)
        t0 = time.perf_counter()
        moved = model.apply_placement(new)
        dist.barrier(group=groups.ep.group)
        switch_s = time.perf_counter() - t0
        t_after, after = phase()
    return {"moe_before": before["moe_ms"], "moe_after": after["moe_ms"],
            "before": t_before, "after": t_after, "switch_s": switch_s, "bytes": moved["bytes_sent"],  # sent only
            "moved": moved["moved"], "pairs": (before["pairs0"], before["pairs1"], after["pairs0"], after["pairs1"]),
            "tokens": out}


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
    from common.layout import ParallelConfig
    from engine.runtime.spawn import spawn_ranks
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
        res = spawn_ranks(ParallelConfig(ep=ep), _rank, tmp, args.seqs, args.steps, ep, timeout_s=900)
        assert all(r["tokens"] == res[0]["tokens"] for r in res), "ranks disagree on the tokens"
        per_rank = [r["pairs"] for r in res]

        def gathered(k):  # {layer: [pairs of EP rank 0..ep-1]} at snapshot k
            return {layer: [per_rank[r][k][layer] for r in range(ep)] for layer in per_rank[0][k]}

        hot_before = _hotspot(gathered(0), gathered(1))
        hot_after = _hotspot(gathered(2), gathered(3))
        before = statistics.median(max(r["before"][i] for r in res) for i in range(args.steps)) * 1e3
        after = statistics.median(max(r["after"][i] for r in res) for i in range(args.steps)) * 1e3
        switch = max(r["switch_s"] for r in res) * 1e3
        slots = (8 + ep) // ep
        moe = f"{max(r['moe_before'] for r in res):.1f} / {max(r['moe_after'] for r in res):.1f}"
        print(f"| {ep} | {slots} | {hot_before:.2f} | {hot_after:.2f} | {moe} | {before:.2f} | {after:.2f} | "
              f"{before / after:.2f}x | {switch:.1f} | {sum(r['moved'] for r in res) // 2} | "
              f"{sum(r['bytes'] for r in res) / 1e6:.2f} MB |")


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
