"""GPU check step: a prefill -> decode KV handoff between two processes on one machine.

Run by ``run.py`` (``python bench/gpu_check/handoff.py --device cuda``). This process is the
prefill rank (``KVSender``); a spawned child is the decode rank (``KVReceiver``). For each
scenario (transport, prefill cache device, decode cache device) the child builds a decode
cache full of a sentinel, posts the receives and returns its transport address and message
path; this process pushes one prompt's KV from shuffled prefill blocks into shuffled decode
blocks; the child checks every landed token against the source (SHA-256 of the packed tokens,
compared here) and that no other block changed. Each scenario runs twice; the second is timed.

On CUDA: UCX CUDA -> CUDA (direct device memory when UCX has CUDA transports: CUDA IPC between
the two processes), the same with staging forced on both sides (pinned host memory), UCX
CUDA -> CPU and CPU -> CUDA (a CUDA prefill pool handing off to a CPU decode pool and back), TCP
CUDA -> CUDA (staged, TCP moves host memory only). On CPU: UCX and TCP host memory. One row each: pass when the KV landed exactly, with size, time, GB/s and paths.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from cleave.v1.inference_pb2 import Layout  # noqa: E402
from cleave.v1.worker_pb2 import LandingDescriptor, LandingRank  # noqa: E402
from common.model import CacheConfig, ModelConfig  # noqa: E402
from engine.kv_cache import allocate_kv_cache  # noqa: E402
from engine.runtime.device import resolve_device  # noqa: E402
from kernels import kv_pack  # noqa: E402
from kvtransfer.handoff import KVReceiver, KVSender, compat_hash  # noqa: E402
from kvtransfer.transport import make_transport  # noqa: E402
from rows import emit, guard  # noqa: E402

BLOCK = 16
SENTINEL = -3.0


def model_for(device: torch.device) -> tuple[ModelConfig, int]:
    """The KV shape and prompt length: Llama-3-8B-like KV (32 layers x 8 heads x 128, bf16,
    2048 tokens = 256 MiB) on CUDA, a small one on CPU."""
    if device.type == "cuda":
        return ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, num_layers=32,
                           num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                           rope_theta=500000.0, rms_norm_eps=1e-5, max_position=8192,
                           tie_word_embeddings=False, dtype="bfloat16"), 2048
    return ModelConfig(architecture="llama", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=64, intermediate_size=256, rope_theta=10000.0,
                       rms_norm_eps=1e-5, max_position=1024, tie_word_embeddings=False), 256


def _blocks(tokens: int, seed: int) -> tuple[int, list[int]]:
    """(cache size in blocks, the prompt's shuffled block ids)."""
    need = -(-tokens // BLOCK)
    total = need + 8
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:need]
    return total, order.tolist()


def _digest(cache: torch.Tensor, blocks: list[int], tokens: int) -> str:
    packed = kv_pack(cache, blocks, 0, tokens, 0, cache.shape[0], 0, cache.shape[4])
    return hashlib.sha256(packed.contiguous().cpu().view(torch.uint8).numpy()).hexdigest()


def decode_process(conn) -> None:
    """The decode rank: one receive per request from the parent, until it sends None."""
    transports = {}
    try:
        while (req := conn.recv()) is not None:
            name, device, staged, model, tokens, tid, deadline = req
            if name not in transports:
                transports[name] = make_transport(name)
            transport = transports[name]
            total, blocks = _blocks(tokens, seed=2)
            cache = allocate_kv_cache(model, CacheConfig(block_size=BLOCK, num_blocks=total), device=device)
            cache.fill_(SENTINEL)
            receiver = KVReceiver(transport, cache, model, Layout(tp=1, pp=1), force_staging=staged)
            receiver.expect(tid, Layout(tp=1, cp=1), tokens, deadline)
            conn.send((transport.address(), receiver.path.describe()))
            start, error = time.perf_counter(), None
            try:
                receiver.wait(tid, blocks)
            except Exception as exc:  # noqa: BLE001  (reported to the parent)
                error = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - start
            others = torch.ones(total, dtype=torch.bool)
            others[blocks] = False
            untouched = bool((cache[:, :, others.to(cache.device)] == SENTINEL).all())
            conn.send((error, _digest(cache, blocks, tokens), untouched, seconds))
            receiver.cancel(tid)
    finally:
        for transport in transports.values():
            transport.close()


def run_scenario(conn, senders: dict, name: str, src: torch.device, dst: torch.device, staged: bool,
                 model: ModelConfig, tokens: int) -> None:
    total, blocks = _blocks(tokens, seed=1)
    prefill = allocate_kv_cache(model, CacheConfig(block_size=BLOCK, num_blocks=total))
    prefill.copy_(torch.randn(prefill.shape, generator=torch.Generator().manual_seed(0)))
    prefill = prefill.to(src)
    want = _digest(prefill, blocks, tokens)
    compat = compat_hash("gpu-check", model, BLOCK)
    if (name, staged) not in senders:
        senders[name, staged] = KVSender(make_transport(name), model, compat, Layout(tp=1, cp=1),
                                         force_staging=staged)
    sender = senders[name, staged]
    for attempt in ("warm-up", "timed"):
        tid = f"{name}-{src}-{dst}-{staged}-{attempt}"
        deadline = time.time() + 30
        conn.send((name, dst, staged, model, tokens, tid, deadline))
        address, recv_path = conn.recv()
        landing = LandingDescriptor(transfer_id=tid, layout=Layout(tp=1, pp=1), source_layout=Layout(tp=1, cp=1),
                                    num_prompt_tokens=tokens, deadline_unix=deadline, compat_hash=compat,
                                    checksum=True, ranks=[LandingRank(rank=0, transport_address=address)])
        start = time.perf_counter()
        sent = sender.push(landing, prefill, blocks)
        push_s = time.perf_counter() - start
        error, digest, untouched, wait_s = conn.recv()
    ok = error is None and digest == want and untouched
    figure = (f"{sent / 2**20:.0f} MiB pushed in {push_s * 1e3:.0f} ms ({sent / push_s / 1e9:.2f} GB/s incl. pack "
              f"+ CRC); landed {'exactly' if ok else 'WRONG'}; sender: {sender.path(src).describe()}; "
              f"receiver: {recv_path}")
    if error:
        figure = f"{error}; {figure}"
    elif not ok:
        figure = f"{'digest differs' if digest != want else 'other blocks changed'}; {figure}"
    emit(_label(name, src, dst, staged), "pass" if ok else "fail", figure)


def _label(name: str, src: torch.device, dst: torch.device, staged: bool) -> str:
    return f"handoff {name.upper()} {src.type} -> {dst.type}{', staging forced' if staged else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
    cpu = torch.device("cpu")
    scenarios = [("ucx", device, device, False), ("ucx", device, device, True), ("ucx", device, cpu, False),
                 ("ucx", cpu, device, False), ("tcp", device, device, False)] if device.type == "cuda" else \
        [("ucx", cpu, cpu, False), ("ucx", cpu, cpu, True), ("tcp", cpu, cpu, False)]
    model, tokens = model_for(device)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=decode_process, args=(child_conn,), daemon=True)
    child.start()
    senders: dict = {}
    try:
        for name, src, dst, staged in scenarios:
            with guard(_label(name, src, dst, staged)):
                run_scenario(conn, senders, name, src, dst, staged, model, tokens)
    finally:
        conn.send(None)
        child.join(30)
        if child.is_alive():
            child.kill()
        for sender in senders.values():
            sender.transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
