"""The KV cache as a managed resource (issue 21), against the commit before it, in one run.

    python bench/kv_cache.py [--before 6c3ac9f] [--levels 2,8,32,64] [--conversations 2]
                             [--turn-tokens 450] [--shared-requests 64] [--system-tokens 1000]

Prints the CPU (``bench/machine.py``), then four measurements on the default stack
(``services.launcher.LocalStack``: router, one prefill and one decode worker on a core each,
default model SmolLM2-135M GGUF, default 1 GiB KV cache per worker, all requests through the
OpenAI HTTP API). Nothing is asserted.

1. **Concurrent chats without ``max_tokens``** (what OpenAI SDK clients send; the router sets
   ``max_tokens`` to the rest of the context, 8,192 tokens here). ``N`` streamed chats at once,
   each asking for a long story; every stream stays open until all ``N`` are decoding (a second
   token, which comes from the decode worker) or were refused (or ``--hold`` seconds passed),
   then half a second more, then the client leaves. Per ``N``: how many were served (decoding),
   how many were refused (HTTP 429, after the router's admission wait), and the peak of the
   decode worker's ``cleave_batch_size`` (sampled every 50 ms).
2. **Multi-turn**: ``--conversations`` chats of 4 turns; each turn's user message is about
   ``--turn-tokens`` tokens of ``bench/data`` text, the assistant answers ``--reply-tokens``
   tokens and its answer goes into the history, so turn 4's prompt is about 2k tokens. Per turn,
   with the prefix cache on and off (``--no-prefix-cache`` on both workers, a second stack):
   client TTFT, the prompt tokens, ``usage.prompt_tokens_details.cached_tokens`` (and the prefill
   worker's ``cleave_prefix_cache_hit_tokens`` delta), and the KV bytes the prefill worker pushed
   (``cleave_kv_transfer_bytes`` delta). The issue's aim: turn >= 2 TTFT at most 0.3x the
   recompute.
3. **Shared system prompt**: a ``--system-tokens`` system prompt and ``--shared-requests``
   short distinct user messages, ``--shared-concurrency`` in flight: prefill tokens computed
   (prompt - cached, summed) and TTFT p50/p90, cache on and off.
4. **Decode step at 16 streams**: 16 completions of 64 random prompt tokens and 64 new tokens
   (``ignore_eos``); the mean of the decode worker's ``cleave_decode_step_seconds`` over the
   steps taken while all 16 were in the batch.

**Before** is ``--before`` (default 6c3ac9f, the commit before issue 21): its tree is exported
(``git archive``) to ``/tmp/cleave-kv-before-<rev>``, its protos built, and this script runs
parts 1 and 4 in a child process with that tree first on ``PYTHONPATH`` (same ``.venv``). That
commit has no prefix cache, so parts 2 and 3 compare cache on and off in this tree instead.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("CLEAVE_KV_BENCH_TREE") or os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from services.launcher import LocalStack, StackConfig, workers  # noqa: E402

TEXT = os.path.join(HERE, "data", "pride_and_prejudice_ch1.txt")
TOPICS = ("a lighthouse keeper", "a lost robot", "a dragon who bakes bread", "two rival chess players",
          "a ship's cat", "a forgotten library", "a mountain village", "a time-travelling clock maker")


# ---- metrics -------------------------------------------------------------------------------------
def scrape(stack, name: str) -> dict[str, float]:
    """``{metric name: value summed over label sets}`` of worker ``name``'s ``/metrics``."""
    port = stack.metrics_ports[name]
    text = urllib.request.urlopen(f"http://{stack.cfg.host}:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


class Poller:
    """Samples the decode worker's ``/metrics`` every ``interval`` s in a thread: each sample is
    ``(batch size, decode step seconds sum, step count)``."""

    def __init__(self, stack, interval: float = 0.05) -> None:
        self.stack, self.interval, self.samples = stack, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = scrape(self.stack, "decode-0")
                self.samples.append((m.get("cleave_batch_size", 0.0), m.get("cleave_decode_step_seconds_sum", 0.0),
                                     m.get("cleave_decode_step_seconds_count", 0.0)))
            except OSError:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return int(max((s[0] for s in self.samples), default=0))


def wait_idle(stack, timeout: float = 60.0) -> None:
    """Until the decode batch is empty (the router aborted what the clients left)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if scrape(stack, "decode-0").get("cleave_batch_size", 0.0) == 0:
            return
        time.sleep(0.2)


# ---- the OpenAI API client -----------------------------------------------------------------------
async def stream(session, url: str, body: dict, on_token=None, hold: asyncio.Event | None = None) -> dict:
    """One streamed request. Returns ``status``, ``ttft`` (s), ``tokens`` (content chunks),
    ``text``, ``usage`` (the last chunk's, or None), ``error``, ``finished``. ``on_token(k)``
    is called at the ``k``-th content chunk. With ``hold``: leave (close the connection) once
    ``hold`` is set, after the first token."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    out = dict(status=0, ttft=None, tokens=0, text="", usage=None, error="", finished=False)
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            out["status"] = resp.status
            if resp.status != 200:
                out["error"] = (await resp.text())[:200]
                return out
            reader = resp.content.__aiter__()
            while True:
                nxt = asyncio.ensure_future(reader.__anext__())
                waits = {nxt} | ({asyncio.ensure_future(hold.wait())} if hold is not None and out["ttft"] else set())
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for p in pending:
                    if p is not nxt:
                        p.cancel()
                if nxt not in done:          # released: the client leaves mid-stream
                    nxt.cancel()
                    resp.close()
                    return out
                try:
                    line = nxt.result().strip()
                except StopAsyncIteration:
                    return out
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    out["error"] = str(event["error"])[:200]
                    return out
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if piece:
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - t0
                        out["tokens"] += 1
                        out["text"] += piece
                        if on_token is not None:
                            on_token(out["tokens"])
                    if choice.get("finish_reason"):
                        out["finished"] = True
                if event.get("usage"):
                    out["usage"] = event["usage"]
    except Exception as exc:  # connection reset, timeout: the request failed
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def cached_of(usage: dict | None) -> int | None:
    details = (usage or {}).get("prompt_tokens_details") or {}
    return details.get("cached_tokens")


def session():
    import aiohttp
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900), connector=aiohttp.TCPConnector(limit=0))


