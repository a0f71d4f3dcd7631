"""Serving benchmark: the local stack vs HF ``generate`` and llama.cpp on the same model, in one run.

    python bench/serving.py [--model M] [--tokens 64] [--prompt-tokens 64] [--threads NCPU]
                            [--worker-threads 0] [--weights-dtypes fp32,int8] [--handoff-tokens 1024]

Prints the CPU and the kernel features it has (``bench/machine.py``: AMX, AVX-512-BF16,
AVX-512-VNNI, AVX2, torch's capability), then one table for 1, 8 and 16 concurrent streams
(``--concurrency``) of ``--tokens`` new tokens each (``ignore_eos``) after ``--prompt-tokens``-token
prompts, all on this machine's cores
(the stack splits them between its workers and prints the split; the baselines run alone, one
after the other, with ``--threads`` threads): TTFT (p50/p90), TPOT (mean gap between a stream's tokens
after the first) and completion tok/s (prefill included). Rows:

* **Cleave**: ``services.launcher.LocalStack`` (router, one prefill and one decode worker, real
  Redis, gRPC, KV over ``--transport``), driven by ``cleave bench``'s load generator
  (``services.loadgen``: one request per stream, all at once, after a warm-up), one row set per
  ``--weights-dtypes`` entry passed as the workers' ``--weights-dtype`` (fp32 alone, with a
  note, while ``cleave worker`` has no such flag).
* **HF**: transformers' greedy ``generate`` in this process at batch 1, 8, 16
  (``bench.baselines.bench_hf``).
* **llama.cpp**: ``llama-batched-bench`` on the same GGUF file, when
  ``../shared/tools/build-llama-cpp.sh`` has built it (a note otherwise).

Then: the batch-1 decode step (engine alone, and Cleave's served TPOT) against the weight-bytes /
memory-bandwidth floor measured in this run, the in-stack KV handoff of a ``--handoff-tokens``
prompt (GB/s, share of the time to decode-ready), each worker's resident memory beside its
weights and KV cache, and the issue-12 target ratios. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import baselines, machine, quant, serving_extras  # noqa: E402
from engine.loader import load_model, load_model_config, load_reference_model, load_tokenizer, resolve_model  # noqa: E402
from services.launcher import LocalStack, StackConfig, workers  # noqa: E402
from services.loadgen.cli import bench  # noqa: E402
from services.loadgen.datasets import DatasetConfig, LengthDist  # noqa: E402
from services.loadgen.report import Slo  # noqa: E402
from services.loadgen.runner import LoadConfig  # noqa: E402

WEIGHTS_DTYPES = ("fp32", "bf16", "int8", "int4")
MiB = 1 << 20


def target_of(stack, backend: str) -> str:
    """Where the load generator sends: the router's OpenAI base URL or its gRPC address."""
    return stack.http_url if backend == "openai" else f"{stack.cfg.host}:{stack.router_port}"


def warm_up(stack, backend, vocab, prompt_tokens, requests: int = 1) -> None:
    """``requests`` short requests at once, before a level's measured window (their steps would
    otherwise dilute the window's mean decode step)."""
    data = DatasetConfig(num_requests=requests, prompt=LengthDist(prompt_tokens), output=LengthDist(4),
                         token_range=(100, min(10_000, vocab)), seed=99 + requests)
    asyncio.run(bench(backend, target_of(stack, backend), data, [LoadConfig(concurrency=requests)], None))


def bench_stack(stack, backend, vocab, concurrency, tokens, prompt_tokens, slo) -> dict:
    """One load level through the load generator, as a row (see ``bench.baselines``); call
    :func:`warm_up` first."""
    target = target_of(stack, backend)
    data = DatasetConfig(num_requests=concurrency, prompt=LengthDist(prompt_tokens), output=LengthDist(tokens),
                         token_range=(100, min(10_000, vocab)), seed=concurrency)
    (r,) = asyncio.run(bench(backend, target, data, [LoadConfig(concurrency=concurrency)], slo))
    if r["requests_failed"]:
        raise RuntimeError(f"{r['requests_failed']} request(s) failed: {r['errors']}")
    return dict(ttft_p50=r["ttft_ms"]["p50"] / 1e3, ttft_p90=r["ttft_ms"]["p90"] / 1e3,
                tpot=r["tpot_ms"]["mean"] / 1e3, tput=r["output_token_throughput"])


