"""The KV handoff's share of TTFT for prompts of 128 to 4,096 tokens, through the real local stack.

Run: ``python bench/handoff_ttft.py`` (``--lengths 128,512,1024,2048,4096``; ``--no-checksum``
starts the workers with ``--no-checksum``; ``bench/handoff_breakdown.py`` splits the handoff into
its stages).

Starts ``services.launcher.LocalStack`` (router + one prefill + one decode worker, default model
SmolLM2-135M, ``--kv-cache-mb 1024 --threads 1``, KV transport ``--transport``, default ``ucx``)
and, per prompt length, after one warm-up of a short prompt:

* **client**: one ``Generate`` through the router with ``token_ids`` of that length,
  ``max_tokens=2`` (greedy, ``ignore_eos``); TTFT is the arrival of the first message with a
  token, "2nd token" the arrival of the second one.
* **direct**: the workers' own numbers for the same prompt: ``Decode.Reserve`` on the decode
  worker, then ``Prefill.Prefill`` with that landing; its stream reports ``prefill_seconds`` with
  the sampled token, then ``transfer_seconds`` / ``transfer_bytes`` once the KV landed on the
  decode worker. Then, as the router does, ``Decode.Decode`` for two more tokens: its first token
  comes after the decode side verified and scattered the KV and ran one step, its second one
  step later, so "decode landing" = first - (second - first) is the decode side's part of the
  handoff (plus the RPC's own overhead).

The handoff share is ``transfer / (prefill + transfer)`` as measured inside the prefill worker:
token 1 streams before the KV moves, so the handoff shows in the client's gap between token 1 and
token 2 (which also holds the decode side's verify and scatter and one decode step), printed as
its own column. Client TTFT and the direct numbers come from separate runs of the same prompt
(one each).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from cleave.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402
from common.grpc_util import internal_sync_channel  # noqa: E402
from common.registry import read_workers  # noqa: E402
from services.launcher import LocalStack, StackConfig, workers  # noqa: E402

MiB = 1 << 20


def worker_addresses(redis_url: str) -> dict[str, str]:
    import redis.asyncio as aioredis

    async def read():
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            return await read_workers(client, "cleave:")
        finally:
            await client.aclose()
    records = asyncio.run(read())
    return {rec.pool: rec.address for rec in records}


def client_generate(stub, token_ids: list[int]) -> tuple[float, float]:
    """(TTFT, time of the second token) in seconds, from the client."""
    req = inference_pb2.GenerateRequest(
        sampling=inference_pb2.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    req.token_ids.ids.extend(token_ids)
    start = time.perf_counter()
    arrivals = []
    for msg in stub.Generate(req, timeout=300):
        now = time.perf_counter() - start
        arrivals.extend([now] * len(msg.token_ids))
    if len(arrivals) < 2:
        raise RuntimeError(f"expected 2 tokens, got {len(arrivals)}")
    return arrivals[0], arrivals[1]


def direct_handoff(prefill, decode, token_ids: list[int]) -> dict:
    """Reserve on decode, Prefill with that landing, Decode two tokens, read the timings; Abort."""
    request_id = f"bench-{uuid.uuid4().hex[:12]}"
    landing = decode.Reserve(worker_pb2.ReserveRequest(
        request_id=request_id, num_prompt_tokens=len(token_ids), max_tokens=3,
        deadline_unix=time.time() + 120,
        source_layout=inference_pb2.Layout(tp=1, pp=1, cp=1, ep=1)), timeout=30)
    out = {"transfer_id": landing.transfer_id}
    try:
        start = time.perf_counter()
        req = worker_pb2.PrefillRequest(
            request_id=request_id, token_ids=token_ids,
            sampling=inference_pb2.SamplingParams(max_tokens=1), seed=0, landing=landing)
        for event in prefill.Prefill(req, timeout=300):
            now = time.perf_counter() - start
            kind = event.WhichOneof("event")
            if kind == "token_id":
                out["prefill_s"] = event.prefill_seconds
                out["token_id"] = event.token_id
                out["token_wall_s"] = now
            elif kind == "transferred":
                out["transfer_s"] = event.transferred.transfer_seconds
                out["transfer_bytes"] = event.transferred.transfer_bytes
                out["transfer_wall_s"] = now
        if "transfer_s" not in out:
            raise RuntimeError(f"prefill stream ended without a transfer event: {out}")
        start, arrivals = time.perf_counter(), []
        for chunk in decode.Decode(worker_pb2.DecodeRequest(
                transfer_id=landing.transfer_id, prompt_token_ids=token_ids, first_token_id=out["token_id"],
                sampling=inference_pb2.SamplingParams(max_tokens=3, ignore_eos=True)), timeout=300):
            arrivals.extend([time.perf_counter() - start] * len(chunk.token_ids))
        if len(arrivals) != 2:
            raise RuntimeError(f"expected 2 decoded tokens, got {len(arrivals)}")
        out["decode_step_s"] = arrivals[1] - arrivals[0]
        out["decode_landing_s"] = arrivals[0] - out["decode_step_s"]
    finally:
        decode.Abort(worker_pb2.AbortRequest(transfer_id=landing.transfer_id), timeout=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,1024,2048,4096")
    parser.add_argument("--transport", default="ucx", choices=["ucx", "tcp"])
    parser.add_argument("--threads", default="1")
    parser.add_argument("--no-checksum", action="store_true", help="workers skip the KV CRC32")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    stack = LocalStack(StackConfig(
        port=0, log_level="WARNING",
        **workers(kv_cache_bytes=1 << 30, threads=int(args.threads), transport=args.transport,
                  checksum=not args.no_checksum)))
    try:
        router = stack.start()
        print(f"stack ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        addrs = worker_addresses(stack.redis_url)
        with grpc.insecure_channel(router) as rch, \
                internal_sync_channel(addrs["prefill"], stack.token) as pch, \
                internal_sync_channel(addrs["decode"], stack.token) as dch:
            stub = inference_pb2_grpc.InferenceStub(rch)
            prefill = worker_pb2_grpc.PrefillStub(pch)
            decode = worker_pb2_grpc.DecodeStub(dch)
            free_before = decode.Info(worker_pb2.InfoRequest(), timeout=10).free_blocks
            warm = [int(t) for t in rng.integers(100, 20000, 32)]
            client_generate(stub, warm)
            direct_handoff(prefill, decode, warm)
            rows = []
            for n in lengths:
                ids = [int(t) for t in rng.integers(100, 20000, n)]
                ttft, second = client_generate(stub, ids)
                d = direct_handoff(prefill, decode, ids)
                rows.append((n, ttft, second, d))
                print(f"  {n} tokens done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            time.sleep(0.5)
            free_after = decode.Info(worker_pb2.InfoRequest(), timeout=10).free_blocks
    finally:
        stack.stop()

    print(f"transport={args.transport}, worker threads={args.threads}, "
          f"checksum={'off' if args.no_checksum else 'on'}, one run per length")
    print("| prompt tokens | KV MiB | prefill ms | handoff ms | handoff GB/s | handoff share of "
          "(prefill + handoff) % | decode landing ms | decode step ms | client TTFT ms | "
          "client 2nd token ms | 2nd - 1st token ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, ttft, second, d in rows:
        pre, xfer, nbytes = d["prefill_s"], d["transfer_s"], d["transfer_bytes"]
        print(f"| {n} | {nbytes / MiB:.1f} | {pre * 1e3:.1f} | {xfer * 1e3:.1f} | "
              f"{nbytes / xfer / 1e9 if xfer > 0 else float('nan'):.2f} | "
              f"{100 * xfer / (pre + xfer):.1f} | {d['decode_landing_s'] * 1e3:.1f} | "
              f"{d['decode_step_s'] * 1e3:.1f} | {ttft * 1e3:.1f} | {second * 1e3:.1f} | "
              f"{(second - ttft) * 1e3:.1f} |")
    print()
    print("direct Prefill RPC wall clock (client side): token event / transferred event ms:")
    for n, _, _, d in rows:
        print(f"  {n}: {d['token_wall_s'] * 1e3:.1f} / {d['transfer_wall_s'] * 1e3:.1f}")
    print(f"decode free blocks before {free_before}, after {free_after}")
    print(f"(total run {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
