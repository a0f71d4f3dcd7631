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


def decode_step_totals(stack) -> tuple[float, int]:
    """``(seconds, steps)`` of engine decode steps so far, summed over the stack's decode workers
    (their ``cleave_decode_step_seconds`` histogram on ``/metrics``)."""
    import urllib.request

    total, count = 0.0, 0
    for name, port in stack.metrics_ports.items():
        if not name.startswith("decode"):
            continue
        text = urllib.request.urlopen(f"http://{stack.cfg.host}:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("cleave_decode_step_seconds_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("cleave_decode_step_seconds_count"):
                count += int(float(line.rsplit(" ", 1)[1]))
    return total, count
