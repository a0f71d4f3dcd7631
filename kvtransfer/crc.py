"""CRC-32 of a tensor's bytes computed where the bytes are, equal to ``zlib.crc32``.

Called by ``kvtransfer.handoff``: the KV message trailer carries the CRC-32 (zlib's, IEEE 802.3)
of the packed payload, and both ends compute it over the same bytes whether the payload sits
in host memory or in device memory. :func:`crc32` takes any contiguous tensor: a CPU tensor
goes to :func:`host_crc32` (no copy), a tensor on another device is checksummed there by
:func:`crc32_torch` (plain torch ops, so it also runs, and is tested, on CPU), which never
copies the payload to the host. Both return the same int in ``[0, 2**32)``.

On the host, :func:`host_crc32` calls libdeflate's ``libdeflate_crc32`` through ``ctypes`` when
the shared library is installed (Debian's ``libdeflate0``, a dependency of libtiff): the same
CRC with carry-less multiplication, 4-7x zlib 1.2's here (a 45 MiB payload: ~10 ms instead of
~15-20 ms; in cache 17 GB/s against 2.5). Without it, ``zlib.crc32``. The choice is made once
per process and logged (``host_crc_backend``); both release the GIL while they run.

How :func:`crc32_torch` works (all CRC state below is "raw": initial value 0, no final xor).
The raw CRC is linear over GF(2), so:

1. The bytes are cut into chunks of ``CHUNK`` bytes; a short first chunk counts as padded in
   front with zeros (leading zeros leave a raw CRC of 0 unchanged). The raw CRC of a chunk is
   the XOR over its positions ``j`` of ``P[j][byte_j]``, where ``P[j]`` is the 256-entry table
   of "byte b followed by ``CHUNK-1-j`` zero bytes": one gather and a halving XOR tree.
2. Adjacent chunk CRCs are merged pairwise, level by level: ``raw(A || B) = shift(raw(A), |B|)
   ^ raw(B)``, and at level ``k`` every ``|B|`` is ``CHUNK * 2**k``, so each level is one
   4 x 256 table lookup (``shift`` is a 32 x 32 GF(2) matrix, applied a byte at a time). An odd
   count gets a zero segment in front, which changes nothing.
3. zlib's CRC is ``raw(M) ^ shift(0xFFFFFFFF, len(M)) ^ 0xFFFFFFFF`` (its initial value and
   final xor), the one ``shift`` done on the host.

Memory: the gather holds 16 bytes per payload byte, so payloads are processed ``slice_bytes``
(default 8 MiB) at a time. The tables (a few hundred KiB per device) are built once per device
and cached.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import zlib

import torch

log = logging.getLogger(__name__)

POLY = 0xEDB88320            # reflected CRC-32 polynomial (zlib, IEEE 802.3)
CHUNK = 256                  # bytes per chunk in step 1 (a power of two)
SLICE_BYTES = 8 << 20        # payload bytes gathered at once
_LEVELS = 64                 # shift operators for byte counts up to 2**64


def crc32(data: torch.Tensor) -> int:
    """zlib's CRC-32 of a contiguous tensor's bytes, computed on the tensor's device."""
    flat = _bytes_of(data)
    if flat.device.type == "cpu":
        return host_crc32(flat)
    return crc32_torch(flat)


def host_crc32(data: torch.Tensor, value: int = 0, backend: str | None = None) -> int:
    """zlib's CRC-32 of a contiguous CPU tensor's bytes, continuing from ``value`` (the CRC of
    what came before, as ``zlib.crc32(data, value)``). ``backend``: ``"libdeflate"`` or
    ``"zlib"`` (default: :func:`host_crc_backend`). Raises ValueError for a tensor that is not
    a contiguous CPU tensor or an unknown or missing backend."""
    flat = _bytes_of(data)
    if flat.device.type != "cpu":
        raise ValueError(f"host_crc32 needs a CPU tensor, got one on {flat.device}")
    backend = backend or host_crc_backend()
    if flat.numel() == 0:
        return value
    if backend == "zlib":
        return zlib.crc32(flat.numpy(), value)
    if backend != "libdeflate":
        raise ValueError(f"CRC backend must be 'libdeflate' or 'zlib', got {backend!r}")
    fn = _libdeflate_crc32()
    if fn is None:
        raise ValueError("the libdeflate CRC backend was asked for but libdeflate is not installed "
                         "(apt-get install libdeflate0)")
    return fn(value, flat.data_ptr(), flat.numel())


def host_crc_backend() -> str:
    """``"libdeflate"`` when its shared library loads and agrees with zlib, else ``"zlib"``."""
    return "libdeflate" if _libdeflate_crc32() is not None else "zlib"


@functools.cache
def _libdeflate_crc32():
    """``libdeflate_crc32(crc, buf, len)`` from the installed libdeflate, or None (logged once)."""
    check = ctypes.create_string_buffer(b"123456789", 9)
    for name in ("libdeflate.so.0", ctypes.util.find_library("deflate")):
        if not name:
            continue
        try:
            fn = ctypes.CDLL(name).libdeflate_crc32
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        if fn(0, ctypes.addressof(check), 9) == zlib.crc32(b"123456789"):
            log.info("CRC-32 of KV messages on the host: libdeflate (%s)", name)
            return fn
    log.info("CRC-32 of KV messages on the host: zlib (libdeflate is not installed; it is ~4x faster)")
    return None


