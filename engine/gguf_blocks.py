"""GGUF quantized blocks -> integer codes and per-group scales (numpy only, no torch).

Called by ``engine.gguf_loader`` when a model is served with ``--weights-dtype int8|int4``:
instead of dequantizing a tensor to floats, :func:`decode` keeps llama.cpp's own codes and
turns every block format it knows into one form, groups of 32 consecutive weights of a row:

    w[n, k] = codes[n, k] * scale[n, k // 32] + offset[n, k // 32]

``codes`` is ``[N, K]`` (int8 for Q8_0, uint8 0..15 for the 4-bit types), ``scale`` and
``offset`` are fp32 ``[N, K / 32]`` (``offset`` is None for Q8_0, which is symmetric).
``engine.quant`` builds its kernels' layouts from this. Block layouts (ggml-quants.c,
``gguf.quants``), each block covering 32 (Q4_K: 256) weights of one row, little-endian:

- ``Q8_0`` (34 bytes): fp16 ``d``, 32 int8 ``q``;                 ``w = d * q``
- ``Q4_0`` (18 bytes): fp16 ``d``, 16 bytes of nibbles;           ``w = d * (q - 8)``
- ``Q4_1`` (20 bytes): fp16 ``d``, fp16 ``m``, 16 bytes;          ``w = d * q + m``
  (Q4_0/Q4_1: the low nibbles of the 16 bytes are weights 0..15, the high nibbles 16..31)
- ``Q4_K`` (144 bytes per 256): fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit sub-block
  scales ``sc[j]`` and mins ``m[j]`` (j = 0..7), 128 bytes of nibbles in four 32-byte chunks
  (chunk ``c``: low nibbles are sub-block ``2c``, high nibbles ``2c + 1``);
  ``w = d * sc[j] * q - dmin * m[j]`` for sub-block ``j`` (32 weights): one group each.

Other types (Q5_*, Q6_K, IQ*, F16, ...) are not decoded here: :func:`decode` returns None and
the loader hands the layer dequantized floats, which it quantizes itself.
"""
from __future__ import annotations

import numpy as np

GROUP = 32                                     # weights per group of every decoded type
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")


def _f16(raw: np.ndarray) -> np.ndarray:
    """``[..., 2]`` uint8 -> ``[...]`` fp32 (little-endian fp16)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes -> ``[..., 32]`` codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 bytes into 6-bit ``(sc, m)``, each ``[..., 8]`` (``gguf.quants.Q4_K``)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def decode(data: np.ndarray, type_name: str, columns: int):
    """``(codes, scale, offset)`` of a 2-D tensor stored as ``type_name`` blocks, or None when
    the type is not one of :data:`BLOCK_TYPES`.

    ``data``: the reader's ``[N, bytes_per_row]`` uint8 array; ``columns``: ``K``. Raises
    ``ValueError`` when the row length does not match the type's block size."""
    sizes = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}
    if type_name not in sizes:
        return None
    per, nbytes = sizes[type_name]
    rows = data.shape[0]
    if columns % per or data.reshape(rows, -1).shape[1] != columns // per * nbytes:
        raise ValueError(f"{type_name} tensor of {columns} columns has {data.shape} bytes: not whole blocks")
    b = data.reshape(rows, columns // per, nbytes)
    if type_name == "Q8_0":
        codes = np.ascontiguousarray(b[..., 2:]).view(np.int8)
        return codes.reshape(rows, columns), _f16(b[..., 0:2]), None
    if type_name == "Q4_0":
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:]).reshape(rows, columns), d, -8.0 * d
    if type_name == "Q4_1":
        return _nibbles(b[..., 4:]).reshape(rows, columns), _f16(b[..., 0:2]), _f16(b[..., 2:4])
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _q4k_scales(b[..., 4:16])                          # [rows, super-blocks, 8]
    chunks = b[..., 16:].reshape(rows, columns // per, 4, 32)
    codes = np.stack([chunks & 0x0F, chunks >> 4], axis=3)       # [rows, sb, 4, 2 (lo|hi), 32]
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)
    offset = -(dmin * mn.astype(np.float32)).reshape(rows, -1)
    return codes.reshape(rows, columns), scale, offset