# ---- 1. concurrent chats without max_tokens ------------------------------------------------------
async def _concurrency_level(stack, n: int, hold_s: float) -> dict:
    url = stack.http_url + "/chat/completions"
    loop, resolved, release = asyncio.get_running_loop(), [0], asyncio.Event()

    def one_resolved() -> None:        # decoding (a 2nd token), refused, failed or finished
        resolved[0] += 1
        if resolved[0] == n:           # let the poller see the whole batch, then leave
            loop.call_later(0.5, release.set)

    async def chat(i: int) -> dict:
        body = {"model": "", "temperature": 0, "messages": [
            {"role": "user", "content": f"Tell me a very long story about {TOPICS[i % len(TOPICS)]} (story {i})."}]}
        r = await stream(s, url, body, on_token=lambda k: k == 2 and one_resolved(), hold=release)
        if r["tokens"] < 2:
            one_resolved()
        return r

    async with session() as s:
        timer = loop.call_later(hold_s, release.set)
        rs = await asyncio.gather(*(chat(i) for i in range(n)))
        timer.cancel()
    return dict(n=n, served=sum(r["tokens"] >= 2 for r in rs), refused=sum(r["status"] == 429 for r in rs),
                failed=sum(r["tokens"] < 2 and r["status"] != 429 for r in rs),
                finished=sum(r["finished"] for r in rs), tokens=sum(r["tokens"] for r in rs),
                errors=sorted({r["error"][:120] for r in rs if r["error"]})[:2])


def concurrency(stack, levels: list[int], hold_s: float) -> list[dict]:
    rows = []
    for n in levels:
        with Poller(stack) as p:
            t0 = time.perf_counter()
            row = asyncio.run(_concurrency_level(stack, n, hold_s))
            row["seconds"] = time.perf_counter() - t0
        row["peak_batch"] = p.peak
        rows.append(row)
        print(f"  concurrency {row}", file=sys.stderr, flush=True)
        wait_idle(stack)
    return rows