def crc32_torch(data: torch.Tensor, slice_bytes: int = SLICE_BYTES) -> int:
    """:func:`crc32` with torch ops on ``data``'s own device (any device, CPU included)."""
    if slice_bytes < CHUNK or slice_bytes % CHUNK:
        raise ValueError(f"slice_bytes must be a positive multiple of {CHUNK}, got {slice_bytes}")
    flat = _bytes_of(data)
    n = flat.numel()
    if n == 0:
        return 0
    tables = _tables(flat.device)
    head = n % CHUNK
    chunks = []
    if head:
        padded = torch.zeros(CHUNK, dtype=torch.uint8, device=flat.device)
        padded[CHUNK - head:] = flat[:head]
        chunks.append(_chunk_crcs(padded.view(1, CHUNK), tables.position))
    for start in range(head, n, slice_bytes):
        part = flat[start:min(n, start + slice_bytes)]
        chunks.append(_chunk_crcs(part.view(-1, CHUNK), tables.position))
    raw = _merge(torch.cat(chunks), tables.levels)
    return raw ^ _shift(0xFFFFFFFF, n) ^ 0xFFFFFFFF


def _bytes_of(data: torch.Tensor) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"crc32 needs a torch.Tensor, got {type(data).__name__}")
    if not data.is_contiguous():
        raise ValueError(f"crc32 needs a contiguous tensor, got shape {tuple(data.shape)} "
                         f"strides {data.stride()}")
    return data.reshape(-1).view(torch.uint8)


def _chunk_crcs(chunks: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Raw CRC of each row of a ``[N, CHUNK]`` uint8 tensor, as int64 ``[N]``."""
    offsets = torch.arange(CHUNK, device=chunks.device, dtype=torch.int64) * 256
    parts = position[chunks.to(torch.int64) + offsets]
    width = CHUNK
    while width > 1:
        width //= 2
        parts = parts[:, :width] ^ parts[:, width:]
    return parts[:, 0]


def _merge(crcs: torch.Tensor, levels: torch.Tensor) -> int:
    """Raw CRC of the concatenation of equal-length (``CHUNK``-byte) segments, in order."""
    level = 0
    while crcs.numel() > 1:
        if crcs.numel() % 2:
            crcs = torch.cat([crcs.new_zeros(1), crcs])
        left, right = crcs[0::2], crcs[1::2]
        table = levels[level]
        shifted = (table[0][left & 0xFF] ^ table[1][(left >> 8) & 0xFF]
                   ^ table[2][(left >> 16) & 0xFF] ^ table[3][(left >> 24) & 0xFF])
        crcs = shifted ^ right
        level += 1
    return int(crcs[0])


# ---- tables (pure functions of the polynomial; built once per device) --------------------

def _byte_table() -> list[int]:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (POLY if c & 1 else 0)
        table.append(c)
    return table


def _apply(op: list[int], x: int) -> int:
    """A 32 x 32 GF(2) matrix (``op[i]`` = image of bit ``i``) applied to ``x``."""
    out, i = 0, 0
    while x:
        if x & 1:
            out ^= op[i]
        x >>= 1
        i += 1
    return out


@functools.cache
def _byte_shift_ops() -> tuple[tuple[int, ...], ...]:
    """``ops[k]``: the raw-CRC update by ``2**k`` zero bytes, as a GF(2) matrix."""
    t = _byte_table()
    one = tuple((1 << i >> 8) ^ t[(1 << i) & 0xFF] for i in range(32))
    ops = [one]
    for _ in range(_LEVELS - 1):
        prev = ops[-1]
        ops.append(tuple(_apply(prev, prev[i]) for i in range(32)))
    return tuple(ops)


def _shift(x: int, nbytes: int) -> int:
    """Raw CRC state ``x`` advanced over ``nbytes`` zero bytes."""
    ops, k = _byte_shift_ops(), 0
    while nbytes:
        if nbytes & 1:
            x = _apply(ops[k], x)
        nbytes >>= 1
        k += 1
    return x


def _byte_lookup(op: tuple[int, ...]) -> list[list[int]]:
    """``op`` applied to each byte value at each of the 4 byte positions: 4 x 256 ints."""
    rows = []
    for i in range(4):
        row = [0] * 256
        for v in range(1, 256):
            low = v & -v
            row[v] = row[v ^ low] ^ op[8 * i + low.bit_length() - 1]
        rows.append(row)
    return rows


class _Tables:
    __slots__ = ("position", "levels")

    def __init__(self, position: torch.Tensor, levels: torch.Tensor) -> None:
        self.position, self.levels = position, levels


@functools.lru_cache(maxsize=16)
def _tables(device: torch.device) -> _Tables:
    """Read-only lookup tables on ``device``: ``position`` ``[CHUNK * 256]`` (step 1) and
    ``levels`` ``[_LEVELS - log2(CHUNK), 4, 256]`` (step 2), int64."""
    t = torch.tensor(_byte_table(), dtype=torch.int64)
    rows = [t]
    for _ in range(CHUNK - 1):               # P[j] = P[j + 1] followed by one zero byte
        prev = rows[-1]
        rows.append((prev >> 8) ^ t[prev & 0xFF])
    position = torch.stack(rows[::-1]).reshape(-1)
    first = CHUNK.bit_length() - 1           # level k shifts by CHUNK * 2**k bytes
    ops = _byte_shift_ops()
    levels = torch.tensor([_byte_lookup(ops[k]) for k in range(first, _LEVELS)], dtype=torch.int64)
    return _Tables(position.to(device), levels.to(device))
