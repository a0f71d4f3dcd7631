"""Shared setup of the KV handoff tests (tests/kvtransfer/test_handoff*.py): a tiny model's cache
shape, the prefill and decode block lists a prompt's KV moves between, a transport that records
(and may tamper with) what it sends, and the landing descriptor and expected decode cache."""
from __future__ import annotations

import time

import torch

from cleave.v1.inference_pb2 import Layout
from cleave.v1.worker_pb2 import LandingDescriptor, LandingRank
from common.model import CacheConfig, ModelConfig
from engine.kv_cache import allocate_kv_cache
from kvtransfer.handoff import compat_hash
from kvtransfer.transport import KVTransport

BLOCK = 4
NUM_BLOCKS = 12
SENTINEL = -7.0
MODEL = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=4, intermediate_size=64, rope_theta=10000.0,
                    rms_norm_eps=1e-5, max_position=128, tie_word_embeddings=False)
COMPAT = compat_hash("tiny", MODEL, BLOCK)
PREFILL_BLOCKS = [5, 2, 9, 11]
DECODE_BLOCKS = [3, 7, 1, 10, 6]


class RecordingTransport(KVTransport):
    """Delegates to a real transport; records sends and may rewrite each outgoing message."""

    def __init__(self, inner: KVTransport, tamper=None) -> None:
        self.inner = inner
        self.name = inner.name
        self.tamper = tamper
        self.sends = 0

    def address(self):
        return self.inner.address()

    def post_recv(self, tag, buffer, deadline):
        return self.inner.post_recv(tag, buffer, deadline)

    def supports_device(self, device):
        return self.inner.supports_device(device)

    def send(self, peer, tag, buffer, deadline):
        self.sends += 1
        if self.tamper is not None:
            buffer = buffer.clone()
            self.tamper(buffer)
        return self.inner.send(peer, tag, buffer, deadline)

    def close(self):
        self.inner.close()


def make_cache(seed: int | None, **kw) -> torch.Tensor:
    kv = allocate_kv_cache(MODEL, CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS), **kw)
    if seed is None:
        kv.fill_(SENTINEL)
    else:
        kv.copy_(torch.randn(kv.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


def make_landing(transfer_id: str, num_tokens: int, addresses: dict[int, bytes], deadline: float | None = None,
             compat: str = COMPAT, checksum: bool = True, layout=None, source_layout=None,
             num_cached_tokens: int = 0, cached_prefix_hash: bytes = b"") -> LandingDescriptor:
    return LandingDescriptor(
        transfer_id=transfer_id, layout=layout or Layout(tp=1, pp=1),
        source_layout=source_layout or Layout(tp=1, cp=1), num_prompt_tokens=num_tokens,
        deadline_unix=time.time() + 10 if deadline is None else deadline, compat_hash=compat,
        checksum=checksum, ranks=[LandingRank(rank=r, transport_address=a) for r, a in addresses.items()],
        block_size=BLOCK, num_cached_tokens=num_cached_tokens, cached_prefix_hash=cached_prefix_hash)


def expected_decode_cache(prefill: torch.Tensor, decode_before: torch.Tensor, num_tokens: int,
                          first_token: int = 0) -> torch.Tensor:
    """``decode_before`` with tokens ``[first_token, num_tokens)`` of the prompt at PREFILL_BLOCKS
    of ``prefill`` copied to DECODE_BLOCKS."""
    out = decode_before.clone()
    for p in range(first_token, num_tokens):
        out[:, :, DECODE_BLOCKS[p // BLOCK], p % BLOCK] = prefill[:, :, PREFILL_BLOCKS[p // BLOCK], p % BLOCK]
    return out