def served_model(source, weights_dtype: str):
    """``(config, model)`` as a worker serves it with ``--weights-dtype``, or None when
    ``engine.loader.load_model`` cannot load that weight dtype here."""
    if weights_dtype == "fp32":
        return load_model(source)
    if "weights_dtype" not in inspect.signature(load_model).parameters:
        return None
    return load_model(source, weights_dtype=weights_dtype)


def run_cleave(args, source, vocab, weights_dtype, flag, slo, out) -> None:
    """Start a stack with ``weights_dtype`` weights, run every load level, and (for the first
    weights dtype) the handoff; fills ``out`` (rows, memory, handoff)."""
    fields = {"transport": args.transport}
    if args.worker_threads:
        fields["threads"] = int(args.worker_threads)
    if flag:
        fields["weights_dtype"] = weights_dtype
    stack = LocalStack(StackConfig(port=0, http_port=0, model=args.model, log_level="WARNING",
                                   **workers(**fields)))
    try:
        router = stack.start()
        out["cores"] = {name: list(cores) for name, cores in getattr(stack, "cores", {}).items()}
        for c in args.levels:
            warm_up(stack, args.backend, vocab, args.prompt_tokens)
            before = serving_extras.decode_step_totals(stack)
            row = bench_stack(stack, args.backend, vocab, c, args.tokens, args.prompt_tokens, slo)
            # the engine's share of TPOT at this load: the step as the mean stream waits for it
            row["step"] = serving_extras.decode_step_totals(stack).step_since(before)
            out["rows"][(f"Cleave {weights_dtype}", c)] = row
        if args.handoff_tokens and "handoff" not in out:
            out["handoff"] = serving_extras.handoff(stack, router, args.handoff_tokens)
        kv_per_token = load_model_config(source).kv_bytes_per_token()
        out["memory"][weights_dtype] = serving_extras.worker_memory(stack, kv_per_token, None)
    finally:
        stack.stop()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of HF and llama.cpp")
    ap.add_argument("--worker-threads", type=int, default=0,
                    help="torch threads per Cleave worker (0 = one per core of the stack's own split)")
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--transport", default="ucx")
    ap.add_argument("--backend", default="grpc", choices=["grpc", "openai"], help="the API the load goes through")
    ap.add_argument("--goodput", default="", help="SLO for goodput, e.g. ttft:2000,tpot:200 (ms)")
    ap.add_argument("--weights-dtypes", default="fp32,int8",
                    help=f"Cleave row sets, comma list of {'|'.join(WEIGHTS_DTYPES)} (workers' --weights-dtype)")
    ap.add_argument("--handoff-tokens", type=int, default=1024, help="prompt of the handoff figure (0 = skip)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave the llama.cpp rows out")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.dtypes = [d.strip() for d in args.weights_dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in WEIGHTS_DTYPES]
    if bad or not args.dtypes:
        ap.error(f"--weights-dtypes takes a comma list of {', '.join(WEIGHTS_DTYPES)}; got {args.weights_dtypes!r}")
    return args


