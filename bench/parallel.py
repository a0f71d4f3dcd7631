"""Decode throughput of the engine vs pipeline / tensor parallel layout, on this machine (gloo, CPU).

Run: ``python bench/parallel.py [--model PATH|smollm2] [--layouts 1x1,1x2,2x1] [--seqs 8]
[--new-tokens 32]`` (layouts as ``TPxPP``). Without ``--model`` a tiny random Llama (8 heads,
4 layers) is built in a temporary directory. Each PP > 1 layout runs twice, with and without
micro-batching (``engine.pipeline.PipelineRunner``). The table gives decode tokens/s
(rounds after the prefill, the slowest rank) and the share of step time a rank spends waiting
in point-to-point receives (activations and sampled tokens): the pipeline bubble plus
transfer time. Timings on a shared 2-core machine are indicative only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(groups, path, prompts, new_tokens, micro):
    from engine.offline import load_model_shard
    from engine.pipeline import PipelineRunner

    _, model = load_model_shard(groups, path)
    runner = PipelineRunner(model, groups, micro_batching=micro)
    tokens, _ = runner.generate(prompts, new_tokens, stop_at_eos=False)
    return {"decoded": sum(len(t) - 1 for t in tokens), **runner.timings}


def main() -> None:
    from engine.config import ParallelConfig
    from engine.parallel import spawn_ranks
    from tests.models import make_tiny_llama

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--layouts", default="1x1,1x2,2x1,1x4")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    path = args.model or make_tiny_llama(tmp, seed=0, num_hidden_layers=4)
    prompts = [list(range(10 + i, 30 + 3 * i)) for i in range(args.seqs)]
    print(f"{'layout':>8} {'micro':>6} {'decode tok/s':>13} {'recv share':>11}")
    for spec in args.layouts.split(","):
        tp, pp = (int(x) for x in spec.split("x"))
        for micro in ((True, False) if pp > 1 else (True,)):
            res = spawn_ranks(ParallelConfig(tp=tp, pp=pp), _rank, path, prompts, args.new_tokens,
                              micro, timeout_s=600)
            decode = max(r["decode"] for r in res)
            share = max(r["recv"] / r["total"] for r in res)
            print(f"{spec:>8} {str(micro):>6} {res[0]['decoded'] / decode:>13.1f} {share:>10.0%}")


if __name__ == "__main__":
    main()
