"""KV transfer bandwidth between two processes: our UCX (shared memory and TCP) and TCP
transports, UCX's own ``ucx_perftest tag_bw`` and gRPC, vs a local memcpy, all in one run.

Run: ``python bench/kv_transfer.py`` (sizes 1,4,16,64,256 MiB; ``--sizes`` to change them).
Columns:

* ``memcpy``: ``numpy.copyto`` in this process, the limit.
* ``UCX sm``: our ``UCXTransport`` with UCX's default config (peers connect by worker address,
  so on one host UCX picks shared memory).
* ``perftest sm``: ``ucx_perftest -t tag_bw`` with ``UCX_TLS=sm,self``.
* ``UCX tcp``: our ``UCXTransport`` with ``ucx_config={"TLS": "tcp", "NET_DEVICES": "lo"}``
  in both processes.
* ``perftest tcp``: ``ucx_perftest -t tag_bw`` with ``UCX_TLS=tcp``, ``UCX_NET_DEVICES=lo``.
* ``our TCP``: the ``tcp`` KV transport.
* ``gRPC``: a client-streaming generic gRPC call carrying the payload as 4 MiB ``bytes``
  messages; the server copies each chunk into a preallocated buffer and replies once.

For our transports a spawned receiver process creates the transport and hands its address back
over a Pipe; per message the receiver posts a buffer and says "ready", the parent times ``send``
until the receiver reports the message landed (so each timed message includes one Pipe round
trip). gRPC is timed from the start of the call to its response. Each size gets ``--warmup``
untimed and ``--repeats`` timed messages (fewer for 64 MiB and up); the table shows medians.
``ucx_perftest`` runs its own windowed loop (window 32) and reports its "overall" bandwidth,
which it prints in MiB/s; it is converted to GB/s (1e9 B/s) like every other column.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 1 << 20
GRPC_CHUNK = 4 * MiB
GRPC_METHOD = "/bench.Sink/Push"
UCX_TCP_CONFIG = {"TLS": "tcp", "NET_DEVICES": "lo"}


def repeats_for(size: int, repeats: int) -> int:
    """Fewer timed messages for big payloads to keep the whole run short."""
    if size >= 256 * MiB:
        return max(2, repeats // 2)
    if size >= 64 * MiB:
        return max(3, (repeats * 2) // 3)
    return repeats


def receiver(backend: str, options: dict, sizes: list[int], counts: list[int], conn) -> None:
    import torch
    from kvtransfer.transport import make_transport
    transport = make_transport(backend, **options)
    conn.send(transport.address())
    try:
        for size, count in zip(sizes, counts):
            buf = torch.empty(size, dtype=torch.uint8)
            for i in range(count):
                handle = transport.post_recv(i, buf, time.time() + 60)
                conn.send("ready")
                conn.send((handle.wait(60).value, handle.error))
    finally:
        transport.close()


def transfer_bandwidths(backend: str, sizes: list[int], warmup: int, repeats: int,
                        options: dict | None = None) -> list[float]:
    import torch
    from kvtransfer.transport import make_transport
    options = dict(options or {})
    counts = [warmup + repeats_for(size, repeats) for size in sizes]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(backend, options, sizes, counts, child), daemon=True)
    proc.start()
    transport = make_transport(backend, **options)
    address = parent.recv()
    medians = []
    try:
        for size, count in zip(sizes, counts):
            payload = torch.randint(0, 256, (size,), dtype=torch.uint8)
            times = []
            for i in range(count):
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


# ---------------------------------------------------------------- ucx_perftest

def _libucx_dir() -> str:
    import importlib.util
    spec = importlib.util.find_spec("libucx")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("libucx is not installed")
    return list(spec.submodule_search_locations)[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_FINAL = re.compile(r"^Final:\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", re.M)


def perftest_bandwidth(size: int, env_tls: dict[str, str]) -> float:
    """``ucx_perftest -t tag_bw`` for one size; returns its overall bandwidth in GB/s."""
    libucx = _libucx_dir()
    binary = os.path.join(libucx, "bin", "ucx_perftest")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (os.path.join(libucx, "lib"), env.get("LD_LIBRARY_PATH")) if p)
    env["UCX_WARN_UNUSED_ENV_VARS"] = "n"
    env.update(env_tls)
    iters = max(5, min(200, (1 << 30) // size))
    last_error = ""
    for _attempt in range(3):
        port = _free_port()
        cmd = [binary, "-t", "tag_bw", "-s", str(size), "-n", str(iters),
               "-w", str(max(1, iters // 10)), "-p", str(port)]
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            client = subprocess.run(cmd + ["127.0.0.1"], env=env, capture_output=True,
                                    text=True, timeout=120)
            match = _FINAL.search(client.stdout)
            if client.returncode == 0 and match:
                server.wait(30)
                # columns: iterations, overhead 50%/avg/overall (us), bandwidth avg/overall
                # (ucx_perftest's "MB/s" is MiB/s: bytes / 2**20 per second)
                return float(match.group(6)) * MiB / 1e9
            last_error = (client.stdout + client.stderr)[-500:]
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    raise RuntimeError(f"ucx_perftest {env_tls} {size} bytes failed: {last_error}")


# ---------------------------------------------------------------- gRPC

def grpc_server(conn) -> None:
    from concurrent import futures

    import grpc

    state = {"buf": None}

    def push(request_iterator, context):
        size = int(dict(context.invocation_metadata())["size"])
        buf = state["buf"]
        if buf is None or buf.size != size:
            buf = state["buf"] = np.empty(size, np.uint8)
        offset = 0
        for chunk in request_iterator:
            n = len(chunk)
            buf[offset:offset + n] = np.frombuffer(chunk, np.uint8)
            offset += n
        return str(offset).encode()

    options = [("grpc.max_receive_message_length", 64 * MiB),
               ("grpc.max_send_message_length", 64 * MiB)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    handler = grpc.method_handlers_generic_handler(
        "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    conn.recv()  # stop
    server.stop(0)


def grpc_bandwidths(sizes: list[int], warmup: int, repeats: int) -> list[float]:
    import grpc
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=grpc_server, args=(child,), daemon=True)
    proc.start()
    port = parent.recv()
    options = [("grpc.max_receive_message_length", 64 * MiB),
               ("grpc.max_send_message_length", 64 * MiB)]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    push = channel.stream_unary(GRPC_METHOD)  # no serializers: bytes in, bytes out
    result = []
    try:
        for size in sizes:
            payload = np.random.randint(0, 256, size, dtype=np.uint8)
            view = memoryview(payload)

            def chunks():
                for offset in range(0, size, GRPC_CHUNK):
                    yield bytes(view[offset:offset + GRPC_CHUNK])

            times = []
            for i in range(warmup + repeats_for(size, repeats)):
                start = time.perf_counter()
                reply = push(chunks(), metadata=(("size", str(size)),), timeout=120)
                elapsed = time.perf_counter() - start
                if int(reply) != size:
                    raise RuntimeError(f"gRPC delivered {reply!r} of {size} bytes")
                if i >= warmup:
                    times.append(elapsed)
            result.append(size / statistics.median(times) / 1e9)
    finally:
        channel.close()
        parent.send("stop")
        proc.join(10)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,64,256", help="message sizes in MiB, comma separated")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",")]
    if not sizes or min(sizes) <= 0 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"need positive sizes and repeats, got sizes={args.sizes!r} "
                         f"repeats={args.repeats} warmup={args.warmup}")
    started = time.perf_counter()
    cols: dict[str, list[float]] = {}
    cols["memcpy"] = memcpy_bandwidths(sizes, args.warmup, max(args.repeats, 15))
    cols["UCX sm"] = transfer_bandwidths("ucx", sizes, args.warmup, args.repeats)
    cols["perftest sm"] = [perftest_bandwidth(s, {"UCX_TLS": "sm,self"}) for s in sizes]
    cols["UCX tcp"] = transfer_bandwidths("ucx", sizes, args.warmup, args.repeats,
                                          {"ucx_config": UCX_TCP_CONFIG})
    cols["perftest tcp"] = [perftest_bandwidth(s, {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"})
                            for s in sizes]
    cols["our TCP"] = transfer_bandwidths("tcp", sizes, args.warmup, args.repeats)
    cols["gRPC"] = grpc_bandwidths(sizes, args.warmup, args.repeats)

    names = list(cols)
    print("| size (MiB) | " + " | ".join(f"{n} GB/s" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for i, size in enumerate(sizes):
        cells = [f"{cols['memcpy'][i]:.2f}"]
        for n in names[1:]:
            cells.append(f"{cols[n][i]:.2f} ({cols[n][i] / cols['memcpy'][i]:.2f}x)")
        print(f"| {size / MiB:g} | " + " | ".join(cells) + " |")
    print()
    print("Ratios in parentheses are vs memcpy. UCX sm / UCX tcp vs their ucx_perftest column:")
    for i, size in enumerate(sizes):
        print(f"  {size / MiB:g} MiB: UCX sm / perftest sm = "
              f"{cols['UCX sm'][i] / cols['perftest sm'][i]:.2f}, UCX tcp / perftest tcp = "
              f"{cols['UCX tcp'][i] / cols['perftest tcp'][i]:.2f}")
    print(f"(total run {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
