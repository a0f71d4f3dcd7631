"""The sweep figure of the README: Llama 3.1 70B and 405B over TP on a switch node and an
all-to-all node, where more GPUs stop paying (``cleave plan sweep`` on datasheet profiles).

Run: ``python bench/capacity_sweep.py [--png bench/capacity_sweep.png] [--prompt 8192]``.
Prints one markdown table per model (TTFT of one prompt, TPOT at batch 1, decode tok/s per GPU
at the largest batch that fits, prefill communication share, returns marks) and, when
matplotlib is importable, writes the PNG (``pip install matplotlib``: it is not one of
Cleave's requirements). Pure arithmetic: well under a second without the plot.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = ("llama-3.1-70b", "llama-3.1-405b")
NODES = ("b200", "mi355x")            # NVSwitch (switch) and Infinity Fabric (full mesh), same generation
TPS = (1, 2, 4, 8)


def curves(prompt: int, output: int) -> dict:
    """``{(model, node): sweep result}`` of TP 1..8 at bf16, plus the mesh node on a switch
    (same links: ``<node>-as-switch``) to isolate the topology."""
    from services.capacity.cost import CostOptions
    from services.capacity.hardware import BUILTIN
    from services.capacity.models import BUILTIN as M
    from services.capacity.sweep import SweepRequest, sweep
    out = {}
    for model in MODELS:
        for node in NODES + (f"{NODES[1]}-as-switch",):
            hw = BUILTIN[node] if node in BUILTIN else replace(BUILTIN[NODES[1]], name=node, topology="switch")
            out[model, node] = sweep(SweepRequest(model=M[model], hardware=hw, vary="tp", values=TPS, prompt=prompt,
                                                  output=output, options=CostOptions()))
    return out


def table(results: dict) -> str:
    lines = []
    for model in MODELS:
        lines += [f"\n**{model}**\n", "| node | TP | TTFT ms | TPOT ms (batch 1) | decode tok/s per GPU | "
                  "prefill comm | all-reduce (prefill) | returns |", "|---|---|---|---|---|---|---|---|"]
        for (m, node), r in results.items():
            if m != model:
                continue
            for p in r["points"]:
                marks = ", ".join(f"{b} {v}" for b, v in p["marks"].items()) or "-"
                lines.append(f"| {node} | {p['value']:g} | {p['ttft_s'] * 1e3:.0f} | {p['tpot_s'] * 1e3:.2f} | "
                             f"{p['decode_tok_s_per_gpu']:.0f} | {p['prefill_comm_share']:.0%} | "
                             f"{p['prefill_tp_algorithm'] or '-'} | {marks} |")
    return "\n".join(lines)


def plot(results: dict, path: str, prompt: int) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    style = {NODES[0]: ("tab:green", "-"), NODES[1]: ("tab:red", "-"), f"{NODES[1]}-as-switch": ("tab:red", ":")}
    for col, model in enumerate(MODELS):
        for row, (key, label) in enumerate((("ttft_s", f"TTFT of one {prompt}-token prompt, s"),
                                            ("decode_tok_s_per_gpu", "decode tok/s per GPU (largest batch that fits)"))):
            ax = axes[row][col]
            for (m, node), r in results.items():
                if m != model:
                    continue
                pts = [p for p in r["points"] if "problem" not in p]
                xs, ys = [p["value"] for p in pts], [p[key] for p in pts]
                color, ls = style[node]
                ax.plot(xs, ys, marker="o", color=color, linestyle=ls, label=node)
                for p in pts:
                    mark = p["marks"].get("ttft" if key == "ttft_s" else "decode_tok_s")
                    if mark:
                        ax.annotate("negative" if mark == "negative" else "knee", (p["value"], p[key]),
                                    textcoords="offset points", xytext=(4, 6), fontsize=8, color=color)
            ax.set_xscale("log", base=2)
            ax.set_xticks(TPS, [str(t) for t in TPS])
            ax.set_xlabel("TP degree (GPUs)")
            ax.set_title(f"{model}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("cleave plan sweep --vary tp: switch (B200, NVSwitch) vs full mesh (MI355X, Infinity Fabric); "
                 "dotted: MI355X links on a switch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "capacity_sweep.png"))
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--output", type=int, default=256)
    args = ap.parse_args()
    results = curves(args.prompt, args.output)
    print(f"TP sweep, bf16, one {args.prompt}-token prompt (TTFT), batch 1 decode (TPOT), {args.output} output tokens")
    print(table(results))
    if plot(results, args.png, args.prompt):
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
