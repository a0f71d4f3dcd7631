"""Where the time of one KV handoff goes: pack, checksum, send, verify, scatter, over UCX on one host.

Run: ``python bench/handoff_breakdown.py`` (``--tokens 1024 --checksum on,off --repeats 7``;
``--pool-mb 0`` turns the host buffer pool off, ``--decode-pp 2`` splits the KV over two decode
ranks, so two messages are in flight).

Two processes, each pinned to its own core with one torch thread, as the local stack places a
prefill and a decode worker on two cores: this one is the prefill rank (a ``KVSender`` over a
SmolLM2-135M-shaped fp32 cache, the embedded model's shape), a spawned one the decode rank(s)
(``KVReceiver``). Per handoff: the decode side posts its receives (``expect``), the prefill side
times ``push`` with a ``HandoffTimes`` (pack, CRC, first send until all sends completed), the
decode side blocks in ``wait`` (verify and scatter each piece as it lands) and reports its
``HandoffTimes`` and the time everything was in the blocks. Clocks: ``time.perf_counter``
(CLOCK_MONOTONIC, shared by the two processes).

Columns (medians): ``push`` is what the prefill worker reports as the handoff (the figure of
``bench/handoff_ttft.py``); ``landed`` runs from the start of the push until the last piece is
in the decode cache (in the stack the decode side starts once the router has relayed the
"transferred" event, so add that hop). GB/s = message bytes / time. The CRC rows time the
checksum of one payload on the host: zlib vs ``kvtransfer.crc.crc32`` (libdeflate when
installed).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 1 << 20
BLOCK = 16


def _pin(core: int) -> None:
    import torch
    if core >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _model():
    from engine.source import load_model_config, resolve_model
    return load_model_config(resolve_model(""))


def decode_side(conn, transport: str, pp: int, num_blocks: int, pool_bytes: int, core: int) -> None:
    """The decode rank(s): post, wait, report; until told None."""
    _pin(core)
    import torch

    from cleave.v1.inference_pb2 import Layout
    from common.layout import layer_range
    from kvtransfer.handoff import KVReceiver
    from kvtransfer.transport import make_transport
    model = _model()
    receivers, transports = [], []
    for p in range(pp):
        layers = layer_range(p, pp, model.num_layers)
        cache = torch.zeros(layers[1] - layers[0], 2, num_blocks, BLOCK, model.num_kv_heads,
                            model.head_dim, dtype=torch.float32)
        t = make_transport(transport)
        transports.append(t)
        receivers.append(KVReceiver(t, cache, model, Layout(tp=1, pp=pp), rank=p,
                                    layer_offset=layers[0], pool_bytes=pool_bytes))
    conn.send([t.address() for t in transports])
    try:
        while (job := conn.recv()) is not None:
            transfer_id, tokens, blocks, deadline = job
            for r in receivers:
                r.expect(transfer_id, Layout(tp=1, cp=1), tokens, deadline)
            conn.send("posted")
            for r in receivers:
                r.wait(transfer_id, blocks)
            done = time.perf_counter()
            times = [r.times(transfer_id) for r in receivers]
            for r in receivers:
                r.cancel(transfer_id)
            conn.send((done, times))
    finally:
        for t in transports:
            t.close()


def run(args, checksum: bool) -> dict[str, float]:
    import torch

    from cleave.v1.inference_pb2 import Layout
    from cleave.v1.worker_pb2 import LandingDescriptor, LandingRank
    from kvtransfer.handoff import KVSender, compat_hash
    from kvtransfer.message import HandoffTimes
    from kvtransfer.transport import make_transport
    model = _model()
    num_blocks = 2 * (-(-args.tokens // BLOCK)) + 8
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(model.num_layers, 2, num_blocks, BLOCK, model.num_kv_heads, model.head_dim,
                        generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    need = -(-args.tokens // BLOCK)
    src_blocks, dst_blocks = perm[:need], perm[need:2 * need]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=decode_side, daemon=True, args=(
        child, args.transport, args.decode_pp, num_blocks, args.pool_mb * MiB, args.cores[1]))
    proc.start()
    transport = make_transport(args.transport)
    compat = compat_hash("bench", model, BLOCK)
    sender = KVSender(transport, model, compat, Layout(tp=1, cp=1), checksum=checksum,
                      pool_bytes=args.pool_mb * MiB)
    rows = []
    try:
        addresses = parent.recv()
        for i in range(args.warmup + args.repeats):
            tid = f"bench-{checksum}-{i}"
            deadline = time.time() + 60
            parent.send((tid, args.tokens, dst_blocks, deadline))
            assert parent.recv() == "posted"
            landing = LandingDescriptor(
                transfer_id=tid, layout=Layout(tp=1, pp=args.decode_pp), source_layout=Layout(tp=1, cp=1),
                num_prompt_tokens=args.tokens, deadline_unix=deadline, compat_hash=compat,
                checksum=checksum, ranks=[LandingRank(rank=r, transport_address=a)
                                          for r, a in enumerate(addresses)])
            times = HandoffTimes()
            start = time.perf_counter()
            sent = sender.push(landing, cache, src_blocks, times=times)
            pushed = time.perf_counter()
            done, recv_times = parent.recv()
            if i < args.warmup:
                continue
            rows.append({"bytes": sent, "pack": times.pack_s, "crc": times.checksum_s,
                         "send": times.send_s, "push": pushed - start,
                         "verify": max(t.checksum_s for t in recv_times),
                         "scatter": max(t.scatter_s for t in recv_times), "landed": done - start})
        parent.send(None)
    finally:
        transport.close()
        proc.join(10)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def crc_rates(nbytes: int) -> tuple[float, float, str]:
    """GB/s of zlib and of kvtransfer.crc.crc32 over one host payload of ``nbytes``."""
    import torch

    from kvtransfer.crc import crc32, host_crc_backend
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    rates = []
    for fn in (lambda: zlib.crc32(data.numpy()), lambda: crc32(data)):
        fn()
        best = min(_timed(fn) for _ in range(5))
        rates.append(nbytes / best / 1e9)
    return rates[0], rates[1], host_crc_backend()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--transport", default="ucx", choices=["ucx", "tcp"])
    parser.add_argument("--checksum", default="on,off", help="comma list of on|off")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pool-mb", type=int, default=256, help="host buffer pool per path (0: off)")
    parser.add_argument("--decode-pp", type=int, default=1, help="decode ranks (pieces in flight)")
    parser.add_argument("--cores", default="0,1", help="prefill,decode cores (-1: unpinned)")
    args = parser.parse_args()
    args.cores = [int(c) for c in args.cores.split(",")]
    _pin(args.cores[0])
    print(f"SmolLM2-135M fp32 KV, {args.tokens} tokens, {args.transport.upper()}, decode pp={args.decode_pp}, "
          f"pool {args.pool_mb} MiB, cores {args.cores}, median of {args.repeats}")
    print("| checksum | MiB | pack ms | CRC ms | send ms | push ms | push GB/s | verify ms | "
          "scatter ms | landed ms | landed GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    nbytes = 0
    for mode in args.checksum.split(","):
        r = run(args, mode == "on")
        nbytes = r["bytes"]
        print(f"| {mode} | {r['bytes'] / MiB:.1f} | {r['pack'] * 1e3:.1f} | {r['crc'] * 1e3:.1f} | "
              f"{r['send'] * 1e3:.1f} | {r['push'] * 1e3:.1f} | {r['bytes'] / r['push'] / 1e9:.2f} | "
              f"{r['verify'] * 1e3:.1f} | {r['scatter'] * 1e3:.1f} | {r['landed'] * 1e3:.1f} | "
              f"{r['bytes'] / r['landed'] / 1e9:.2f} |")
    z, ours, backend = crc_rates(nbytes)
    print(f"CRC-32 of one {nbytes / MiB:.1f} MiB payload on the host: zlib {z:.2f} GB/s, "
          f"kvtransfer.crc ({backend}) {ours:.2f} GB/s")


if __name__ == "__main__":
    main()
