"""Prefill time vs TP / CP degree and decode throughput vs TP / PP layout, on this machine (gloo, CPU).

Run: ``python bench/parallel.py [--model PATH|smollm2] [--prefill-layouts 1x1,2x1,4x1,1x2,2x2]
[--prompt-len 512] [--repeats 3] [--layouts 1x1,1x2,2x1,1x4] [--seqs 8] [--new-tokens 32]``.
Prefill layouts are ``TPxCP``, decode layouts ``TPxPP``; an empty list skips that table. Without
``--model`` a tiny random Llama (8 heads, 4 kv heads, 4 layers, 1024 positions) is built in a
temporary directory; ``--model smollm2`` is the embedded GGUF (``engine.loader.resolve_model``).

Prefill table: every rank loads its shard, builds its batch of ONE prompt (``ForwardBatch.prefill``,
or ``ForwardBatch.prefill_cp`` when cp > 1: this CP rank's zigzag chunks, ring attention) and its
KV cache, runs one warm-up forward, then ``--repeats`` timed forwards, each between two barriers;
the time of a run is the slowest rank's, the table gives the median over runs.

Decode table: ``engine.llm_engine.LLMEngine`` (the serving path: the layout's ranks, prefill
through the executor, decode steps through the decode scheduler, a PP > 1 step as
micro-batches) over ``--seqs`` prompts, timed on rank 0. Decode tokens/s counts the steps after
the prefill.

Communication share: inside the rank processes only, ``torch.distributed.all_reduce`` /
``all_gather`` / ``send`` / ``recv`` / ``isend`` / ``irecv`` are wrapped to accumulate wall time
(a non-blocking op counts its post and its ``wait()``). "all-reduce %" is the time in collectives
(TP all-reduces; for CP also the two small ``all_gather``s of ring attention) and "send/recv %" the
time in point-to-point ops (CP ring K/V exchange, PP activations and tokens), both as a share of
the step time (prefill: the timed forwards; decode: the whole generation, prefill included),
the largest over ranks. A blocking receive or an all-reduce also waits for the slower
peer, so these shares include load imbalance and the pipeline bubble, not just transfer time.
Timings on a shared 2-core machine are indicative only: layouts with more than 2 ranks
oversubscribe the cores (each rank runs one torch thread).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- communication timing (installed in each rank process, never in library files) -------------

_COMM = {"coll": 0.0, "p2p": 0.0}


class _TimedWork:
    """A ``torch.distributed`` work handle whose ``wait()`` is counted as point-to-point time."""

    def __init__(self, work):
        self._work = work

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            _COMM["p2p"] += time.perf_counter() - t0

    def __getattr__(self, name):                      # is_completed, etc.
        return getattr(self._work, name)


def _install_comm_timers() -> None:
    import torch.distributed as dist

    if getattr(dist, "_bench_timed", False):
        return

    def timed(fn, bucket, async_=False):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                _COMM[bucket] += time.perf_counter() - t0
            return _TimedWork(out) if async_ and out is not None else out
        return wrapper

    for name in ("all_reduce", "all_gather"):
        setattr(dist, name, timed(getattr(dist, name), "coll"))
    for name in ("send", "recv"):
        setattr(dist, name, timed(getattr(dist, name), "p2p"))
    for name in ("isend", "irecv"):
        setattr(dist, name, timed(getattr(dist, name), "p2p", async_=True))
    dist._bench_timed = True


def _reset_comm() -> dict[str, float]:
    snap = dict(_COMM)
    _COMM.update(coll=0.0, p2p=0.0)
    return snap


# ---- rank functions ----------------------------------------------------------------------------

def _prefill_rank(groups, path, prompt, repeats):
    import torch
    import torch.distributed as dist

    from engine.batch import ForwardBatch
    from common.model import CacheConfig
    from engine.loader import load_model

    _install_comm_timers()
    _, model = load_model(path, groups=groups)
    bs = 16
    table = list(range(-(-len(prompt) // bs)))
    cp = groups.cp.size
    if cp > 1:
        batch = ForwardBatch.prefill_cp(prompt, groups.cp_rank, cp, table, bs)
    else:
        batch = ForwardBatch.prefill([prompt], [table], bs)
    kv = model.allocate_kv_cache(CacheConfig(block_size=bs, num_blocks=len(table)))
    world = dist.is_initialized() and dist.get_world_size() > 1

    def barrier():
        if world:
            dist.barrier()

    times, coll, p2p = [], 0.0, 0.0
    with torch.inference_mode():
        for i in range(repeats + 1):                  # run 0 is the warm-up
            barrier()
            _reset_comm()
            t0 = time.perf_counter()
            model(batch, kv)
            dt = time.perf_counter() - t0
            comm = _reset_comm()
            barrier()
            if i:
                times.append(dt)
                coll += comm["coll"]
                p2p += comm["p2p"]
    return {"times": times, "coll": coll, "p2p": p2p, "tokens": int(batch.input_ids.numel())}


def _comm_timers_on(runner) -> None:
    """On every rank of an engine (``Executor.run_on_ranks``): count communication from now."""
    _install_comm_timers()
    _reset_comm()


def _comm_of(runner) -> dict[str, float]:
    return _reset_comm()


def decode_run(path, layout, prompts, new_tokens) -> dict:
    """One generation of ``new_tokens`` per prompt (EOS ignored) by an ``LLMEngine`` on
    ``layout`` (one torch thread per rank): seconds of the whole run (``total``) and of its
    decode steps (``decode``), the tokens those decoded, and each rank's communication
    seconds (``ranks``: ``coll`` / ``p2p``)."""
    from engine.llm_engine import LLMEngine
    from engine.runtime.config import RuntimeConfig

    blocks = len(prompts) * (2 + (max(map(len, prompts)) + new_tokens) // 16)
    cfg = RuntimeConfig(model=str(path), device="cpu", transport="tcp", threads=1, parallel=layout,
                        max_batch=len(prompts), num_blocks=blocks)
    with LLMEngine(cfg) as engine:
        engine.executor.run_on_ranks(_comm_timers_on)
        for p in prompts:
            engine.add_request(p, max_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        engine.step()                                   # the prefill of every prompt
        t1, decoded = time.perf_counter(), 0
        while engine.has_unfinished():
            decoded += sum(len(o.new_tokens) for o in engine.step())
        end = time.perf_counter()
        ranks = engine.executor.run_on_ranks(_comm_of)
    return {"decoded": decoded, "decode": end - t1, "total": end - t0, "ranks": ranks}


# ---- driver ------------------------------------------------------------------------------------

def _pairs(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in spec.split(",") if s.strip()]


def main() -> None:
    from common.layout import ParallelConfig
    from engine.loader import resolve_model
    from engine.runtime.spawn import spawn_ranks
    from tests.models import make_tiny_llama

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model path, or 'smollm2' for the embedded GGUF")
    ap.add_argument("--prefill-layouts", default="1x1,2x1,4x1,1x2,2x2", help="TPxCP list")
    ap.add_argument("--prompt-len", type=int, default=0, help="default 512 (tiny), 256 (other)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", default="1x1,1x2,2x1,1x4", help="decode TPxPP list")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.model:
        path = resolve_model("" if args.model.lower() == "smollm2" else args.model)
        name = path.model_id
    else:
        path = make_tiny_llama(tempfile.mkdtemp(), seed=0, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4,
                               max_position_embeddings=1024)
        name = "tiny Llama (4 layers, 8 heads / 4 kv heads, hidden 64)"
    plen = args.prompt_len or (256 if args.model else 512)
    prompt = [(7 * i + 3) % 250 for i in range(plen)]
    prompts = [list(range(10 + i, 30 + 3 * i)) for i in range(args.seqs)]

    prefill = _pairs(args.prefill_layouts)
    if prefill:
        print(f"\n### Prefill, {name}: one {plen}-token prompt, median of {args.repeats} "
              f"(slowest rank)\n")
        print("| layout | ranks | prefill ms | tokens/s | all-reduce % | send/recv % |")
        print("|---|---|---|---|---|---|")
        for tp, cp in prefill:
            layout = ParallelConfig(tp=tp, cp=cp)
            res = spawn_ranks(layout, _prefill_rank, path, prompt, args.repeats, timeout_s=600)
            runs = [max(r["times"][i] for r in res) for i in range(args.repeats)]
            med = statistics.median(runs)
            step = [sum(r["times"]) for r in res]
            coll = max(r["coll"] / s for r, s in zip(res, step))
            p2p = max(r["p2p"] / s for r, s in zip(res, step))
            label = " x ".join([f"TP{tp}"] * (tp > 1 or cp == 1) + [f"CP{cp}"] * (cp > 1))
            print(f"| {label} | {layout.world_size} | {med * 1e3:.1f} | {plen / med:.0f} | "
                  f"{coll:.0%} | {p2p:.0%} |", flush=True)

    decode = _pairs(args.layouts)
    if decode:
        print(f"\n### Decode, {name}: {args.seqs} sequences x {args.new_tokens} new tokens "
              f"(LLMEngine, timed on rank 0)\n")
        print("| layout | ranks | micro-batching | decode tok/s | all-reduce % | send/recv % |")
        print("|---|---|---|---|---|---|")
        for tp, pp in decode:
            layout = ParallelConfig(tp=tp, pp=pp)
            res = decode_run(path, layout, prompts, args.new_tokens)
            coll = max(r["coll"] / res["total"] for r in res["ranks"])
            p2p = max(r["p2p"] / res["total"] for r in res["ranks"])
            mb = "yes" if pp > 1 else "-"
            print(f"| TP{tp} x PP{pp} | {layout.world_size} | {mb} | "
                  f"{res['decoded'] / res['decode']:.1f} | {coll:.0%} | {p2p:.0%} |", flush=True)

if __name__ == "__main__":
    main()
