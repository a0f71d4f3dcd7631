"""KV transfer bandwidth between two processes: UCX and TCP transports vs a local memcpy.

Run: ``python bench/kv_transfer.py --sizes 1,16,256`` (MiB). For each backend a spawned
receiver process creates the transport and hands its address back over a Pipe; per message the
receiver posts a buffer and says "ready", the parent times ``send`` until the receiver reports
the message landed. Each size gets ``--warmup`` untimed and ``--repeats`` timed messages; the
table shows medians and the ratio to ``numpy.copyto`` bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def receiver(backend: str, sizes: list[int], count: int, conn) -> None:
    import torch
    from kvtransfer.transport import make_transport
    transport = make_transport(backend)
    conn.send(transport.address())
    try:
        for size in sizes:
            buf = torch.empty(size, dtype=torch.uint8)
            for i in range(count):
                handle = transport.post_recv(i, buf, time.time() + 60)
                conn.send("ready")
                conn.send((handle.wait(60).value, handle.error))
    finally:
        transport.close()


def transfer_bandwidths(backend: str, sizes: list[int], warmup: int, repeats: int) -> list[float]:
    import torch
    from kvtransfer.transport import make_transport
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(backend, sizes, warmup + repeats, child), daemon=True)
    proc.start()
    transport = make_transport(backend)
    address = parent.recv()
    medians = []
    try:
        for size in sizes:
            payload = torch.randint(0, 256, (size,), dtype=torch.uint8)
            times = []
            for i in range(warmup + repeats):
                assert parent.recv() == "ready"
                start = time.perf_counter()
                send = transport.send(address, i, payload, time.time() + 60)
                state, error = parent.recv()
                send.wait(60)
                elapsed = time.perf_counter() - start
                if state != "done" or send.error:
                    raise RuntimeError(f"{backend} {size} bytes failed: {error or send.error}")
                if i >= warmup:
                    times.append(elapsed)
            medians.append(size / statistics.median(times) / 1e9)
    finally:
        transport.close()
        proc.join(10)
    return medians


def memcpy_bandwidths(sizes: list[int], warmup: int, repeats: int) -> list[float]:
    result = []
    for size in sizes:
        src, dst = np.random.randint(0, 256, size, dtype=np.uint8), np.empty(size, np.uint8)
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            np.copyto(dst, src)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        result.append(size / statistics.median(times) / 1e9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,256", help="message sizes in MiB, comma separated")
    parser.add_argument("--backends", default="ucx,tcp")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(float(s) * (1 << 20)) for s in args.sizes.split(",")]
    if not sizes or min(sizes) <= 0 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"need positive sizes and repeats, got sizes={args.sizes!r} "
                         f"repeats={args.repeats} warmup={args.warmup}")
    memcpy = memcpy_bandwidths(sizes, args.warmup, args.repeats)
    backends = args.backends.split(",")
    results = {b: transfer_bandwidths(b, sizes, args.warmup, args.repeats) for b in backends}
    header = f"{'MiB':>8} {'memcpy GB/s':>12}" + "".join(
        f" {b + ' GB/s':>10} {b + '/memcpy':>11}" for b in backends)
    print(header)
    for i, size in enumerate(sizes):
        row = f"{size / (1 << 20):>8g} {memcpy[i]:>12.2f}"
        row += "".join(f" {results[b][i]:>10.2f} {results[b][i] / memcpy[i]:>11.2f}" for b in backends)
        print(row)


if __name__ == "__main__":
    main()
