"""KV-aware routing and conditional disaggregation (issue 22), measured in one run.

    python bench/routing.py [--conversations 4] [--turns 4] [--turn-tokens 200] [--reply-tokens 16]
                            [--think 0.2] [--short-requests 32] [--mixed-requests 15] [--mixed-concurrency 8]
                            [--local-max 128,512] [--aggregated-weights fp32,bf16] [--skip routing,modes,hf]

Prints the CPU (``bench/machine.py``), then a table per part. Every request goes through the
router's OpenAI HTTP API (streamed, ``ignore_eos``) with an ``X-Request-Id``, and the request's
Redis hash (``cleave:req:<id>``) is read after the run. Default model SmolLM2-135M GGUF
(``services.launcher.LocalStack``). Nothing is asserted.

1. **Routing**: ``--conversations`` chats running at once, ``--turns`` turns each; a turn's user
   message is about ``--turn-tokens`` tokens of ``bench/data`` text, the reply
   ``--reply-tokens`` tokens goes into the history, ``--think`` s between a reply and the next
   turn (run by ``services.loadgen.conversations``, the driver of ``cleave bench
   --conversations``). Through TWO prefill and TWO decode instances (on this machine's cores,
   shared), once with ``--routing-policy least-load`` and once with ``kv-aware``: TTFT p50/p90, TPOT p90,
   throughput (output tokens / wall), hit rate (sum of ``usage...cached_tokens`` / prompt tokens),
   and the router's prediction error: mean |predicted_cached_tokens - cached_tokens| over the
   requests prefilled by the pool, mean |predicted_decode_cached_tokens - decode_cached_tokens|
   over all requests.
2. **Modes on the same cores**: disaggregated (1 prefill + 1 decode,
   ``local_prefill_max_tokens=0``), conditional (1 + 1, ``local_prefill_max_tokens`` each of
   ``--local-max``), aggregated (``prefill_instances=0``, one decode instance on every core:
   ``pin_cores=False``; one row per ``--aggregated-weights`` format). Workloads: (a) ``--short-requests`` completions of 64 random prompt
   tokens, 32 new tokens, 16 in flight; (b) ``--mixed-requests`` completions, every fifth one
   1-2k prompt tokens, the rest 64, 32 new tokens, ``--mixed-concurrency`` in flight. The SLO:
   TPOT <= 2x (and 4x: ``--tpot-x``) the 1-stream TPOT, TTFT <= 3x the 1-stream TTFT of a prompt of its class (64 or
   ~1.5k tokens), both measured first on the disaggregated stack. Goodput = requests meeting
   both / wall seconds, at each TPOT target.
3. **HF generate** (``bench.baselines.bench_hf``) at 16 streams for (a), in this process after
   the stacks stopped, ``torch.set_num_threads`` = the cores the stacks had.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common.config import RouterConfig  # noqa: E402
from services.launcher import LocalStack, StackConfig, workers  # noqa: E402
from services.loadgen.backends import OpenAIBackend, Timing  # noqa: E402
from services.loadgen.conversations import Conversation, run_conversations  # noqa: E402
from services.loadgen.report import hit_rate  # noqa: E402
from services.loadgen.runner import LoadConfig  # noqa: E402

import numpy as np  # noqa: E402


# ---- client --------------------------------------------------------------------------------------
def session():
    import aiohttp
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900), connector=aiohttp.TCPConnector(limit=0))


async def send(s, url: str, body: dict, rid: str) -> tuple[Timing, dict, str]:
    """One streamed request: (Timing, final usage or {}, text)."""
    body = dict(body, stream=True, stream_options={"include_usage": True}, ignore_eos=True, temperature=0)
    t = Timing(time.perf_counter())
    usage, text = {}, []
    try:
        async with s.post(url, json=body, headers={"X-Request-Id": rid}) as resp:
            if resp.status != 200:
                t.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return t, usage, ""
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    t.error = str(event["error"])[:200]
                    break
                for c in event.get("choices") or ():
                    piece = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                    if piece or c.get("finish_reason"):
                        t.chunks.append(time.perf_counter())
                        text.append(piece or "")
                if event.get("usage"):
                    usage = event["usage"]
                    t.prompt_tokens = usage["prompt_tokens"]
                    t.output_tokens = usage["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - the request failed
        t.error = f"{type(exc).__name__}: {exc}"
    return t, usage, "".join(text)


def hashes(stack, rids: list[str]) -> list[dict]:
    import redis
    r = redis.Redis.from_url(stack.redis_url, password=stack.redis_password or None, decode_responses=True)
    try:
        return [r.hgetall(f"cleave:req:{rid}") for rid in rids]
    finally:
        r.close()


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def figures(timings: list[Timing], wall: float) -> dict:
    ok = [t for t in timings if t.ok]
    tpots = [t.tpot for t in ok if t.tpot is not None]
    return dict(n=len(timings), ok=len(ok), wall=wall, ttft_p50=pct([t.ttft for t in ok], 50),
                ttft_p90=pct([t.ttft for t in ok], 90), tpot_p50=pct(tpots, 50), tpot_p90=pct(tpots, 90),
                tput=sum(t.output_tokens for t in ok) / wall,
                errors=sorted({t.error for t in timings if t.error})[:2])


# ---- stacks --------------------------------------------------------------------------------------
def start_stack(prefill: int, decode: int, router: dict | None = None, weights_dtype: str = "fp32",
                **cfg) -> LocalStack:
    stack = LocalStack(StackConfig(port=0, http_port=0, log_level="WARNING", prefill_instances=prefill,
                                   decode_instances=decode, router=dataclasses.replace(RouterConfig(), **(router or {})),
                                   **workers(weights_dtype=weights_dtype), **cfg))
    stack.start()
    return stack


# ---- 1. routing on multi-turn conversations ------------------------------------------------------
async def _conversations(stack, texts: list[list[str]], reply_tokens: int, think: float, tag: str):
    """All conversations at once through the router's chat API (``cleave bench``'s conversation
    driver): rows of (turn, request id, Timing) and the measured seconds."""
    convs = [Conversation(tuple(f"Part {t} of the story:\n\n{text}\n\nWhat happens in it?"
                                for t, text in enumerate(parts, 1)),
                          (reply_tokens,) * len(parts), (think,) * (len(parts) - 1)) for parts in texts]
    backend = OpenAIBackend(stack.http_url, chat=True, timeout_s=900)
    try:
        run = await run_conversations(backend, convs, LoadConfig(concurrency=len(convs)), request_id=tag)
    finally:
        await backend.close()
    rows = [(t, f"{tag}-c{c}-t{t}", timing) for c, t, timing in zip(run.conversation, run.turns, run.timings)]
    return rows, run.seconds


def routing_part(args, tokenizer) -> list[dict]:
    from bench.kv_cache import passages
    texts = passages(tokenizer, args.turn_tokens, args.conversations * args.turns + 2)
    convs = [texts[c * args.turns:(c + 1) * args.turns] for c in range(args.conversations)]
    out = []
    for policy in ("least-load", "kv-aware"):
        t0 = time.perf_counter()
        stack = start_stack(2, 2, router=dict(routing_policy=policy))
        try:
            asyncio.run(_conversations(stack, [texts[-2:-1], texts[-1:]], 4, 0.0, f"warm-{policy}"))
            time.sleep(0.5)
            rows, wall = asyncio.run(_conversations(stack, convs, args.reply_tokens, args.think, policy))
            hs = hashes(stack, [r[1] for r in rows])
        finally:
            stack.stop()
        timings = [r[2] for r in rows]
        later = [r[2] for r in rows if r[0] > 1]
        f = figures(timings, wall)
        f.update(policy=policy, prompt=sum(t.prompt_tokens for t in timings if t.ok),
                 cached=sum(t.cached_tokens for t in timings if t.ok), hit=hit_rate(timings) or 0.0,
                 hit_later=hit_rate(later) or 0.0, ttft_later_p50=pct([t.ttft for t in later if t.ok], 50))
        pool = [h for h in hs if h.get("prefill_mode") == "pool" and "predicted_cached_tokens" in h]
        f["mae_prefill"] = statistics.mean(abs(int(h["predicted_cached_tokens"]) - int(h.get("cached_tokens", 0)))
                                           for h in pool) if pool else float("nan")
        dec = [h for h in hs if "predicted_decode_cached_tokens" in h]
        f["mae_decode"] = statistics.mean(abs(int(h["predicted_decode_cached_tokens"]) - int(h.get("decode_cached_tokens", 0)))
                                          for h in dec) if dec else float("nan")
        f["pred_mean"] = statistics.mean(int(h["predicted_cached_tokens"]) for h in pool) if pool else float("nan")
        f["local"] = sum(h.get("prefill_mode") == "local" for h in hs)
        f["hashes"] = len([h for h in hs if h])
        f["seconds"] = time.perf_counter() - t0
        print(f"  routing {policy}: {f}", file=sys.stderr, flush=True)
        out.append(f)
    return out


# ---- 2. disaggregated vs conditional vs aggregated -----------------------------------------------
def ids(rng, n):
    return [rng.randrange(1000, 10000) for _ in range(n)]


async def _completions(stack, prompts: list[list[int]], new_tokens: int, width: int, tag: str):
    url = stack.http_url + "/completions"
    out: list = [None] * len(prompts)
    it = iter(range(len(prompts)))

    async def client(s):
        for i in it:
            out[i] = await send(s, url, {"model": "", "prompt": prompts[i], "max_tokens": new_tokens}, f"{tag}-{i}")

    async with session() as s:
        await asyncio.gather(*(client(s) for _ in range(min(width, len(prompts)))))
    return [o[0] for o in out]


def workloads(args):
    rng = random.Random(22)
    short = [ids(rng, 64) for _ in range(args.short_requests)]
    mixed = [ids(rng, rng.randrange(1024, 2049)) if i % 5 == 2 else ids(rng, 64) for i in range(args.mixed_requests)]
    return short, mixed


def good(t: Timing, slo: dict, tpot_x: float) -> bool:
    """Met the TTFT target of its class and TPOT <= ``tpot_x`` x the 1-stream TPOT."""
    if not t.ok:
        return False
    ttft_slo = slo["ttft_long"] if t.prompt_tokens > 512 else slo["ttft_short"]
    return t.ttft <= ttft_slo and (t.tpot is None or t.tpot <= tpot_x * slo["tpot1"])


def modes_part(args) -> tuple[dict, list[dict]]:
    short, mixed = workloads(args)
    rng = random.Random(7)
    modes = [("disaggregated (1P+1D, local max 0)", dict(prefill=1, decode=1, router=dict(local_prefill_max_tokens=0)))]
    modes += [(f"conditional (1P+1D, local max {n})", dict(prefill=1, decode=1, router=dict(local_prefill_max_tokens=n)))
              for n in args.local_max_list]
    modes += [(f"aggregated (0P+1D on all cores{'' if wd == 'fp32' else f', {wd} weights'})",
               dict(prefill=0, decode=1, pin_cores=False, weights_dtype=wd)) for wd in args.aggregated_weights_list]
    slo, rows = {}, []
    for k, (label, kw) in enumerate(modes):
        t0 = time.perf_counter()
        stack = start_stack(**kw)
        tag = f"m{k}"
        try:
            asyncio.run(_completions(stack, [ids(rng, 64), ids(rng, 1500), ids(rng, 64)], 8, 3, tag + "w"))
            if not slo:   # the SLO, from 1-stream figures on the first (disaggregated) stack
                one = asyncio.run(_completions(stack, [ids(rng, 64) for _ in range(3)], 32, 1, tag + "s"))
                lng = asyncio.run(_completions(stack, [ids(rng, 1536)], 32, 1, tag + "l"))
                one, lng = [t for t in one if t.ok and t.tpot], [t for t in lng if t.ok]
                if not one or not lng:
                    raise RuntimeError("the 1-stream requests failed: no SLO")
                slo = dict(tpot1=statistics.median(t.tpot for t in one), ttft1_short=statistics.median(t.ttft for t in one),
                           ttft1_long=statistics.median(t.ttft for t in lng))
                slo.update(tpot=2 * slo["tpot1"], ttft_short=3 * slo["ttft1_short"], ttft_long=3 * slo["ttft1_long"])
                print(f"  SLO: {slo}", file=sys.stderr, flush=True)
            row = dict(mode=label)
            for name, prompts, width in (("a", short, 16), ("b", mixed, args.mixed_concurrency)):
                w0 = time.perf_counter()
                ts = asyncio.run(_completions(stack, prompts, 32, width, f"{tag}{name}"))
                wall = time.perf_counter() - w0
                hs = hashes(stack, [f"{tag}{name}-{i}" for i in range(len(prompts))])
                f = figures(ts, wall)
                f["good"] = {x: sum(good(t, slo, x) for t in ts) for x in args.tpot_x_list}
                f["local"] = sum(h.get("prefill_mode") == "local" for h in hs)
                f["short_ttft_p90"] = pct([t.ttft for t in ts if t.ok and t.prompt_tokens <= 512], 90)
                f["long_ttft_p50"] = pct([t.ttft for t in ts if t.ok and t.prompt_tokens > 512], 50)
                f["short_tpot_p90"] = pct([t.tpot for t in ts if t.ok and t.prompt_tokens <= 512 and t.tpot], 90)
                row[name] = f
                time.sleep(0.5)
        finally:
            stack.stop()
        row["seconds"] = time.perf_counter() - t0
        print(f"  mode {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return slo, rows


# ---- report --------------------------------------------------------------------------------------
def ms(x):
    return "n/a" if x != x else f"{x * 1e3:.0f}"


def print_routing(args, rows) -> None:
    print(f"\n1. routing: {args.conversations} conversations at once x {args.turns} turns, ~{args.turn_tokens} new "
          f"user tokens per turn, {args.reply_tokens}-token replies, {args.think} s think time; 2 prefill + 2 decode "
          f"instances (chat API)\n")
    print("| policy | ok | TTFT p50 (ms) | TTFT p90 (ms) | turn>=2 TTFT p50 (ms) | TPOT p90 (ms) | out tok/s | "
          "hit rate (all) | hit rate (turn>=2) | local prefills | MAE prefill pred (tok) | MAE decode pred (tok) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['ok']}/{r['n']} | {ms(r['ttft_p50'])} | {ms(r['ttft_p90'])} | "
              f"{ms(r['ttft_later_p50'])} | {ms(r['tpot_p90'])} | {r['tput']:.1f} | {r['hit']:.0%} | "
              f"{r['hit_later']:.0%} | {r['local']} | {r['mae_prefill']:.1f} | {r['mae_decode']:.1f} |")


def print_modes(args, slo, rows, hf) -> None:
    print(f"\n2. modes on the same cores. SLO: TPOT <= {' / '.join(f'{x:g}x' for x in args.tpot_x_list)} the 1-stream "
          f"TPOT of {ms(slo['tpot1'])} ms, "
          f"TTFT <= {ms(slo['ttft_short'])} ms for 64-token prompts / {ms(slo['ttft_long'])} ms for 1-2k "
          f"(3x the 1-stream {ms(slo['ttft1_short'])} / {ms(slo['ttft1_long'])} ms); 1-stream figures on the "
          f"disaggregated stack")
    for name, desc in (("a", f"(a) {args.short_requests} completions, 64-token prompts, 32 new tokens, 16 in flight"),
                       ("b", f"(b) mixed: {args.mixed_requests} completions, one in five 1-2k prompt tokens, the rest "
                             f"64, 32 new tokens, {args.mixed_concurrency} in flight")):
        print(f"\n{desc}\n")
        print("| mode | ok | local prefills | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p90 (ms) | out tok/s | "
              + " | ".join(f"met, goodput (req/s) at TPOT <= {x:g}x" for x in args.tpot_x_list) + " |"
              + (" short TTFT p90 | short TPOT p90 | long TTFT p50 |" if name == "b" else ""))
        print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.tpot_x_list) + ("---:|---:|---:|" if name == "b" else ""))
        for r in rows:
            f = r[name]
            extra = (f" {ms(f['short_ttft_p90'])} | {ms(f['short_tpot_p90'])} | {ms(f['long_ttft_p50'])} |"
                     if name == "b" else "")
            goods = " | ".join(f"{f['good'][x]}/{f['n']} = {f['good'][x] / f['wall']:.2f}" for x in args.tpot_x_list)
            print(f"| {r['mode']} | {f['ok']}/{f['n']} | {f['local']} | {ms(f['ttft_p50'])} | {ms(f['ttft_p90'])} | "
                  f"{ms(f['tpot_p90'])} | {f['tput']:.1f} | {goods} |" + extra)
        if name == "a" and hf:
            print(f"| HF generate, batch 16 ({hf['threads']} threads) | | | {ms(hf['ttft_p50'])} | {ms(hf['ttft_p90'])} | "
                  f"{ms(hf['tpot'])} | {hf['tput']:.1f} |" + " |" * len(args.tpot_x_list))
            for r in rows:
                if r["mode"].startswith("aggregated"):
                    print(f"\n{r['mode']} / HF generate (fp32) at 16 streams: {r['a']['tput'] / hf['tput']:.2f}x "
                          f"(issue 22 asks >= 1.3x)")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=4, help="routing part: conversations at once")
    ap.add_argument("--turns", type=int, default=4, help="routing part: turns per conversation")
    ap.add_argument("--turn-tokens", type=int, default=200, help="routing part: about this many new user tokens per turn")
    ap.add_argument("--reply-tokens", type=int, default=16, help="routing part: tokens per reply")
    ap.add_argument("--think", type=float, default=0.2, help="routing part: seconds between a reply and the next turn")
    ap.add_argument("--short-requests", type=int, default=32, help="modes part (a): completions of 64-token prompts")
    ap.add_argument("--mixed-requests", type=int, default=15, help="modes part (b): completions, one in five 1-2k tokens")
    ap.add_argument("--mixed-concurrency", type=int, default=8, help="modes part (b): requests in flight")
    ap.add_argument("--local-max", default="128,512", help="conditional modes' local_prefill_max_tokens")
    ap.add_argument("--tpot-x", default="2,4", help="TPOT SLOs as multiples of the 1-stream TPOT (goodput at each)")
    ap.add_argument("--aggregated-weights", default="fp32,bf16", help="weight formats of the aggregated rows "
                    "(--weights-dtype; fp32 is the exact path, the others are measured in bench/quant.py)")
    ap.add_argument("--skip", default="", help="comma list: routing,modes,hf")
    args = ap.parse_args()
    args.local_max_list = [int(x) for x in args.local_max.split(",") if x]
    args.aggregated_weights_list = [x for x in args.aggregated_weights.split(",") if x]
    from common.model import WEIGHTS_DTYPES
    bad = [x for x in args.aggregated_weights_list if x not in WEIGHTS_DTYPES]
    if bad:
        ap.error(f"--aggregated-weights: {bad} not among {list(WEIGHTS_DTYPES)}")
    args.tpot_x_list = [float(x) for x in args.tpot_x.split(",") if x]
    args.skip_set = {x.strip() for x in args.skip.split(",") if x.strip()}
    return args


def main() -> int:
    args = parse_args()
    from bench import machine
    from engine.loader import load_tokenizer, resolve_model

    machine_line = machine.describe()
    print(machine_line, flush=True)
    source = resolve_model("")
    tokenizer = load_tokenizer(source)
    routing = [] if "routing" in args.skip_set else routing_part(args, tokenizer)
    if routing:                      # printed at once too, so a later failure keeps it
        print_routing(args, routing)
        sys.stdout.flush()
    slo, modes = ({}, []) if "modes" in args.skip_set else modes_part(args)
    hf = None
    if "hf" not in args.skip_set:
        import torch
        from bench import baselines
        from engine.loader import load_reference_model
        threads = len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        model = load_reference_model(source)
        hf = dict(baselines.bench_hf(model, tokenizer, 16, 32, 64), threads=threads)
        print(f"  HF: {hf}", file=sys.stderr, flush=True)
    print(f"\n{machine_line}")
    print(f"model {source.model_id}; cleave stacks via services.launcher.LocalStack on {len(os.sched_getaffinity(0))} cores")
    if routing:
        print_routing(args, routing)
    if modes:
        print_modes(args, slo, modes, hf)
    elif hf:
        print(f"\nHF generate batch 16: {hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
