"""Validate ``cleave plan``'s cost model on this machine: predicted vs measured prefill and decode.

Run: ``python bench/capacity.py [--profile FILE] [--calibrate] [--repeats 3] [--no-smollm2]``.

1. The ``local`` profile: read from ``--profile`` (default: the one ``cleave plan --calibrate``
   writes), measured first when missing or with ``--calibrate``.
2. For each case — a model (tiny Llama: 4 layers, hidden 64, 8 heads / 4 KV heads; tiny
   Mixtral: the same with 8 experts, top-2; SmolLM2-135M), a phase and a layout — the cost
   model predicts the time (``services.capacity.cost``: fp32 weights, KV and activations,
   EP as the engine's all-reduce) and ``bench/parallel.py``'s rank functions measure it over
   real gloo ranks: prefill = one prompt's forward (median of ``--repeats``, slowest rank);
   decode = ``bench/parallel.py``'s ``decode_run`` (``engine.llm_engine.LLMEngine``) over 8
   sequences, the decode steps' time divided by their count (micro-batched when PP > 1).
3. Prints each case's error ``(predicted - measured) / measured``, the median and the worst
   absolute error; first, the wall time of issue 14's "done when" ``cleave plan`` command, and
   the gloo collective times against the alpha-beta formula fitted to them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEQS, NEW_TOKENS = 8, 16
PROMPTS = [list(range(10 + i, 30 + 3 * i)) for i in range(SEQS)]     # bench/parallel.py's decode prompts

# (model, phase, tp, pp, cp, ep, prompt tokens for prefill)
CASES = [
    ("tiny", "prefill", 1, 1, 1, 1, 512), ("tiny", "prefill", 2, 1, 1, 1, 512),
    ("tiny", "prefill", 4, 1, 1, 1, 512), ("tiny", "prefill", 1, 1, 2, 1, 512),
    ("tiny", "prefill", 2, 1, 2, 1, 512),
    ("tiny", "decode", 1, 1, 1, 1, 0), ("tiny", "decode", 2, 1, 1, 1, 0), ("tiny", "decode", 4, 1, 1, 1, 0),
    ("tiny", "decode", 1, 2, 1, 1, 0), ("tiny", "decode", 1, 3, 1, 1, 0), ("tiny", "decode", 2, 2, 1, 1, 0),
    ("moe", "prefill", 1, 1, 1, 2, 256), ("moe", "decode", 1, 1, 1, 1, 0), ("moe", "decode", 1, 1, 1, 2, 0),
    ("moe", "decode", 2, 1, 1, 2, 0),
    ("smollm2", "prefill", 1, 1, 1, 1, 128), ("smollm2", "prefill", 3, 1, 1, 1, 128),
    ("smollm2", "decode", 1, 1, 1, 1, 0), ("smollm2", "decode", 1, 2, 1, 1, 0),
]


DONE_WHEN = ["plan", "--model", "llama-3.1-70b", "--hardware", "h100", "--gpus", "16", "--prompt", "2048",
             "--output", "256", "--rate", "10", "--ttft", "1", "--tpot", "0.05"]


def _cli_seconds(runs: int = 3) -> float:
    """Median wall time of issue 14's "done when" command as a fresh process (Python start included)."""
    import subprocess
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "services.cli", *DONE_WHEN], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(path, phase, layout, plen, repeats) -> float:
    from bench.parallel import _prefill_rank, decode_run
    from engine.runtime.spawn import spawn_ranks
    if phase == "prefill":
        prompt = [(7 * i + 3) % 250 for i in range(plen)]
        res = spawn_ranks(layout, _prefill_rank, path, prompt, repeats, timeout_s=600)
        return statistics.median(max(r["times"][i] for r in res) for i in range(repeats))
    res = decode_run(path, layout, PROMPTS, NEW_TOKENS)
    return res["decode"] / (res["decoded"] / SEQS)


def _predict(spec, hw, phase, lay, plen) -> float:
    from services.capacity.cost import CostOptions, decode_step_time, prefill_time
    opts = CostOptions(weight_dtype="fp32", kv_dtype="fp32", ep_exchange="all_reduce", expert_imbalance=1.0)
    if phase == "prefill":
        return prefill_time(spec, hw, lay, opts, 1, plen).total_s
    ctx = statistics.mean(len(p) for p in PROMPTS) + NEW_TOKENS / 2
    # Executor.forward splits the 8 sequences into PP micro-batches: a step's batch is one of them
    return decode_step_time(spec, hw, lay, opts, SEQS / lay.pp, ctx).total_s


def main() -> None:
    from common.layout import ParallelConfig
    from engine.loader import resolve_model
    from services.capacity.calibrate import calibrate, calibration_table, collective_fit_table
    from services.capacity.cost import Layout
    from services.capacity.hardware import DEFAULT_PROFILE, Hardware, get_hardware
    from services.capacity.models import BUILTIN, get_model
    from tests.models import make_tiny_llama
    from tests.moe_models import make_tiny_mixtral

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=DEFAULT_PROFILE, help="calibrated profile (written when missing)")
    ap.add_argument("--calibrate", action="store_true", help="measure the profile even if the file exists")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefill forwards per case")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 cases (slow to load)")
    args = ap.parse_args()

    print(f"`cleave {' '.join(DONE_WHEN)}`: {_cli_seconds():.2f} s (median of 3, a fresh process each)")
    path = os.path.expanduser(args.profile)
    if args.calibrate or not os.path.isfile(path):
        import json
        t0 = time.perf_counter()
        hw = calibrate()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(hw.to_json(), f, indent=1)
        print(f"calibrated in {time.perf_counter() - t0:.0f} s -> {path}")
    hw: Hardware = get_hardware("local", path)
    print(calibration_table(hw))
    print(collective_fit_table(hw.measured))

    tmp = tempfile.mkdtemp()
    tiny = make_tiny_llama(os.path.join(tmp, "tiny"), seed=0, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, max_position_embeddings=1024)
    moe = make_tiny_mixtral(os.path.join(tmp, "moe"), seed=0)
    models = {"tiny": (tiny, get_model(tiny)), "moe": (moe, get_model(moe)),
              "smollm2": (resolve_model(""), BUILTIN["smollm2-135m"])}

    print("\n| model | phase | layout | ranks | predicted ms | measured ms | error |")
    print("|---|---|---|---|---|---|---|")
    errors, labels = [], []
    for name, phase, tp, pp, cp, ep, plen in CASES:
        if name == "smollm2" and args.no_smollm2:
            continue
        src, spec = models[name]
        lay = Layout(tp, pp, cp, ep)
        measured = _measure(src, phase, ParallelConfig(tp=tp, pp=pp, cp=cp, ep=ep), plen, args.repeats)
        predicted = _predict(spec, hw, phase, lay, plen)
        err = (predicted - measured) / measured
        errors.append(err)
        labels.append(f"{name} {phase} {lay.label()}")
        what = f"{phase} ({plen} tok)" if phase == "prefill" else f"decode step ({SEQS} seqs)"
        print(f"| {name} | {what} | {lay.label()} | {lay.gpus} | {predicted * 1e3:.1f} | {measured * 1e3:.1f} | "
              f"{err:+.0%} |", flush=True)
    absolute = [abs(e) for e in errors]
    print(f"\n{len(errors)} cases: median |error| {statistics.median(absolute):.0%}, "
          f"worst {max(absolute):.0%} ({labels[absolute.index(max(absolute))]})")


if __name__ == "__main__":
    main()
