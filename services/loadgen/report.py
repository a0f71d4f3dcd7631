"""Figures of one ``cleave bench`` run and their table / JSON forms.

Definitions (as ``vllm bench serve`` and the DistServe paper use them):

* TTFT: send to the first piece of output. TPOT: ``(e2e - TTFT) / (output tokens - 1)`` per
  request (requests of one token have none). ITL: gaps between successive pieces of output
  (a piece may carry several tokens when the server batches them).
* Throughput over the measured window: requests/s, output tokens/s, total (prompt + output)
  tokens/s.
* Goodput at an SLO ``ttft:MS,tpot:MS`` (either may be left out): the requests that finished
  and met every target given, as a share of the requests sent (0..1) and as a rate (req/s).
  A single-token request has no TPOT and is judged on TTFT alone.

* Multi-turn conversations (``services.loadgen.conversations``) add, under ``multi_turn``:
  the prompt cache hit rate, sum of ``cached_tokens`` / sum of prompt tokens over the
  completed requests (0..1), over all turns and over turns 2 and later, and TTFT p50 per turn
  index (turn 1 first).

Percentiles are linear-interpolated (numpy's default), in milliseconds in the report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from services.loadgen.backends import Timing

_STATS = ("mean", "p50", "p90", "p99")


@dataclass(frozen=True)
class Slo:
    """Goodput targets in seconds (None = not judged)."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Slo":
        """``"ttft:500,tpot:50"`` (milliseconds) -> Slo(0.5, 0.05). Raises ValueError."""
        targets = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition(":")
            if not sep or key not in ("ttft", "tpot"):
                raise ValueError(f"goodput targets are ttft:MS and/or tpot:MS, got {part!r}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"goodput target {key} needs a number of milliseconds, got {value!r}") from None
            if ms <= 0:
                raise ValueError(f"goodput target {key} must be > 0 ms, got {ms}")
            targets[f"{key}_s"] = ms / 1000
        if not targets:
            raise ValueError(f"no goodput target in {text!r}; use e.g. ttft:500,tpot:50")
        return cls(**targets)

    def met(self, t: Timing) -> bool:
        if not t.ok:
            return False
        if self.ttft_s is not None and t.ttft > self.ttft_s:
            return False
        tpot = t.tpot
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {k: None for k in _STATS}
    arr = np.asarray(values) * 1000
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99))}


def hit_rate(timings: list[Timing]) -> float | None:
    """Sum of ``cached_tokens`` / sum of ``prompt_tokens`` over the completed requests (0..1;
    None without a prompt token)."""
    done = [t for t in timings if t.ok]
    prompt = sum(t.prompt_tokens for t in done)
    return sum(t.cached_tokens for t in done) / prompt if prompt else None


def multi_turn(timings: list[Timing], turns: list[int]) -> dict:
    """The multi-turn figures of one run; ``turns[i]``: the 1-based turn index of ``timings[i]``."""
    if len(turns) != len(timings):
        raise ValueError(f"need one turn index per timing, got {len(turns)} for {len(timings)}")
    done = [t for t in timings if t.ok]
    last = max(turns, default=0)
    by_turn = [[t for t, k in zip(timings, turns) if k == n] for n in range(1, last + 1)]
    p50 = [_stats_ms([t.ttft for t in ts if t.ok])["p50"] for ts in by_turn]
    return {"conversations": turns.count(1), "turns": last,
            "prompt_tokens": sum(t.prompt_tokens for t in done), "cached_tokens": sum(t.cached_tokens for t in done),
            "hit_rate": hit_rate(timings), "hit_rate_turns_2plus": hit_rate([t for ts in by_turn[1:] for t in ts]),
            "ttft_p50_ms_by_turn": p50}


