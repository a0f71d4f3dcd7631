"""PyTorch reference kernels that move KV between the paged cache and transfer buffers.

Called by the KV handoff layer (DESIGN §5): the prefill rank packs one piece with
:func:`kv_pack` and sends it; the decode rank receives it into a buffer sized with
:func:`kv_piece_shape` / :func:`kv_piece_nbytes` and scatters it with :func:`kv_unpack`.
A later issue adds Triton twins with the same signatures.

Cache layout (``common.model.CacheConfig``)::

    kv[layer, 0 (K) | 1 (V), block, slot_in_block, kv_head, head_dim]

Token position ``p`` of a sequence with block table ``bt`` lives at block ``bt[p // bs]``,
slot ``p % bs``. A piece covers tokens ``[token_start, token_end)``, layers
``[layer_start, layer_end)`` and kv heads ``[head_start, head_end)`` and is packed contiguous
as ``[L, 2, T, H, D]``. Both kernels gather/scatter with one ``index_select`` /
``index_copy_`` over flat slot indices ``block * bs + slot`` (no Python loop over tokens).
"""
from __future__ import annotations

import torch


def kv_piece_shape(token_start: int, token_end: int, layer_start: int, layer_end: int,
                   head_start: int, head_end: int, head_dim: int) -> tuple[int, int, int, int, int]:
    """Shape ``(L, 2, T, H, D)`` of the packed piece for these ranges."""
    for lo, hi, what in ((token_start, token_end, "token"), (layer_start, layer_end, "layer"),
                         (head_start, head_end, "head")):
        if not 0 <= lo <= hi:
            raise ValueError(f"{what} range must satisfy 0 <= start <= end, got [{lo}, {hi})")
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return (layer_end - layer_start, 2, token_end - token_start, head_end - head_start, head_dim)


def kv_piece_nbytes(token_start: int, token_end: int, layer_start: int, layer_end: int,
                    head_start: int, head_end: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of the packed piece for these ranges and ``dtype``."""
    shape = kv_piece_shape(token_start, token_end, layer_start, layer_end, head_start, head_end,
                           head_dim)
    numel = 1
    for n in shape:
        numel *= n
    return numel * torch.empty((), dtype=dtype).element_size()


def _flat_slots(kv_cache: torch.Tensor, block_table, token_start: int, token_end: int) -> torch.Tensor:
    """Flat slot index (``block * block_size + slot``) of each token in the range."""
    num_blocks, block_size = kv_cache.shape[2], kv_cache.shape[3]
    table = torch.as_tensor(block_table, dtype=torch.long, device=kv_cache.device).reshape(-1)
    if not 0 <= token_start <= token_end <= table.numel() * block_size:
        raise ValueError(f"token range [{token_start}, {token_end}) does not fit a block table of "
                         f"{table.numel()} blocks x {block_size} slots")
    positions = torch.arange(token_start, token_end, device=kv_cache.device)
    blocks = table[positions // block_size]
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
        raise ValueError(f"block ids {blocks.unique().tolist()} out of range for a cache of "
                         f"{num_blocks} blocks")
    return blocks * block_size + positions % block_size


def _flat_cache(kv_cache: torch.Tensor, layer_start: int, layer_end: int,
                head_start: int, head_end: int) -> torch.Tensor:
    """View ``[L', 2, num_blocks * block_size, H', D]`` of the cache (never a copy)."""
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [layers, 2, blocks, block_size, kv_heads, head_dim], "
                         f"got shape {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be contiguous, got strides {kv_cache.stride()}")
    layers, _, blocks, block_size, heads, dim = kv_cache.shape
    if not 0 <= layer_start <= layer_end <= layers:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) outside 0..{layers}")
    if not 0 <= head_start <= head_end <= heads:
        raise ValueError(f"head range [{head_start}, {head_end}) outside 0..{heads}")
    flat = kv_cache.view(layers, 2, blocks * block_size, heads, dim)
    return flat[layer_start:layer_end, :, :, head_start:head_end]


def pack_view(kv_cache: torch.Tensor, block_table, token_start: int, token_end: int,
              layer_start: int, layer_end: int, head_start: int, head_end: int,
              out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Validate a pack and return (source view of the cache, slot ids, piece shape).
    Shared by this reference and ``kernels.triton_kv``."""
    source = _flat_cache(kv_cache, layer_start, layer_end, head_start, head_end)
    slots = _flat_slots(kv_cache, block_table, token_start, token_end)
    shape = kv_piece_shape(token_start, token_end, layer_start, layer_end, head_start, head_end,
                           kv_cache.shape[5])
    if out is not None and (tuple(out.shape) != shape or out.dtype != kv_cache.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {shape} {kv_cache.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype} contiguous={out.is_contiguous()}")
    return source, slots, shape


def unpack_view(buf: torch.Tensor, kv_cache: torch.Tensor, block_table, token_start: int,
                layer_start: int, head_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an unpack and return (target view of the cache, slot ids) ``buf`` scatters into.
    Shared by this reference and ``kernels.triton_kv``."""
    if buf.dim() != 5 or buf.shape[1] != 2:
        raise ValueError(f"buf must be [layers, 2, tokens, heads, head_dim], got {tuple(buf.shape)}")
    if buf.dtype != kv_cache.dtype or buf.shape[4] != kv_cache.shape[5]:
        raise ValueError(f"buf {tuple(buf.shape)} {buf.dtype} does not match cache "
                         f"{tuple(kv_cache.shape)} {kv_cache.dtype}")
    layers, _, tokens, heads, _ = buf.shape
    target = _flat_cache(kv_cache, layer_start, layer_start + layers,
                         head_start, head_start + heads)
    return target, _flat_slots(kv_cache, block_table, token_start, token_start + tokens)


def kv_pack(kv_cache: torch.Tensor, block_table, token_start: int, token_end: int,
            layer_start: int, layer_end: int, head_start: int, head_end: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather tokens/layers/heads of one sequence into a contiguous ``[L, 2, T, H, D]`` tensor."""
    source, slots, _ = pack_view(kv_cache, block_table, token_start, token_end, layer_start,
                                 layer_end, head_start, head_end, out)
    if out is None:
        return torch.index_select(source, 2, slots)
    return torch.index_select(source, 2, slots, out=out)


def kv_unpack(buf: torch.Tensor, kv_cache: torch.Tensor, block_table, token_start: int,
              layer_start: int, head_start: int) -> None:
    """Scatter a packed ``[L, 2, T, H, D]`` piece into the paged cache (inverse of kv_pack)."""
    target, slots = unpack_view(buf, kv_cache, block_table, token_start, layer_start, head_start)
    target.index_copy_(2, slots, buf)
