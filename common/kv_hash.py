"""Content hashes of KV blocks: what the prefix caches, the KV handoff and routers key on.

A full block's hash chains its parent's (the previous block's) with its own token ids, so one
hash names the whole prefix up to and including that block. The chain starts at a root that
hashes everything two instances must agree on for KV bytes to be interchangeable: the
compatibility hash (model, dtype, block size, protocol: ``kvtransfer.handoff.compat_hash``) and
the instance layout (TP/PP/CP/EP). Only full blocks have hashes; a partial last block is never
shared. Pure Python (hashlib BLAKE2b, 16-byte digests), so routers can hash prompts without the
engine. Same idea as vLLM's prefix-caching block hashes and SGLang's radix keys.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

DIGEST_BYTES = 16


def chain_root(compat: str, layout) -> bytes:
    """The parent hash of a sequence's first block on an instance with compatibility hash
    ``compat`` and ``layout`` (anything with ``tp``, ``pp``, ``cp`` and ``ep``)."""
    text = f"{compat}/tp{layout.tp}/pp{layout.pp}/cp{layout.cp}/ep{layout.ep}"
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of one full block of ``tokens`` whose previous block hashes to ``parent``."""
    return hashlib.blake2b(parent + array("I", tokens).tobytes(), digest_size=DIGEST_BYTES).digest()


def block_hashes(tokens: Sequence[int], block_size: int, root: bytes, start: int = 0,
                 parent: bytes | None = None) -> list[bytes]:
    """Hashes of the full blocks of ``tokens`` from block index ``start`` on (``parent``: the hash
    of block ``start - 1``, required when ``start`` > 0). Raises ``ValueError`` for a block size
    below 1 or a missing parent."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start and parent is None:
        raise ValueError("block_hashes from a later block needs the previous block's hash")
    out, h = [], root if parent is None else parent
    for b in range(start, len(tokens) // block_size):
        h = block_hash(h, tokens[b * block_size:(b + 1) * block_size])
        out.append(h)
    return out


def prefix_hash(tokens: Sequence[int], block_size: int, root: bytes) -> bytes:
    """The hash naming the whole of ``tokens`` (a whole number of blocks): its last block's, or
    ``root`` for no tokens. Raises ``ValueError`` when ``len(tokens)`` is not a multiple."""
    if len(tokens) % block_size:
        raise ValueError(f"a prefix hash covers whole blocks: {len(tokens)} tokens is not a multiple "
                         f"of the block size {block_size}")
    hashes = block_hashes(tokens, block_size, root)
    return hashes[-1] if hashes else root