def summarize(timings: list[Timing], duration_s: float, slo: Slo | None = None, label: str = "",
              turns: list[int] | None = None) -> dict:
    """The figures of one run as a JSON-ready dict (times in ms, rates per second). With
    ``turns`` (a multi-turn run: each timing's 1-based turn index) also ``multi_turn``."""
    done = [t for t in timings if t.ok]
    out_tokens = sum(t.output_tokens for t in done)
    in_tokens = sum(t.prompt_tokens for t in done)
    report = {
        "load": label, "requests_sent": len(timings), "requests_completed": len(done),
        "requests_failed": len(timings) - len(done), "duration_s": duration_s,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(done) / duration_s, "output_token_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": _stats_ms([t.ttft for t in done]),
        "tpot_ms": _stats_ms([t.tpot for t in done if t.tpot is not None]),
        "itl_ms": _stats_ms([gap for t in done for gap in t.itls]),
        "e2e_ms": _stats_ms([t.e2e for t in done]),
        "errors": sorted({t.error for t in timings if t.error})[:5],
    }
    if slo is not None:
        good = sum(slo.met(t) for t in timings)
        report["goodput"] = {"slo_ttft_ms": None if slo.ttft_s is None else slo.ttft_s * 1000,
                             "slo_tpot_ms": None if slo.tpot_s is None else slo.tpot_s * 1000,
                             "good_requests": good, "share": good / len(timings) if timings else 0.0,
                             "rate": good / duration_s}
    if turns is not None:
        report["multi_turn"] = multi_turn(timings, turns)
    return report


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    return ["  ".join(h.rjust(w) for h, w in zip(head, widths))] + [
        "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]


def _multi_turn_table(reports: list[dict]) -> list[str]:
    turns = max(r["multi_turn"]["turns"] for r in reports if "multi_turn" in r)
    head = ["load", "cached/prompt tok", "hit rate", "hit t>=2"] + [f"ttft p50 t{k}" for k in range(1, turns + 1)]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    rows = []
    for r in reports:
        m = r.get("multi_turn")
        if m is None:
            continue
        p50 = m["ttft_p50_ms_by_turn"] + [None] * (turns - m["turns"])
        rows.append([r["load"], f"{m['cached_tokens']}/{m['prompt_tokens']}", fmt(m["hit_rate"], ".2f"),
                     fmt(m["hit_rate_turns_2plus"], ".2f")] + [fmt(v, ".1f") for v in p50])
    return _grid(head, rows)


def table(reports: list[dict]) -> str:
    """A plain-text table, one row per load level (and one more table of the multi-turn
    figures when the run had them)."""
    head = ["load", "ok/sent", "req/s", "out tok/s"]
    for metric in ("ttft", "tpot", "itl"):
        head += [f"{metric} {s}" for s in _STATS]
    with_goodput = any("goodput" in r for r in reports)
    if with_goodput:
        head += ["goodput", "good req/s"]
    rows = []
    for r in reports:
        row = [r["load"], f"{r['requests_completed']}/{r['requests_sent']}", f"{r['request_throughput']:.2f}",
               f"{r['output_token_throughput']:.1f}"]
        for metric in ("ttft", "tpot", "itl"):
            row += ["-" if r[f"{metric}_ms"][s] is None else f"{r[f'{metric}_ms'][s]:.1f}" for s in _STATS]
        if with_goodput:
            g = r.get("goodput")
            row += [f"{g['share']:.2f}", f"{g['rate']:.2f}"] if g else ["-", "-"]
        rows.append(row)
    lines = _grid(head, rows)
    if any("multi_turn" in r for r in reports):
        m = next(r["multi_turn"] for r in reports if "multi_turn" in r)
        lines += ["", f"multi-turn: {m['conversations']} conversations x {m['turns']} turns; hit rate = cached "
                      "prompt tokens / prompt tokens (all turns, turns >= 2); TTFT p50 of each turn"]
        lines += _multi_turn_table(reports)
    return "\n".join(lines) + "\n(times in ms)"


def to_json(reports: list[dict]) -> str:
    return json.dumps(reports, indent=2)