def main() -> int:
    args = parse_args()
    print(machine.describe(), flush=True)
    slo = Slo.parse(args.goodput) if args.goodput else None
    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    notes, out = [], {"rows": {}, "memory": {}, "weights": {}, "step": {}, "cores": {}, "quality": {}}
    flag = serving_extras.worker_flag("--weights-dtype")
    dtypes = args.dtypes
    if not flag:
        notes.append(f"`cleave worker` has no --weights-dtype yet (issue 12 item 6): Cleave rows are fp32 only"
                     f"{'' if dtypes == ['fp32'] else f' (asked: {args.weights_dtypes})'}")
        dtypes = ["fp32"]
    for wd in dtypes:
        run_cleave(args, source, len(tokenizer), wd, flag, slo, out)
        loaded = served_model(source, wd)
        if loaded is None:
            notes.append(f"engine.loader.load_model cannot load {wd} weights: no {wd} weight bytes / step figure")
            continue
        config, model = loaded
        out["quality"][wd] = quant.score_text(model, config, quant.text_tokens(tokenizer))   # (top-1, nll)
        out["weights"][wd] = baselines.weight_bytes(model)
        prompt = baselines.prompt_ids(tokenizer, 0, args.prompt_tokens)
        out["step"][wd] = baselines.engine_decode_step(args.model, wd, prompt, args.tokens)
        del model
    # the engine step runs with --threads; the served one with the decode worker's cores
    out["decode_threads"] = args.worker_threads or len(out["cores"].get("decode-0", ())) or args.threads
    out["bandwidth"] = {t: baselines.memory_bandwidth(t) for t in {args.threads, out["decode_threads"]}}
    hf = load_reference_model(source)
    for c in args.levels:
        out["rows"][("HF generate", c)] = baselines.bench_hf(hf, tokenizer, c, args.tokens, args.prompt_tokens)
    del hf
    folder, why = (None, "llama.cpp rows left out (--no-llama-cpp)") if args.no_llama_cpp else baselines.llama_cpp_bin()
    if folder and source.kind != "gguf":
        folder, why = None, f"llama.cpp rows left out: the model is not a GGUF file ({source.path})"
    if folder:
        rows, why = baselines.bench_llama_cpp(folder, source.path, args.threads, args.levels, args.prompt_tokens,
                                              args.tokens)
        out["rows"].update({("llama.cpp", c): r for c, r in rows.items()})
    if why:
        notes.append(why)
    print_table(args, source, dtypes, out, notes)
    print_extras(args, dtypes, out)
    print_quality(out)
    print_ratios(args, dtypes, out)
    return 0


def print_quality(out) -> None:
    """What other weight dtypes cost in quality: teacher-forced top-1 agreement with the fp32
    engine and perplexity on bench/data's held-out text (``bench/quant.py``)."""
    quality = out["quality"]
    if "fp32" not in quality or len(quality) < 2:
        return
    ref_top1 = quality["fp32"][0]
    print(f"\nquality on {os.path.basename(quant.TEXT)} ({ref_top1.numel()} positions, teacher-forced):")
    for wd, (top1, nll) in quality.items():
        print(f"  {wd}: top-1 agreement with fp32 {(top1 == ref_top1).float().mean().item():.1%}, "
              f"perplexity {nll.mean().exp().item():.2f}")


def print_table(args, source, dtypes, out, notes) -> None:
    """The one comparison table: every system at every load level, then the notes."""
    rows = out["rows"]
    systems = [f"Cleave {wd}" for wd in dtypes] + ["HF generate"] + \
        (["llama.cpp"] if ("llama.cpp", args.levels[0]) in rows else [])
    print(f"\n{machine.describe()}")
    print(f"model {source.model_id} ({os.path.basename(source.path)}), {args.prompt_tokens}-token prompts, "
          f"{args.tokens} new tokens per stream (ignore_eos), {os.cpu_count()} cores; HF and llama.cpp "
          f"{args.threads} threads; Cleave cores {out['cores'] or 'not pinned'}"
          f"{f', {args.worker_threads} threads per worker' if args.worker_threads else ''}; "
          f"KV transport {args.transport}, load via {args.backend}\n")
    print("| streams | system | TTFT p50 (ms) | TTFT p90 (ms) | TPOT (ms) | throughput (tok/s) | vs HF |")
    print("|---|---|---|---|---|---|---|")
    for c in args.levels:
        for name in systems:
            r, hf = rows[(name, c)], rows[("HF generate", c)]
            print(f"| {c} | {name} | {r['ttft_p50'] * 1e3:.0f} | {r['ttft_p90'] * 1e3:.0f} | {r['tpot'] * 1e3:.1f} | "
                  f"{r['tput']:.1f} | {r['tput'] / hf['tput']:.2f}x |")
    for line in notes:
        print(f"note: {line}")


def step_floors(args, wd, out) -> tuple[float, float] | None:
    """Weight bytes / bandwidth (s) at the engine's threads and at the decode worker's, or None."""
    if wd not in out["weights"]:
        return None
    return (out["weights"][wd] / out["bandwidth"][args.threads],
            out["weights"][wd] / out["bandwidth"][out["decode_threads"]])


