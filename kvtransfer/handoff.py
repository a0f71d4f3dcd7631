"""The KV handoff protocol between a prefill instance and a decode instance (DESIGN §4, §5).

Call order:

1. Decode rank 0 receives ``Reserve``: the decode service allocates blocks (reusing the
   prompt's leading whole blocks its prefix cache holds: ``num_cached_tokens``) and every
   decode rank's :meth:`KVReceiver.expect` posts one receive per piece of the plan it will get
   for the tokens it lacks; rank 0 returns the :class:`LandingDescriptor` (addresses, block
   ids, compat hash, deadline, ``num_cached_tokens`` and ``cached_prefix_hash``).
2. Each prefill rank, after running the prompt, calls :meth:`KVSender.push` with the landing
   descriptor: it checks the compatibility hash and the deadline *before any byte moves*,
   packs each of its pieces of tokens ``[num_cached_tokens, num_prompt_tokens)`` contiguous and
   sends it straight to the decode rank that needs it (nothing when none are left). The prefill
   service checks first, with :func:`check_cached_prefix`, that the cached tokens are its
   prompt's. Both sides compute the same plan (:func:`transfer_plan`) from the descriptor.
3. Decode waits with :meth:`KVReceiver.wait` (or polls :meth:`KVReceiver.try_land`) passing the
   sequence's block table, and each verifies and scatters every piece into those blocks as soon
   as it has landed, in whatever order the pieces land; only when all are in is the sequence
   admitted to the running batch. Nothing is written into the blocks before the decode service
   asks, and a piece whose checksum fails is never written.
4. :meth:`KVReceiver.cancel` (abort, deadline, failure) fails outstanding receives; the
   decode service frees the blocks.

Each message is the packed piece followed by a 16-byte trailer: magic, protocol version and
an optional CRC32 of the payload (``kvtransfer.message``). A sender packs piece ``i + 1`` while
piece ``i`` is in flight: every piece of a push is sent before the first is waited on. Message
buffers on the host come from a pool of the path (``kvtransfer.staging``) and go back to it
once their transfer is done, so a push does not pay fresh pages for every message.

The KV cache may live on any device. Pieces are packed and scattered on the cache's device
(``kernels.kv_pack`` / ``kv_unpack`` pick the Triton kernels on CUDA); the message itself goes
through the cache's memory when the transport can move it (UCX with CUDA), else through a
pinned host buffer (``kvtransfer.staging``; each sender and receiver logs once which). The CRC
is computed where the payload is (``kvtransfer.crc``, equal to ``zlib.crc32``), so the bytes on
the wire, the trailer included, are the same on every path and a CUDA prefill instance can hand
off to a CPU decode instance and back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from cleave.v1 import inference_pb2, worker_pb2
from common.kv_hash import chain_root, prefix_hash
from common.layout import cp_token_ranges, kv_head_range, layer_range
from common.model import ModelConfig
from kernels import kv_unpack
from kvtransfer.message import (PROTOCOL_VERSION, CorruptMessage, HandoffTimes, build_message, message_nbytes,
                                open_message, piece_shape)
from kvtransfer.plan import DestRank, Piece, SourceRank, plan_pieces
from kvtransfer.staging import POOL_BYTES, MessagePath
from kvtransfer.transport import KVTransport, Transfer, TransferState

log = logging.getLogger(__name__)


class HandoffError(RuntimeError):
    """A transfer failed: deadline, peer unreachable, corruption or cancellation."""


class NotLandedYet(HandoffError):
    """``wait`` timed out before the deadline: the transfer is still posted and may land."""


class IncompatiblePeer(HandoffError):
    """The landing descriptor's compatibility hash differs from ours: nothing was sent."""