# ---- 4. decode step at 16 streams ----------------------------------------------------------------
async def _completions(stack, n: int, prompt_tokens: int, new_tokens: int) -> list[dict]:
    import random
    rng = random.Random(n)
    url = stack.http_url + "/completions"
    async with session() as s:
        return await asyncio.gather(*(stream(s, url, {
            "model": "", "prompt": [rng.randrange(100, 10_000) for _ in range(prompt_tokens)],
            "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0}) for _ in range(n)))


def decode_step(stack, streams: int = 16, prompt_tokens: int = 64, new_tokens: int = 64) -> dict:
    """Mean engine decode step while all ``streams`` sequences were in the batch (from the
    first sample at that batch size to the last), and over the whole run."""
    asyncio.run(_completions(stack, 2, 16, 4))           # warm-up
    wait_idle(stack)
    with Poller(stack, interval=0.02) as p:
        rs = asyncio.run(_completions(stack, streams, prompt_tokens, new_tokens))
    full = [s for s in p.samples if s[0] >= streams]
    first, last = (full[0], full[-1]) if full else (p.samples[0], p.samples[-1])
    whole = (p.samples[-1][1] - p.samples[0][1]) / max(1.0, p.samples[-1][2] - p.samples[0][2])
    steps = last[2] - first[2]
    return dict(streams=streams, step_s=(last[1] - first[1]) / steps if steps else float("nan"), steps=int(steps),
                whole_s=whole, peak_batch=p.peak, failed=sum(bool(r["error"]) for r in rs))


# ---- 2. multi-turn, 3. shared system prompt ------------------------------------------------------
def passages(tokenizer, size: int, count: int) -> list[str]:
    """``count`` passages of about ``size`` tokens of the bench text, cycling through it, each
    starting at a different offset."""
    with open(TEXT) as f:
        words = f.read().split()
    ids_per_word = len(tokenizer.encode(" ".join(words), add_special_tokens=False)) / len(words)
    per = max(1, int(size / ids_per_word))
    step = max(1, len(words) // max(1, count)) if per * count > len(words) else per
    return [" ".join((words * 3)[i * step: i * step + per]) for i in range(count)]


async def _conversation(stack, passages_: list[str], reply_tokens: int) -> list[dict]:
    url = stack.http_url + "/chat/completions"
    history: list[dict] = []
    turns = []
    async with session() as s:
        for t, text in enumerate(passages_, 1):
            history.append({"role": "user", "content": f"Part {t} of the story:\n\n{text}\n\nWhat happens in it?"})
            before = scrape(stack, "prefill-0")
            dbefore = scrape(stack, "decode-0")
            r = await stream(s, url, {"model": "", "temperature": 0, "max_tokens": reply_tokens,
                                      "messages": history})
            after, dafter = scrape(stack, "prefill-0"), scrape(stack, "decode-0")
            if r["error"] or r["usage"] is None:
                raise RuntimeError(f"turn {t} failed: {r['error'] or 'no usage'}")
            history.append({"role": "assistant", "content": r["text"]})

            def d(a, b, key):
                return b.get(key, 0.0) - a.get(key, 0.0)
            turns.append(dict(turn=t, ttft=r["ttft"], prompt=r["usage"]["prompt_tokens"], cached=cached_of(r["usage"]),
                              hit=d(before, after, "cleave_prefix_cache_hit_tokens_total"),
                              queried=d(before, after, "cleave_prefix_cache_queried_tokens_total"),
                              decode_hit=d(dbefore, dafter, "cleave_prefix_cache_hit_tokens_total"),
                              kv_bytes=d(before, after, "cleave_kv_transfer_bytes_total")))
            await asyncio.sleep(0.3)     # the decode side commits the finished turn's blocks
    return turns


def multi_turn(stack, tokenizer, conversations: int, turns: int, turn_tokens: int, reply_tokens: int) -> list[list[dict]]:
    texts = passages(tokenizer, turn_tokens, conversations * turns + 1)
    asyncio.run(_conversation(stack, texts[-1:], 4))            # warm-up: one short chat
    out = []
    for c in range(conversations):
        out.append(asyncio.run(_conversation(stack, texts[c * turns:(c + 1) * turns], reply_tokens)))
        print(f"  conversation {c}: {out[-1]}", file=sys.stderr, flush=True)
    return out


async def _shared(stack, system: str, n: int, width: int, reply_tokens: int) -> list[dict]:
    url = stack.http_url + "/chat/completions"
    names = ("Elizabeth", "Jane", "Mr. Bennet", "Mrs. Bennet", "Mr. Bingley", "Lydia", "Kitty", "Mary")
    queue = iter(range(n))
    out: list[dict] = [{}] * n

    async def client(s) -> None:
        for i in queue:
            out[i] = await stream(s, url, {"model": "", "temperature": 0, "max_tokens": reply_tokens, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question {i}: in one sentence, who is {names[i % len(names)]}?"}]})
    async with session() as s:
        await asyncio.gather(*(client(s) for _ in range(width)))
    return out


def shared_prompt(stack, tokenizer, n: int, system_tokens: int, width: int, reply_tokens: int) -> dict:
    (system,) = passages(tokenizer, system_tokens, 1)
    system = "You answer questions about this text.\n\n" + system
    asyncio.run(_shared(stack, "Be brief.", 1, 1, 4))           # warm-up, another system prompt
    before = scrape(stack, "prefill-0")
    t0 = time.perf_counter()
    rs = asyncio.run(_shared(stack, system, n, width, reply_tokens))
    wall = time.perf_counter() - t0
    after = scrape(stack, "prefill-0")
    bad = [r["error"] for r in rs if r["error"] or r["usage"] is None]
    if bad:
        raise RuntimeError(f"{len(bad)} shared-prompt request(s) failed: {bad[:2]}")
    ttfts = sorted(r["ttft"] for r in rs)
    cached = [cached_of(r["usage"]) for r in rs]
    prompt = sum(r["usage"]["prompt_tokens"] for r in rs)
    return dict(n=n, prompt=prompt, cached=None if None in cached else sum(cached),
                hit=after.get("cleave_prefix_cache_hit_tokens_total", 0) - before.get("cleave_prefix_cache_hit_tokens_total", 0),
                kv_bytes=after.get("cleave_kv_transfer_bytes_total", 0) - before.get("cleave_kv_transfer_bytes_total", 0),
                p50=statistics.median(ttfts), p90=ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], wall=wall,
                system_tokens=len(tokenizer.encode(system, add_special_tokens=False)))


# ---- stacks --------------------------------------------------------------------------------------
def start_stack(**fields) -> LocalStack:
    stack = LocalStack(StackConfig(port=0, http_port=0, log_level="WARNING", **workers(**fields)))
    stack.start()
    return stack


def child_before(args) -> int:
    """Run in the ``--before`` tree: parts 1 and 4, JSON on stdout's last line."""
    stack = start_stack()
    try:
        conc = concurrency(stack, args.level_list, args.hold)
        step = decode_step(stack)
        kv = scrape(stack, "decode-0")
    finally:
        stack.stop()
    print(json.dumps(dict(concurrency=conc, step=step, kv_usage=kv.get("cleave_kv_cache_usage_perc"))))
    return 0


def export_tree(rev: str) -> str:
    """The ``rev`` tree at /tmp/cleave-kv-before-<rev>, protos built (once)."""
    root = os.path.dirname(HERE)
    full = subprocess.run(["git", "-C", root, "rev-parse", "--short", rev], capture_output=True, text=True,
                          check=True).stdout.strip()
    tree = f"/tmp/cleave-kv-before-{full}"
    if not os.path.exists(os.path.join(tree, ".built")):
        os.makedirs(tree, exist_ok=True)
        archive = subprocess.Popen(["git", "-C", root, "archive", full], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tree], stdin=archive.stdout, check=True)
        archive.wait()
        subprocess.run([sys.executable, "protos/build.py"], cwd=tree, check=True)
        open(os.path.join(tree, ".built"), "w").close()
    return tree


def run_before(args) -> tuple[str, dict | None, str]:
    tree = export_tree(args.before)
    env = dict(os.environ, CLEAVE_KV_BENCH_TREE=tree, PYTHONPATH=f"{tree}:{tree}/protos")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-before", "--levels", args.levels,
                           "--hold", str(args.hold)], cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or not last.startswith("{"):
        return tree, None, f"the before run failed (exit {done.returncode}); see its log above"
    return tree, json.loads(last), ""


# ---- report --------------------------------------------------------------------------------------
def print_report(args, machine_line, before, before_note, after, on, off) -> None:
    print(f"\n{machine_line}")
    print(f"model {after['model']}, default stack (router + prefill + decode, a core each), 1 GiB KV cache "
          f"per worker; before = {args.before} (decode reserved prompt + max_tokens, no prefix cache), "
          f"after = this tree")
    if before_note:
        print(f"note: {before_note}")
    if after["concurrency"]:
        print_concurrency(args, before, after)
    if on and off:
        print_turns(args, on, off)
    if after["shared_on"]["n"] and after["shared_off"]["n"]:
        print_shared(args, after)
    if after["step"]:
        print_step(args, (before or {}).get("step"), after["step"])


def print_concurrency(args, before, after) -> None:
    print(f"\nconcurrent chats without max_tokens (router fills max_tokens = 8192 - prompt; each stream held "
          f"open until all decode or were refused, {args.hold:.0f} s at most)\n")
    print("| chats sent | before: served | before: 429 | before: peak decoding | after: served | after: 429 "
          "| after: peak decoding |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    brows = {r["n"]: r for r in (before or {}).get("concurrency", [])}
    for r in after["concurrency"]:
        b = brows.get(r["n"])
        bcols = f"{b['served']} | {b['refused']} | {b['peak_batch']}" if b else "n/a | n/a | n/a"
        print(f"| {r['n']} | {bcols} | {r['served']} | {r['refused']} | {r['peak_batch']} |")
    top_b = max((r["peak_batch"] for r in brows.values()), default=0)
    top_a = max(r["peak_batch"] for r in after["concurrency"])
    print(f"\nmost chats decoding at once: before {top_b or 'n/a'}, after {top_a}"
          + (f" ({top_a / top_b:.0f}x)" if top_b else "")
          + f"; the old rule floor(KV tokens / 8192) = {after['kv_tokens'] // 8192} "
            f"({after['kv_tokens']} KV tokens per worker)")


def print_turns(args, on, off) -> None:
    MiB = 1 << 20
    print(f"\nmulti-turn: {args.conversations} conversation(s) of {args.turns} turns, about {args.turn_tokens} "
          f"new user tokens per turn, {args.reply_tokens}-token replies; mean over conversations\n")
    print("| turn | prompt tokens | cached tokens (usage) | hit rate | TTFT cache on (ms) | TTFT cache off (ms) "
          "| on/off | KV pushed on (MiB) | KV pushed off (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for t in range(args.turns):
        a = [c[t] for c in on]
        o = [c[t] for c in off]
        mean = statistics.mean
        cached = [x["cached"] for x in a]
        cached_v = mean(cached) if None not in cached else mean(x["hit"] for x in a)
        ratio = mean(x["ttft"] for x in a) / mean(x["ttft"] for x in o)
        if t:
            ratios.append(ratio)
        print(f"| {t + 1} | {mean(x['prompt'] for x in a):.0f} | {cached_v:.0f}{'' if None not in cached else '*'} | "
              f"{cached_v / mean(x['prompt'] for x in a):.0%} | {mean(x['ttft'] for x in a) * 1e3:.0f} | "
              f"{mean(x['ttft'] for x in o) * 1e3:.0f} | {ratio:.2f}x | {mean(x['kv_bytes'] for x in a) / MiB:.1f} | "
              f"{mean(x['kv_bytes'] for x in o) / MiB:.1f} |")
    if any(None in [x["cached"] for x in c] for c in on):
        print("* usage had no prompt_tokens_details.cached_tokens: the prefill worker's cleave_prefix_cache_hit_tokens")
    print(f"\naim (issue 21): turn >= 2 TTFT <= 0.3x the recompute; measured {', '.join(f'{r:.2f}x' for r in ratios)}"
          f" (turns 2..{args.turns})")


def print_shared(args, after) -> None:
    MiB = 1 << 20
    print(f"\nshared system prompt: {after['shared_on']['system_tokens']}-token system prompt, "
          f"{args.shared_requests} distinct short user messages, {args.shared_concurrency} in flight, "
          f"{args.reply_tokens}-token replies\n")
    print("| prefix cache | prompt tokens | cached tokens | prefill tokens computed | KV pushed (MiB) | TTFT p50 (ms) "
          "| TTFT p90 (ms) | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in (("on", after["shared_on"]), ("off", after["shared_off"])):
        cached = r["cached"] if r["cached"] is not None else r["hit"]
        print(f"| {label} | {r['prompt']} | {cached:.0f} | {r['prompt'] - cached:.0f} | {r['kv_bytes'] / MiB:.1f} | "
              f"{r['p50'] * 1e3:.0f} | {r['p90'] * 1e3:.0f} | {r['wall']:.1f} |")
    a_on, a_off = after["shared_on"], after["shared_off"]
    print(f"\non/off: prefill tokens computed "
          f"{(a_on['prompt'] - (a_on['cached'] if a_on['cached'] is not None else a_on['hit'])) / max(1, a_off['prompt'] - (a_off['cached'] or 0)):.2f}x, "
          f"TTFT p50 {a_on['p50'] / a_off['p50']:.2f}x, p90 {a_on['p90'] / a_off['p90']:.2f}x")


def print_step(args, bs, as_) -> None:
    print("\ndecode step at 16 streams (64-token prompts, 64 new tokens, ignore_eos; the decode worker's "
          "cleave_decode_step_seconds while all 16 were in the batch)\n")
    print("| tree | step (ms) | steps | whole run mean (ms) | peak batch |")
    print("|---|---:|---:|---:|---:|")
    for label, s in ((f"before ({args.before})", bs), ("after", as_)):
        if s:
            print(f"| {label} | {s['step_s'] * 1e3:.1f} | {s['steps']} | {s['whole_s'] * 1e3:.1f} | {s['peak_batch']} |")
    if bs:
        print(f"\nafter/before: {as_['step_s'] / bs['step_s']:.2f}x (whole run {as_['whole_s'] / bs['whole_s']:.2f}x)")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="6c3ac9f", help="the commit to compare with ('' = skip it)")
    ap.add_argument("--levels", default="2,8,32,64", help="concurrent chats without max_tokens")
    ap.add_argument("--hold", type=float, default=60.0, help="seconds a concurrency level may hold its streams")
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=450, help="new user tokens per turn")
    ap.add_argument("--reply-tokens", type=int, default=16, help="max_tokens of multi-turn and shared replies")
    ap.add_argument("--shared-requests", type=int, default=64)
    ap.add_argument("--shared-concurrency", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--skip", default="", help="comma list of parts to leave out: concurrency,turns,shared,step")
    ap.add_argument("--child-before", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.level_list = [int(x) for x in args.levels.split(",") if x]
    args.skip_set = {x.strip() for x in args.skip.split(",") if x.strip()}
    return args


def main() -> int:
    args = parse_args()
    if args.child_before:
        return child_before(args)
    from bench import machine
    from engine.loader import load_model_config, load_tokenizer, resolve_model

    machine_line = machine.describe()
    print(machine_line, flush=True)
    source = resolve_model("")
    tokenizer = load_tokenizer(source)
    before, note = None, "no before run (--before '')"
    if args.before:
        t0 = time.perf_counter()
        _, before, note = run_before(args)
        print(f"  before run: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    after = dict(model=source.model_id)
    empty = dict(n=0, prompt=0, cached=0, hit=0, kv_bytes=0, p50=float("nan"), p90=float("nan"), wall=0.0,
                 system_tokens=0)
    on, off = [], []
    t0 = time.perf_counter()
    stack = start_stack()
    try:
        kv_bytes = load_model_config(source).kv_bytes_per_token()
        after["kv_tokens"] = (1 << 30) // kv_bytes // 16 * 16
        after["concurrency"] = [] if "concurrency" in args.skip_set else concurrency(stack, args.level_list, args.hold)
        if "turns" not in args.skip_set:
            on = multi_turn(stack, tokenizer, args.conversations, args.turns, args.turn_tokens, args.reply_tokens)
        after["shared_on"] = empty if "shared" in args.skip_set else shared_prompt(
            stack, tokenizer, args.shared_requests, args.system_tokens, args.shared_concurrency, args.reply_tokens)
        after["step"] = None if "step" in args.skip_set else decode_step(stack)
    finally:
        stack.stop()
    print(f"  after, cache on: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    stack = start_stack(prefix_cache=False)
    try:
        if "turns" not in args.skip_set:
            off = multi_turn(stack, tokenizer, args.conversations, args.turns, args.turn_tokens, args.reply_tokens)
        after["shared_off"] = empty if "shared" in args.skip_set else shared_prompt(
            stack, tokenizer, args.shared_requests, args.system_tokens, args.shared_concurrency, args.reply_tokens)
    finally:
        stack.stop()
    print(f"  after, cache off: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print_report(args, machine_line, before, note if before is None else "", after, on, off)
    return 0


if __name__ == "__main__":
    sys.exit(main())
