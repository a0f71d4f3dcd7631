"""How a layer holds its weight matrix and multiplies by it: ``--weights-dtype fp32|bf16|int8|int4``.

Who calls what: ``engine.layers`` (``MergedColumnLinear``, ``RowLinear``, ``Embedding``) mix
in :class:`WeightStore`: the constructor calls :meth:`WeightStore.init_weight`, the loaders
call :meth:`~WeightStore.prepare` on each *full* checkpoint tensor, slice the rank's shard of
the result (``narrow``, as for a tensor) and hand it to :meth:`~WeightStore.store_rows`; the
forward passes call :meth:`~WeightStore.matmul` (and ``Embedding`` :meth:`~WeightStore.lookup`).
``engine.gguf_loader`` hands quantized GGUF tensors over as :class:`GroupQuant` (its own codes,
see ``engine.gguf_blocks``) when the model is served int8 or int4.

The modes, for a weight ``W [N, K]`` (``y = x W^T``):

- ``fp32``: ``W`` in the model dtype, ``F.linear``: the exact path every parity test checks.
- ``bf16``: ``W`` in bfloat16; ``x`` is cast to bf16 for the matmul and ``y`` back.
- ``int8``: weight-only int8, one scale per output row: ``W[n] = q[n] * s[n]``, ``q`` int8,
  ``s`` bf16; ``torch._weight_int8pack_mm`` on bf16 activations (CPU only: ``load_model``
  refuses int8 and int4 on CUDA, where these paths have not been validated). GGUF blocks (per-32 scales)
  are re-quantized per row from their dequantized values (torch has no grouped int8 kernel).
- ``int4``: weight-only 4-bit, asymmetric per group of 32 columns:
  ``W[n, k] = (q - 8) * s[g, n] + z[g, n]`` with ``g = k // 32``, ``q`` in 0..15;
  ``torch._weight_int4pack_mm_for_cpu`` (CPU only) on bf16 activations. Q4_0, Q4_1 and Q4_K
  blocks map onto it exactly (``z = offset + 8 s``; only the bf16 rounding of ``s``, ``z``
  is added); other sources are quantized min/max per group. The ``Embedding`` (token table,
  and the LM head it also is) stays int8 in this mode, as llama.cpp's Q4 files keep it Q8_0
  (int4 lookups would need their own unpacking; the head would gain ~0.2 ms per step).

Why bf16 activations: with fp32 activations torch 2.13's CPU int8/int4 kernels take a
reference path 10-40x slower than ``F.linear``. Kernel limits, checked in ``init_weight``
(``ValueError``): int8 needs ``K % 16 == 0`` (other ``K`` crash torch 2.13), int4
``K % 32 == 0``; int4 pads ``N`` to a multiple of 16 (its packing needs it).

Sharding (``engine.layers``): the full tensor is quantized *before* the rank's slice is taken,
so a shard holds exactly the rows / columns of the unsharded quantized weight. Row slices are
always fine; a column slice (row-parallel layers) must start and end on a group boundary
(32 columns; int8's one group per row takes any slice), else ``GroupQuant.narrow`` raises
``ValueError`` naming the slice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.model import WEIGHTS_DTYPES

INT4_GROUP = 32
KERNEL_DTYPE = torch.bfloat16          # activations and scales of the int8 / int4 kernels


@dataclass(frozen=True)
class GroupQuant:
    """A weight ``[N, K]`` as integer codes with an affine map per group of consecutive columns:
    ``w[n, k] = codes[n, k] * scale[n, g] + offset[n, g]`` with ``g = k // group``,
    ``group = K // scale.shape[1]`` (``offset`` None: 0). ``codes`` int8 (symmetric) or uint8
    (4-bit codes 0..15); ``scale``, ``offset`` fp32 ``[N, K / group]``. Quacks like a 2-D
    tensor for the layers' slicing (``shape``, ``dim``, ``narrow``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        g = self.scale.shape[1] if self.scale.dim() == 2 else 0
        if self.scale.shape[0] != n or not g or k % g or (
                self.offset is not None and self.offset.shape != self.scale.shape):
            raise ValueError(f"GroupQuant: codes {tuple(self.codes.shape)} do not fit scale "
                             f"{tuple(self.scale.shape)} / offset "
                             f"{None if self.offset is None else tuple(self.offset.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> "GroupQuant":
        """Rows ``[start, start + length)`` (dim 0) or columns (dim 1, on group boundaries)."""
        if dim == 0:
            cut = lambda t: None if t is None else t.narrow(0, start, length)   # noqa: E731
            return GroupQuant(cut(self.codes), cut(self.scale), cut(self.offset))
        g = self.group
        if self.scale.shape[1] == 1:                      # one group per row: any slice keeps it
            return GroupQuant(self.codes.narrow(1, start, length), self.scale, self.offset)
        if start % g or length % g:
            raise ValueError(f"columns [{start}, {start + length}) of a weight quantized in groups of "
                             f"{g} columns split a group: this tensor-parallel layout cannot shard it "
                             f"quantized (use --weights-dtype fp32/bf16 or a tp whose shards are "
                             f"multiples of {g} columns)")
        cut = lambda t: None if t is None else t.narrow(1, start // g, length // g)  # noqa: E731
        return GroupQuant(self.codes.narrow(1, start, length), cut(self.scale), cut(self.offset))

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, K]``."""
        n, k = self.codes.shape
        w = self.codes.float().view(n, -1, self.group) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(n, k)


def dense(t) -> torch.Tensor:
    """A tensor as is, a :class:`GroupQuant` dequantized to fp32."""
    return t.dequantize() if isinstance(t, GroupQuant) else t


def quantize_int8_rows(t, scale_dtype: torch.dtype = torch.float32) -> GroupQuant:
    """Symmetric int8, one scale per row: ``s = max|w[n]| / 127`` rounded up to a value of
    ``scale_dtype`` (the kernel's), ``q = round(w / s)``: the error stays within ``s / 2``."""
    w = dense(t).float()
    amax = w.abs().amax(dim=1, keepdim=True)
    exact = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    held = exact.to(scale_dtype)
    held = torch.where(held.float() < exact, torch.nextafter(held, torch.full_like(held, float("inf"))), held)
    scale = held.float()
    return GroupQuant(torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale)


def quantize_int4_groups(t, group: int = INT4_GROUP) -> GroupQuant:
    """4-bit codes 0..15 with a min/max affine map per ``group`` columns; a :class:`GroupQuant`
    that already has 4-bit codes in such groups (GGUF Q4_0/Q4_1/Q4_K) is returned as is."""
    if isinstance(t, GroupQuant) and t.codes.dtype == torch.uint8 and t.group == group \
            and t.offset is not None:
        return t
    w = dense(t).float()
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 weights need in_features divisible by {group}, got {k}")
    g = w.view(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(lo))
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return GroupQuant(codes.view(n, k), scale, lo)


def check_weights_dtype(weights: str) -> None:
    if weights not in WEIGHTS_DTYPES:
        raise ValueError(f"weights dtype must be one of {WEIGHTS_DTYPES}, got {weights!r}")


class WeightStore:
    """Mixin of ``nn.Module`` layers holding one weight ``[N, K]`` in a ``--weights-dtype`` mode
    (see the module doc). Parameter ``weight`` is the storage (its dtype and, for int4, shape
    depend on the mode); buffers ``weight_scale [N]`` (int8) or ``weight_scale_zeros
    [K/32, N16, 2]`` (int4, ``N16`` = N rounded up to 16) hold the scales."""

    def init_weight(self, rows: int, cols: int, dtype: torch.dtype, weights: str) -> None:
        check_weights_dtype(weights)
        self.weights_dtype, self.out_features, self.in_features, self.act_dtype = weights, rows, cols, dtype
        if weights in ("fp32", "bf16"):
            dt = dtype if weights == "fp32" else torch.bfloat16
            self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dt), requires_grad=False)
        elif weights == "int8":
            if cols % 16:
                raise ValueError(f"int8 weights need in_features divisible by 16 (torch's kernel), "
                                 f"got {cols}")
            self.weight = nn.Parameter(torch.empty(rows, cols, dtype=torch.int8), requires_grad=False)
            self.register_buffer("weight_scale", torch.empty(rows, dtype=KERNEL_DTYPE))
        else:
            if cols % INT4_GROUP:
                raise ValueError(f"int4 weights need in_features divisible by {INT4_GROUP}, got {cols}")
            padded = -(-rows // 16) * 16
            self.weight = nn.Parameter(torch.empty(padded, cols // 2, dtype=torch.uint8), requires_grad=False)
            self.register_buffer("weight_scale_zeros",
                                 torch.empty(cols // INT4_GROUP, padded, 2, dtype=KERNEL_DTYPE))
            self._stage: GroupQuant | None = None            # codes until every row is loaded
            self._rows_loaded = torch.zeros(rows, dtype=torch.bool, device="cpu")

    def prepare(self, tensor):
        """A full checkpoint tensor in this layer's form, ready to be sliced and stored."""
        if self.weights_dtype == "int8":
            return quantize_int8_rows(tensor, KERNEL_DTYPE)
        if self.weights_dtype == "int4":
            return quantize_int4_groups(tensor)
        return dense(tensor)

    def store_all(self, part, what: str) -> None:
        """:meth:`store_rows` of the whole weight: ``part`` must have all ``N`` rows."""
        if part.shape[0] != self.out_features:
            raise ValueError(f"{what}: checkpoint shape {tuple(part.shape)} does not match the "
                             f"[{self.out_features}, {self.in_features}] weight")
        self.store_rows(0, part, what)

    def store_rows(self, lo: int, part, what: str) -> None:
        """Copy ``part`` (``[n, K]``, from :meth:`prepare` then sliced) into rows ``[lo, lo + n)``;
        int4 packs the weight once every row has been stored."""
        n = part.shape[0]
        if part.dim() != 2 or part.shape[1] != self.in_features or not 0 <= lo <= lo + n <= self.out_features:
            raise ValueError(f"{what}: checkpoint shape {tuple(part.shape)} does not fit rows "
                             f"[{lo}, {lo + n}) of a [{self.out_features}, {self.in_features}] weight")
        with torch.no_grad():
            if self.weights_dtype in ("fp32", "bf16"):
                self.weight[lo: lo + n].copy_(dense(part))
            elif self.weights_dtype == "int8":
                self.weight[lo: lo + n].copy_(part.codes)
                self.weight_scale[lo: lo + n].copy_(part.scale[:, 0])
            else:
                self._stage_int4(lo, part)

    def _stage_int4(self, lo: int, part: GroupQuant) -> None:
        if self._stage is None:
            rows, groups = self.weight.shape[0], self.in_features // INT4_GROUP
            cpu = dict(device="cpu")
            self._stage = GroupQuant(torch.zeros(rows, self.in_features, dtype=torch.int32, **cpu),
                                     torch.zeros(rows, groups, **cpu), torch.zeros(rows, groups, **cpu))
        n, s = part.shape[0], self._stage
        s.codes[lo: lo + n] = part.codes.to(torch.int32).cpu()
        s.scale[lo: lo + n] = part.scale.cpu()
        s.offset[lo: lo + n] = (part.offset.cpu() + 8 * part.scale.cpu())   # kernel: (q - 8) s + z
        self._rows_loaded[lo: lo + n] = True
        if bool(self._rows_loaded.all()):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(s.codes, 1)
            self.weight = nn.Parameter(packed.to(self.weight.device), requires_grad=False)
            zeros = torch.stack([s.scale, s.offset], dim=-1).transpose(0, 1).contiguous()
            self.weight_scale_zeros.copy_(zeros)
            self._stage = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x W^T (+ bias) [..., N]`` in ``x``'s dtype."""
        mode = self.weights_dtype
        if mode == "fp32":
            return F.linear(x, self.weight, bias)
        lead, xk = x.shape[:-1], x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        if mode == "bf16":
            y = F.linear(xk, self.weight)
        elif mode == "int8":
            y = torch._weight_int8pack_mm(xk, self.weight, self.weight_scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(xk, self.weight, INT4_GROUP, self.weight_scale_zeros)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
        y = y.to(x.dtype).view(*lead, self.out_features)
        return y if bias is None else y + bias

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``W`` in the activation dtype (embedding tables: fp32, bf16, int8)."""
        if self.weights_dtype == "fp32":
            return F.embedding(ids, self.weight)
        rows = F.embedding(ids, self.weight).to(self.act_dtype)
        if self.weights_dtype == "int8":
            rows = rows * self.weight_scale[ids].to(self.act_dtype)[..., None]
        elif self.weights_dtype != "bf16":
            raise ValueError(f"an embedding table cannot be held as {self.weights_dtype}")
        return rows
