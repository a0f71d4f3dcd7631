"""Helpers shared by the Triton kernels (``kernels/triton_*.py``); imports triton.

``INTERPRETED`` is read once, when this module is imported, the same moment ``triton.jit``
decides whether the kernels below it are interpreted (``TRITON_INTERPRET=1``: they run on CPU
tensors through NumPy) or compiled for the GPU. The kernels pass it to :func:`dot` as a
constexpr because the interpreter of triton 3.x multiplies bf16 tiles wrongly in ``tl.dot``:
there the operands are widened to fp32 first, which is exact (a bf16 x bf16 product fits in
fp32) and accumulates in fp32 like the GPU's tensor cores, so the numbers checked under the
interpreter are the ones the compiled kernel computes, up to summation order. (The interpreter
also rounds fp32 -> bf16 toward zero where the GPU rounds to nearest even: bf16 results differ
from the references by up to a couple of bf16 ulps there, which the tests' tolerances allow.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def pow2(n: int, lo: int = 1) -> int:
    """Smallest power of two ``>= max(n, lo)`` (Triton block shapes must be powers of two)."""
    return max(triton.next_power_of_2(max(int(n), 1)), lo)


def dot_in_fp32(*tensors: torch.Tensor) -> bool:
    """Whether :func:`dot` must multiply in exact fp32: any fp32 operand (no TF32 rounding, to
    match the references) or running under the interpreter (see the module docstring)."""
    return INTERPRETED or any(t.dtype == torch.float32 for t in tensors)


@triton.jit
def dot(a, b, acc, FP32: tl.constexpr):
    """``acc + a @ b`` with an fp32 accumulator; ``FP32`` widens both operands and forbids TF32."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
