"""Measurements ``bench/serving.py`` takes on a running local stack besides its load levels.

Caller: ``bench/serving.py`` (``make bench``), between its load levels and ``stack.stop()``;
``stack`` is a started ``services.launcher.LocalStack`` with one prefill and one decode
instance. Nothing here prints.

* :func:`handoff`: the in-stack KV handoff of one long prompt, reusing ``bench/handoff_ttft.py``
  (the prefill worker's own ``transfer_seconds`` / ``transfer_bytes`` from a direct
  ``Prefill`` call, and the client's TTFT through the router for the same length).
* :func:`worker_memory`: resident memory of each worker process (and its rank children) next
  to the bytes of weights and of KV cache it holds.
* :func:`worker_flag`: whether ``cleave worker`` has a flag (for options other work adds).
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

import grpc
import numpy as np
import psutil

from bench.handoff_ttft import client_generate, direct_handoff, worker_addresses
from cleave.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.grpc_util import internal_sync_channel


def worker_flag(flag: str) -> bool:
    """True when ``cleave worker --help`` lists ``flag`` (e.g. ``--weights-dtype``)."""
    done = subprocess.run([sys.executable, "-m", "services.cli", "worker", "--help"],
                          capture_output=True, text=True, timeout=120)
    return re.search(re.escape(flag) + r"(?![\w-])", done.stdout) is not None


def handoff(stack, router: str, prompt_tokens: int = 1024, seed: int = 0) -> dict:
    """One ``prompt_tokens``-token prompt of random ids, after a 32-token warm-up of both paths.

    Returns ``prefill_s``, ``transfer_s``, ``transfer_bytes`` (inside the prefill worker, direct
    ``Prefill`` call), ``ttft_s`` and ``second_s`` (client, through the router), ``gbps``
    (bytes / transfer seconds / 1e9) and ``share`` (transfer / (prefill + transfer): the handoff's
    part of the time from prompt to a decode-ready sequence). The router streams the first token
    as soon as prefill samples it, so the handoff lands on the second token's latency."""
    rng = np.random.default_rng(seed)
    addrs = worker_addresses(stack.redis_url)
    with grpc.insecure_channel(router) as rch, \
            internal_sync_channel(addrs["prefill"], stack.token) as pch, \
            internal_sync_channel(addrs["decode"], stack.token) as dch:
        stub = inference_pb2_grpc.InferenceStub(rch)
        prefill, decode = worker_pb2_grpc.PrefillStub(pch), worker_pb2_grpc.DecodeStub(dch)
        warm = [int(t) for t in rng.integers(100, 20000, 32)]
        client_generate(stub, warm)
        direct_handoff(prefill, decode, warm)
        ids = [int(t) for t in rng.integers(100, 20000, prompt_tokens)]
        ttft, second = client_generate(stub, ids)
        d = direct_handoff(prefill, decode, ids)
    pre, xfer, nbytes = d["prefill_s"], d["transfer_s"], d["transfer_bytes"]
    return dict(prompt_tokens=prompt_tokens, prefill_s=pre, transfer_s=xfer, transfer_bytes=nbytes,
                ttft_s=ttft, second_s=second, gbps=nbytes / xfer / 1e9 if xfer > 0 else float("nan"),
                share=xfer / (pre + xfer) if pre + xfer > 0 else float("nan"))


def worker_memory(stack, kv_bytes_per_token: int, weights: int | None) -> list[dict]:
    """One dict per live worker of ``stack``: ``name``, ``pid``, ``rss`` (bytes, the worker and
    its children summed), ``procs`` (how many processes), ``weights`` (bytes, the caller's
    figure for the served model, or None), ``kv`` (bytes of its KV blocks, from its ``Info``:
    usable blocks x block size x ``kv_bytes_per_token``)."""
    addrs = worker_addresses(stack.redis_url)
    rows = []
    for name, proc in stack.procs:
        pool = name.partition("-")[0]
        if pool not in ("prefill", "decode") or proc.poll() is not None:
            continue
        stub_cls = worker_pb2_grpc.PrefillStub if pool == "prefill" else worker_pb2_grpc.DecodeStub
        with internal_sync_channel(addrs[pool], stack.token) as ch:
            info = stub_cls(ch).Info(worker_pb2.InfoRequest(), timeout=10)
        top = psutil.Process(proc.pid)
        procs = [top, *top.children(recursive=True)]
        rss = sum(p.memory_info().rss for p in procs if p.is_running())
        rows.append(dict(name=name, pid=proc.pid, rss=rss, procs=len(procs), weights=weights,
                         kv=info.total_blocks * info.block_size * kv_bytes_per_token))
    return rows


@dataclass(frozen=True)
class StepTotals:
    """Decode-step counters of a stack's decode workers at one moment (``decode_step_totals``)."""

    seconds: float = 0.0          # sum of step times
    steps: int = 0
    tokens: int = 0               # sum of batch sizes
    token_seconds: float = 0.0    # sum of step time x batch size

    def step_since(self, before: "StepTotals") -> float:
        """The mean step (s) a stream waited for since ``before``: steps weighted by the tokens
        they made, which is what a stream's TPOT is made of when batch sizes vary (a 16-sequence
        step is felt by 16 streams, a 1-sequence step by one). A mean per token: it equals the
        step behind the load generator's TPOT (a mean per request) when every request makes
        the same number of tokens (``ignore_eos``), as the benches run them."""
        tokens = self.tokens - before.tokens
        if tokens > 0:
            return (self.token_seconds - before.token_seconds) / tokens
        return (self.seconds - before.seconds) / max(1, self.steps - before.steps)


_STEP_SERIES = {"cleave_decode_step_seconds_sum": "seconds", "cleave_decode_step_seconds_count": "steps",
                "cleave_decode_step_tokens_total": "tokens", "cleave_decode_step_token_seconds_total": "token_seconds"}


def decode_step_totals(stack) -> StepTotals:
    """The decode-step counters so far, summed over the stack's decode workers (their
    ``/metrics``: ``cleave_decode_step_seconds`` and the token-weighted counters)."""
    import urllib.request

    sums = dict.fromkeys(_STEP_SERIES.values(), 0.0)
    for name, port in stack.metrics_ports.items():
        if not name.startswith("decode"):
            continue
        text = urllib.request.urlopen(f"http://{stack.cfg.host}:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            series = line.split("{", 1)[0].split(" ", 1)[0]
            if series in _STEP_SERIES:
                sums[_STEP_SERIES[series]] += float(line.rsplit(" ", 1)[1])
    return StepTotals(sums["seconds"], int(sums["steps"]), int(sums["tokens"]), sums["token_seconds"])