def print_extras(args, dtypes, out) -> None:
    """Decode step vs the bandwidth floor, the KV handoff, memory per worker."""
    bw = ", ".join(f"{t} thread(s) {b / 1e9:.1f} GB/s" for t, b in sorted(out["bandwidth"].items()))
    print(f"\nmemory bandwidth (fp32 copy, read + write, best of 5): {bw}")
    for wd in dtypes:
        floors = step_floors(args, wd, out)
        if floors is None:
            continue
        served = out["rows"].get((f"Cleave {wd}", 1), {}).get("tpot", float("nan"))
        print(f"batch-1 decode step, {wd} weights {out['weights'][wd] / MiB:.0f} MiB: engine alone "
              f"({args.threads} threads) {out['step'][wd] * 1e3:.1f} ms = {out['step'][wd] / floors[0]:.2f}x its floor "
              f"{floors[0] * 1e3:.1f} ms; served TPOT ({out['decode_threads']} core(s)) {served * 1e3:.1f} ms = "
              f"{served / floors[1]:.2f}x its floor {floors[1] * 1e3:.1f} ms")
    for wd in dtypes:
        hops = [(c, r["tpot"], r["step"]) for (name, c), r in out["rows"].items()
                if name == f"Cleave {wd}" and "step" in r]
        if hops:
            print(f"{wd} TPOT = engine decode step + hops (decode -> router -> client, scheduling): " + "; ".join(
                f"{c} stream(s) {t * 1e3:.1f} = {s * 1e3:.1f} + {(t - s) * 1e3:.1f} ms" for c, t, s in hops))
    h = out.get("handoff")
    if h:
        print(f"KV handoff, {h['prompt_tokens']}-token prompt over {args.transport}: {h['transfer_bytes'] / MiB:.1f} MiB "
              f"in {h['transfer_s'] * 1e3:.1f} ms = {h['gbps']:.2f} GB/s; prefill {h['prefill_s'] * 1e3:.1f} ms; "
              f"handoff share of prefill + handoff {100 * h['share']:.0f}%; client TTFT {h['ttft_s'] * 1e3:.0f} ms, "
              f"2nd token {h['second_s'] * 1e3:.0f} ms (the first token leaves before the handoff)")
    print("\n| weights | worker | processes | RSS (MiB) | weights (MiB) | KV cache (MiB) |")
    print("|---|---|---|---|---|---|")
    for wd, mem in out["memory"].items():
        weights = out["weights"].get(wd)
        for m in mem:
            w = f"{weights / MiB:.0f}" if weights else "?"
            print(f"| {wd} | {m['name']} | {m['procs']} | {m['rss'] / MiB:.0f} | {w} | {m['kv'] / MiB:.0f} |")


def print_ratios(args, dtypes, out) -> None:
    """The issue-12 targets, one line per Cleave weights dtype (n/a where a row is missing)."""
    rows = out["rows"]

    def ratio(a, b, key):
        return f"{rows[a][key] / rows[b][key]:.2f}" if a in rows and b in rows else "n/a"
    hf, llama = "HF generate", "llama.cpp"
    print("\ntargets (issue 12): tput/HF >= 1.5 @8, >= 2 @16; TPOT@1/HF <= 1; TTFT p50@16/HF <= 1; "
          "quantized: tput/llama.cpp @16 >= 1.5, TPOT@1/llama.cpp <= 2; step/floor <= 1.3; handoff >= 1.5 GB/s")
    for wd in dtypes:
        me = f"Cleave {wd}"
        floors = step_floors(args, wd, out)
        served = rows.get((me, 1), {}).get("tpot")
        steps = (f"; step/floor engine {out['step'][wd] / floors[0]:.2f}, served {served / floors[1]:.2f}"
                 if floors and served else "")
        print(f"ratios {me}: tput/HF @8 {ratio((me, 8), (hf, 8), 'tput')}, @16 {ratio((me, 16), (hf, 16), 'tput')}; "
              f"TPOT@1/HF {ratio((me, 1), (hf, 1), 'tpot')}; TTFT p50@16/HF {ratio((me, 16), (hf, 16), 'ttft_p50')}; "
              f"tput/llama.cpp @16 {ratio((me, 16), (llama, 16), 'tput')}; "
              f"TPOT@1/llama.cpp {ratio((me, 1), (llama, 1), 'tpot')}{steps}"
              + (f"; handoff {out['handoff']['gbps']:.2f} GB/s" if out.get("handoff") else ""))

if __name__ == "__main__":
    sys.exit(main())
