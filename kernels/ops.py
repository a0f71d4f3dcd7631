"""Pointwise reference kernels: RMSNorm (optionally fused with the residual add), rotary
embedding and SiLU-and-mul, in plain PyTorch.

Callers: ``engine.model`` through the dispatch in ``kernels/__init__.py``; never import this
module from engine code directly. Each function follows Hugging Face ``transformers``' Llama
operation order exactly, so fp32 results on CPU match it bit for bit. A Triton version of any of
them must keep the same signature and semantics (tests compare it to these).

Tensor-parallel note: all three are local to a rank. RMSNorm sees the full hidden size (it runs
on replicated activations); rotary and SiLU-and-mul act on the rank's own heads / columns.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dim, computed in fp32.

    With ``residual`` given this is the fused form used between decoder sub-layers:
    ``x = x + residual`` first, and the sum is returned as the new residual, i.e.
    ``(rms_norm(x + residual), x + residual)``. Without it, returns only the normed tensor.
    """
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def build_rope_cache(head_dim: int, max_position: int, theta: float,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin table for the Hugging Face "default" rope: ``[max_position, head_dim]`` fp32.

    Row ``p`` is ``cat(cos(p * inv_freq), sin(p * inv_freq))`` with
    ``inv_freq = 1 / theta ** (arange(0, head_dim, 2) / head_dim)`` (each half ``head_dim/2``
    wide). Built once per model and indexed by position in :func:`rotary_embedding`.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be positive and even, got {head_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    freqs = torch.arange(max_position, dtype=torch.float, device=device)[:, None] * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # NeoX / rotate_half style: the two halves of head_dim form the (real, imaginary) pairs.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, H, D]`` and k ``[T, KVH, D]`` by their token's position ``[T]``.

    ``cos_sin_cache`` comes from :func:`build_rope_cache`. Returns new tensors (the Triton
    version may work in place; callers must use the return values).
    """
    if q.shape[-1] != cos_sin_cache.shape[-1] or k.shape[-1] != cos_sin_cache.shape[-1]:
        raise ValueError(f"head_dim of q {tuple(q.shape)} / k {tuple(k.shape)} does not match "
                         f"the rope cache {tuple(cos_sin_cache.shape)}")
    cs = cos_sin_cache[positions].to(q.dtype)[:, None, :]   # [T, 1, D]
    cos, sin = cs.chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x`` of last dim ``2*I`` (gate then up)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {tuple(x.shape)}")
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