def compat_hash(model_id: str, model: ModelConfig, block_size: int) -> str:
    """Hash of everything both sides must agree on for KV bytes to mean the same thing."""
    doc = {"model": model_id, "arch": model.architecture, "layers": model.num_layers,
           "kv_heads": model.num_kv_heads, "head_dim": model.head_dim, "dtype": model.dtype,
           "block_size": block_size, "protocol": PROTOCOL_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def check_cached_prefix(landing: worker_pb2.LandingDescriptor, prompt: list[int]) -> None:
    """Raise IncompatiblePeer unless the ``landing.num_cached_tokens`` leading tokens the decode
    instance holds are whole blocks of ``prompt`` whose chained hash (``common.kv_hash``, rooted
    at the landing's compat hash and decode layout) is ``landing.cached_prefix_hash``: the push
    skips those tokens, so they must be this prompt's. Nothing to check when none are cached.
    The prefill service calls it before computing anything."""
    k = landing.num_cached_tokens
    if k == 0:
        return
    block_size = landing.block_size
    if block_size < 1 or k % block_size:
        raise IncompatiblePeer(f"transfer {landing.transfer_id}: {k} cached tokens is not a whole number "
                               f"of blocks (block size {block_size})")
    if k > len(prompt) or k > landing.num_prompt_tokens:
        raise IncompatiblePeer(f"transfer {landing.transfer_id}: {k} cached tokens exceed the prompt "
                               f"({len(prompt)} tokens, landing says {landing.num_prompt_tokens})")
    want = prefix_hash(list(prompt[:k]), block_size, chain_root(landing.compat_hash, landing.layout))
    if want != landing.cached_prefix_hash:
        raise IncompatiblePeer(f"transfer {landing.transfer_id}: the decode instance's {k} cached tokens "
                               f"are not this prompt's prefix (hash {landing.cached_prefix_hash.hex() or '-'}, "
                               f"this prompt's {want.hex()})")


def piece_tag(transfer_id: str, index: int) -> int:
    """64-bit message tag of piece ``index`` of a transfer."""
    digest = hashlib.blake2b(f"{transfer_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def encode_landing(landing: worker_pb2.LandingDescriptor) -> bytes:
    """A landing descriptor as bytes (what crosses an instance's control channel to its ranks)."""
    return landing.SerializeToString()


def decode_landing(data: bytes) -> worker_pb2.LandingDescriptor:
    """The landing descriptor :func:`encode_landing` encoded."""
    return worker_pb2.LandingDescriptor.FromString(data)


def transfer_plan(source: inference_pb2.Layout, dest: inference_pb2.Layout, model: ModelConfig,
                  num_tokens: int, first_token: int = 0) -> list[Piece]:
    """The plan between a prefill layout (tp x cp) and a decode layout (tp x pp x ep) for tokens
    ``[first_token, num_tokens)`` of a prompt of ``num_tokens`` (the decode instance holds the
    first ``first_token`` already: ``LandingDescriptor.num_cached_tokens``). A layout is
    anything with ``tp``, ``pp``, ``cp`` and ``ep`` (``inference_pb2.Layout``,
    ``common.layout.ParallelConfig``).

    Each source rank's token ranges (with CP, its zigzag chunks of the whole prompt) are cut to
    ``[first_token, num_tokens)``, empty ones dropped; token positions stay absolute. A pure
    function of its arguments: both sides compute the same pieces in the same order, and a
    piece's index in the plan is its message tag (:func:`piece_tag`). Empty when
    ``first_token == num_tokens``. Raises ``ValueError`` unless ``0 <= first_token <= num_tokens``.

    Rank numbering follows ``engine.parallel``: a stage has ``max(tp, ep)`` ranks and rank
    ``s`` of a stage holds the KV heads of ``tp_rank = s % tp`` (attention replicas all get KV).
    """
    if not 0 <= first_token <= num_tokens:
        raise ValueError(f"first_token must be in [0, {num_tokens}], got {first_token}")
    src_tp, cp = max(source.tp, 1), max(source.cp, 1)
    src_s = max(src_tp, source.ep or 1)
    dst_tp, pp = max(dest.tp, 1), max(dest.pp, 1)
    dst_s = max(dst_tp, dest.ep or 1)

    def tokens_of(c: int) -> tuple[tuple[int, int], ...]:
        cut = ((max(lo, first_token), hi) for lo, hi in cp_token_ranges(c, cp, num_tokens))
        return tuple((lo, hi) for lo, hi in cut if lo < hi)

    sources = [SourceRank(c * src_s + s, kv_head_range(s % src_tp, src_tp, model.num_kv_heads), tokens_of(c))
               for c in range(cp) for s in range(src_s)]
    dests = [DestRank(p * dst_s + s, layer_range(p, pp, model.num_layers),
                      kv_head_range(s % dst_tp, dst_tp, model.num_kv_heads))
             for p in range(pp) for s in range(dst_s)]
    return plan_pieces(sources, dests)


@dataclass
class _Expected:
    pieces: list[tuple[Piece, Transfer, torch.Tensor]]  # (piece, Transfer, message buffer)
    num_tokens: int                                # the prompt's length (blocks must cover it)
    deadline: float
    cancelled: bool = False
    error: str | None = None                      # why the transfer failed, raised again on each call
    scattered: set = field(default_factory=set)   # indices of pieces already in the blocks
    times: HandoffTimes = field(default_factory=HandoffTimes)
    # held while landing pieces into the blocks; cancel() takes it, so once cancel returns no
    # write into the (about to be freed) blocks is in progress or can start
    lock: threading.Lock = field(default_factory=threading.Lock)


class KVReceiver:
    """Decode-rank side. The decode service calls expect() at Reserve, wait() or try_land() before
    admitting the sequence, and cancel() on abort. ``rank`` and ``layout`` place this rank in its
    instance.

    The receiver keeps no block ids: the decode instance's block manager owns them, and each
    wait() / try_land() passes the sequence's whole block table (tokens land at their absolute
    positions in it)."""

    def __init__(self, transport: KVTransport, kv_cache: torch.Tensor, model: ModelConfig,
                 layout: inference_pb2.Layout, rank: int = 0, layer_offset: int = 0,
                 head_offset: int = 0, force_staging: bool = False, pool_bytes: int = POOL_BYTES) -> None:
        """``force_staging``: receive into host buffers even when the transport could write
        the cache's device memory (tests; a fallback when device transfers misbehave).
        ``pool_bytes``: idle host message memory kept for reuse (``kvtransfer.staging``)."""
        self.transport = transport
        self.kv_cache = kv_cache
        self.model = model
        self.layout = layout
        self.rank = rank
        self.layer_offset = layer_offset  # first global layer stored in kv_cache[0]
        self.head_offset = head_offset    # first global KV head stored in kv_cache[..., 0, :]
        self._expected: dict[str, _Expected] = {}
        self._lock = threading.Lock()
        self.path = MessagePath(transport, kv_cache.device, force_staging, pool_bytes)
        log.info("KV handoff (decode rank %d): %s", rank, self.path.describe())

    def expect(self, transfer_id: str, source: inference_pb2.Layout, num_tokens: int, deadline: float,
               first_token: int = 0) -> int:
        """Post the receives for every piece this rank gets of tokens ``[first_token, num_tokens)``
        of a ``num_tokens`` prompt (``first_token``: the landing descriptor's ``num_cached_tokens``,
        the leading tokens this instance holds already); returns how many (0 when none are left:
        the transfer lands at once). Raises ValueError for a ``first_token`` outside the prompt."""
        plan = transfer_plan(source, self.layout, self.model, num_tokens, first_token)
        posted = []
        for index, piece in enumerate(plan):
            if piece.dst != self.rank:
                continue
            buf = self.path.alloc(message_nbytes(piece, self.model.head_dim, self.kv_cache.element_size()))
            handle = self.transport.post_recv(piece_tag(transfer_id, index), buf, deadline)
            posted.append((piece, handle, buf))
        with self._lock:
            self._expected[transfer_id] = _Expected(posted, num_tokens, deadline)
        return len(posted)

    def wait(self, transfer_id: str, blocks: list[int], timeout: float | None = None) -> None:
        """Block until every piece landed, verifying and scattering each into ``blocks`` (the
        sequence's block table, covering the prompt) as it lands (in any order). ``timeout``
        (seconds) bounds the wait below the deadline.

        Raises NotLandedYet when ``timeout`` ran out first (the receives stay posted),
        HandoffError when a piece failed, is corrupt, or the deadline passed, and ValueError when
        ``blocks`` do not cover the prompt."""
        exp = self._get(transfer_id)
        self._check_blocks(transfer_id, exp, blocks)
        stop = exp.deadline if timeout is None else min(exp.deadline, time.time() + timeout)
        while True:
            waiting_on = self._land_ready(transfer_id, exp, blocks)
            if waiting_on is None:
                return
            left = stop - time.time()
            if left <= 0:
                if time.time() < exp.deadline:
                    raise NotLandedYet(f"transfer {transfer_id} has not landed yet (wait timed out; "
                                       f"the transfer stays posted until its deadline)")
                if self._land_ready(transfer_id, exp, blocks) is None:   # the handles see the deadline now
                    return
                raise HandoffError(f"KV piece {exp.pieces[waiting_on][0]} of transfer {transfer_id}: "
                                   f"not landed within its deadline")
            exp.pieces[waiting_on][1].wait(left)

    def try_land(self, transfer_id: str, blocks: list[int]) -> bool:
        """Non-blocking :meth:`wait`: lands every piece that is in into ``blocks`` (the sequence's
        block table), True once all are (at once when nothing was expected); False while some
        are pending; raises on failure."""
        exp = self._get(transfer_id)
        self._check_blocks(transfer_id, exp, blocks)
        return self._land_ready(transfer_id, exp, blocks) is None

    def _check_blocks(self, transfer_id: str, exp: _Expected, blocks: list[int]) -> None:
        block_size = self.kv_cache.shape[3]
        if exp.pieces and len(blocks) * block_size < exp.num_tokens:
            raise ValueError(f"transfer {transfer_id}: {len(blocks)} blocks of {block_size} tokens cannot "
                             f"hold the {exp.num_tokens}-token prompt")

    def times(self, transfer_id: str) -> HandoffTimes | None:
        """Verify and scatter times of an expected transfer so far (None when unknown)."""
        with self._lock:
            exp = self._expected.get(transfer_id)
        return None if exp is None else HandoffTimes(**vars(exp.times))

    def _get(self, transfer_id: str) -> _Expected:
        with self._lock:
            exp = self._expected.get(transfer_id)
        if exp is None:
            raise HandoffError(f"no transfer {transfer_id!r} expected on decode rank {self.rank}")
        return exp

    def _land_ready(self, transfer_id: str, exp: _Expected, blocks: list[int]) -> int | None:
        """Verify and scatter every piece that has landed and is not in ``blocks`` yet; returns
        the index of a piece still pending, or None once all are in. Raises HandoffError."""
        with exp.lock:
            if exp.cancelled:
                raise HandoffError(f"transfer {transfer_id} was cancelled")
            if exp.error is not None:
                raise HandoffError(exp.error)
            pending = None
            for index, (piece, handle, buf) in enumerate(exp.pieces):
                if index in exp.scattered:
                    continue
                state = handle.poll()
                if state is TransferState.PENDING:
                    pending = index if pending is None else pending
                    continue
                if state is not TransferState.DONE:
                    handle.abort()
                    reason = handle.error or f"not landed within its deadline (state {state.value})"
                    exp.error = f"KV piece {piece} of transfer {transfer_id}: {reason}"
                    raise HandoffError(exp.error)
                try:
                    self._scatter(piece, buf, exp, blocks)
                except CorruptMessage as exc:
                    exp.error = f"transfer {transfer_id}: {exc} on piece {piece}"
                    raise HandoffError(exp.error) from None
                finally:
                    self.path.release(buf)   # the transport is done with it either way
                exp.scattered.add(index)
            return pending

    def _scatter(self, piece: Piece, buf: torch.Tensor, exp: _Expected, blocks: list[int]) -> None:
        payload = open_message(buf, exp.times)
        t0 = time.perf_counter()
        data = payload.view(self.kv_cache.dtype).view(piece_shape(piece, self.model.head_dim))
        if data.device != self.kv_cache.device:
            data = self.path.to_device(data)
        kv_unpack(data, self.kv_cache, blocks, piece.tokens[0],
                  piece.layers[0] - self.layer_offset, piece.heads[0] - self.head_offset)
        exp.times.scatter_s += time.perf_counter() - t0
        exp.times.pieces += 1
        exp.times.bytes += buf.numel()

    def cancel(self, transfer_id: str) -> bool:
        """Fail outstanding receives of a transfer and forget it (idempotent)."""
        with self._lock:
            exp = self._expected.pop(transfer_id, None)
        if exp is None:
            return False
        with exp.lock:
            exp.cancelled = True
        for _, handle, _ in exp.pieces:
            handle.abort()
        return True

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._expected)


class KVSender:
    """Prefill-rank side: the prefill service calls push() once the prompt's KV is in its cache."""

    def __init__(self, transport: KVTransport, model: ModelConfig, compat: str,
                 layout: inference_pb2.Layout, rank: int = 0, head_offset: int = 0,
                 checksum: bool = True, force_staging: bool = False, pool_bytes: int = POOL_BYTES) -> None:
        """``force_staging``: send from host buffers even when the transport could read the
        cache's device memory (tests; a fallback when device transfers misbehave).
        ``pool_bytes``: idle host message memory kept for reuse (``kvtransfer.staging``)."""
        self.transport = transport
        self.model = model
        self.compat = compat
        self.layout = layout
        self.rank = rank
        self.head_offset = head_offset
        self.checksum = checksum
        self.force_staging = force_staging
        self.pool_bytes = pool_bytes
        self._paths: dict[torch.device, MessagePath] = {}   # per cache device, logged once
        self._paths_lock = threading.Lock()                 # pushes run in several threads

    def path(self, device: torch.device | str) -> MessagePath:
        """The :class:`MessagePath` of a KV cache on ``device`` (made, and logged, on first use)."""
        device = torch.device(device)
        with self._paths_lock:
            path = self._paths.get(device)
            if path is None:
                path = self._paths[device] = MessagePath(self.transport, device, self.force_staging,
                                                              self.pool_bytes)
                log.info("KV handoff (prefill rank %d): %s", self.rank, path.describe())
        return path

    def check(self, landing: worker_pb2.LandingDescriptor) -> None:
        """Raise IncompatiblePeer when this instance can never fill ``landing`` (checked before
        any byte moves, and by the prefill service before any work is spent)."""
        if landing.compat_hash != self.compat:
            raise IncompatiblePeer(f"decode instance expects compat hash {landing.compat_hash}, this "
                                   f"prefill instance has {self.compat}: different model, dtype, "
                                   f"block size or protocol version; run both pools with the same "
                                   f"--model, --dtype and --block-size")
        src = landing.source_layout
        if (src.tp, src.cp) != (self.layout.tp, self.layout.cp):
            raise IncompatiblePeer(f"landing was posted for prefill layout tp={src.tp} cp={src.cp}, "
                                   f"this instance is tp={self.layout.tp} cp={self.layout.cp}")

    def push(self, landing: worker_pb2.LandingDescriptor, kv_cache: torch.Tensor,
             blocks: list[int], cancelled: threading.Event | None = None,
             timeout: float = 0.0, times: HandoffTimes | None = None) -> int:
        """Send this rank's pieces of tokens ``[landing.num_cached_tokens, num_prompt_tokens)``
        (what the decode instance lacks; ``blocks``: the prompt's whole block table here, tokens
        are read at their absolute positions); returns bytes sent, 0 when nothing is left to
        send. Raises HandoffError / IncompatiblePeer (also for a cached count that is not whole
        blocks of the prompt; :func:`check_cached_prefix` checks the tokens themselves).

        Each piece is packed and sent before the next is packed, and all are in flight before
        the first is waited on. The sends must finish by the landing deadline and, when
        ``timeout`` > 0, within ``timeout`` seconds from now. ``times``, when given, gets the
        time per stage added (``bench/handoff_breakdown.py``)."""
        start = time.perf_counter()
        deadline = landing.deadline_unix if timeout <= 0 else min(landing.deadline_unix, time.time() + timeout)
        self.check(landing)
        if time.time() >= deadline:
            raise HandoffError(f"transfer {landing.transfer_id}: deadline passed before sending")
        addresses = {r.rank: r.transport_address for r in landing.ranks}
        cached, block_size = landing.num_cached_tokens, kv_cache.shape[3]
        if cached > landing.num_prompt_tokens or cached % block_size:
            raise IncompatiblePeer(f"transfer {landing.transfer_id}: the decode instance holds {cached} "
                                   f"cached tokens, not a whole number of {block_size}-token blocks within "
                                   f"the {landing.num_prompt_tokens}-token prompt")
        plan = transfer_plan(self.layout, landing.layout, self.model, landing.num_prompt_tokens, cached)
        path = self.path(kv_cache.device)
        checksum = landing.checksum and self.checksum
        handles, sent, first_send = [], 0, None
        for index, piece in enumerate(plan):
            if piece.src != self.rank:
                continue
            if piece.dst not in addresses:
                raise HandoffError(f"landing descriptor has no address for decode rank {piece.dst}")
            message = build_message(path, kv_cache, blocks, piece, self.head_offset, checksum, times)
            first_send = time.perf_counter() if first_send is None else first_send
            handles.append((piece, self.transport.send(addresses[piece.dst], piece_tag(landing.transfer_id, index),
                                                       message, deadline), message))
            sent += message.numel()
        for piece, handle, message in handles:
            while handle.poll() is TransferState.PENDING:
                if cancelled is not None and cancelled.is_set():
                    for _, h, _ in handles:
                        h.abort()
                    raise HandoffError(f"transfer {landing.transfer_id} cancelled")
                handle.wait(0.05)
            if handle.poll() is not TransferState.DONE:
                for _, h, _ in handles:
                    h.abort()
                raise HandoffError(f"sending KV piece {piece} of transfer {landing.transfer_id} "
                                   f"failed: {handle.error} (deadline {deadline:.3f})")
            path.release(message)     # done: the transport no longer reads it
        if times is not None:
            end = time.perf_counter()
            times.send_s += end - (first_send or end)
            times.total_s += end - start
        return sent
