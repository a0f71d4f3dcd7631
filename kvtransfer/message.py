"""The KV message on the wire: one packed piece followed by a 16-byte trailer.

Called by ``kvtransfer.handoff``: :func:`build_message` on the prefill rank (pack a piece of
the paged cache, checksum it, append the trailer) and :func:`open_message` on the decode rank
(check the trailer and the checksum, return the payload for the scatter).

Format (protocol 1, part of the compatibility hash through :data:`PROTOCOL_VERSION`)::

    payload  [L, 2, T, H, D] of the cache dtype, contiguous (``kernels.kv_pack`` order)
    trailer  <IIII: magic 0x564B4C43 ("CLKV"), protocol version, CRC-32 of the payload
             (zlib's; 0 when off), has_crc (0 | 1)

The CRC is computed where the payload is (``kvtransfer.crc``): on the host by libdeflate when
it is installed (about 4x zlib here), else zlib; on a device with torch ops. All give zlib's
value, so the bytes are the same on every path.

:class:`HandoffTimes` records where the time of a push or of a landing went; the sender and
the receiver fill it (``bench/handoff_breakdown.py`` prints it).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import torch

from kernels import kv_pack
from kvtransfer.crc import crc32
from kvtransfer.plan import Piece
from kvtransfer.staging import MessagePath

PROTOCOL_VERSION = 1
MAGIC = 0x564B4C43  # "CLKV"
TRAILER = struct.Struct("<IIII")  # magic, version, crc32, has_crc


class CorruptMessage(Exception):
    """A landed message whose trailer or checksum is wrong (``kvtransfer.handoff`` turns it into
    a ``HandoffError`` that names the transfer)."""


@dataclass
class HandoffTimes:
    """Seconds per stage of one push (prefill rank) or one landing (decode rank); ``bytes`` and
    ``pieces`` count what it covered. Stages a side does not run stay 0."""

    pieces: int = 0
    bytes: int = 0
    pack_s: float = 0.0       # sender: gather the piece from the paged cache into the message
    checksum_s: float = 0.0   # sender: CRC of the payload; receiver: its verification
    send_s: float = 0.0       # sender: from the first send until every send completed
    scatter_s: float = 0.0    # receiver: payload into the paged cache
    total_s: float = 0.0      # sender: the whole push


def piece_shape(piece: Piece, head_dim: int) -> tuple[int, int, int, int, int]:
    """``(L, 2, T, H, D)`` of ``piece``'s payload."""
    return (piece.layers[1] - piece.layers[0], 2, piece.tokens[1] - piece.tokens[0],
            piece.heads[1] - piece.heads[0], head_dim)


def message_nbytes(piece: Piece, head_dim: int, element_size: int) -> int:
    """Bytes of ``piece``'s message: payload plus trailer."""
    n = element_size
    for dim in piece_shape(piece, head_dim):
        n *= dim
    return n + TRAILER.size


def build_message(path: MessagePath, kv_cache: torch.Tensor, blocks: list[int], piece: Piece,
                  head_offset: int, checksum: bool, times: HandoffTimes | None = None) -> torch.Tensor:
    """Pack ``piece`` of ``kv_cache`` (local heads start at global head ``head_offset``) into a
    message where ``path`` keeps messages, trailer written, ready for the transport to read.
    The caller gives the buffer back with ``path.release`` once its send is done."""
    t0 = time.perf_counter()
    shape = piece_shape(piece, kv_cache.shape[5])
    message = path.alloc(message_nbytes(piece, kv_cache.shape[5], kv_cache.element_size()))
    payload = message[:-TRAILER.size].view(kv_cache.dtype).view(shape)
    ranges = (piece.tokens[0], piece.tokens[1], piece.layers[0], piece.layers[1],
              piece.heads[0] - head_offset, piece.heads[1] - head_offset)
    if path.direct:
        kv_pack(kv_cache, blocks, *ranges, out=payload)
    else:
        path.to_host(kv_pack(kv_cache, blocks, *ranges), payload)
    t1 = time.perf_counter()
    crc = crc32(payload) if checksum else 0
    message[-TRAILER.size:].copy_(torch.frombuffer(
        bytearray(TRAILER.pack(MAGIC, PROTOCOL_VERSION, crc, int(checksum))), dtype=torch.uint8))
    path.ready(message)
    if times is not None:
        times.pieces += 1
        times.bytes += message.numel()
        times.pack_s += t1 - t0
        times.checksum_s += time.perf_counter() - t1
    return message


def open_message(message: torch.Tensor, times: HandoffTimes | None = None) -> torch.Tensor:
    """The payload bytes (uint8, on ``message``'s device) of a landed message, after checking
    its trailer and, when the sender computed one, its CRC. Raises :class:`CorruptMessage`."""
    t0 = time.perf_counter()
    payload, trailer = message[:-TRAILER.size], message[-TRAILER.size:]
    magic, version, crc, has_crc = TRAILER.unpack(trailer.cpu().numpy().tobytes())
    if magic != MAGIC or version != PROTOCOL_VERSION:
        raise CorruptMessage(f"bad message trailer (magic {magic:#x}, protocol {version}, "
                             f"expected {PROTOCOL_VERSION})")
    if has_crc and crc32(payload) != crc:
        raise CorruptMessage("checksum mismatch")
    if times is not None:
        times.checksum_s += time.perf_counter() - t0
    return payload
