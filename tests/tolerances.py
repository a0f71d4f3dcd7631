"""How close two floating-point code paths must agree: a tolerance from the dtype and the
reduction length, instead of bit-for-bit equality.

Two code paths that compute the same value (a batched SDPA call and one call per sequence,
Triton and PyTorch, TP ranks and one rank, oneDNN's AMX kernel and its AVX2 one) round
differently: the order of the additions, the blocking of a reduction, fused multiply-adds and
the vector width all change the rounding errors, and vendor kernels (MKL, oneDNN, SDPA's CPU
kernel) pick them per CPU and thread count. A bit-for-bit assertion between two such paths
tests the machine, not Cleave (issue 19: the batched decode attention equalled the
per-sequence one bit for bit on an Intel Xeon with AMX, not on an AMD EPYC). So those tests
use :func:`assert_close`, which checks::

    |got - want| <= atol + rtol * |want|     elementwise, with
    rtol = ROUNDING * eps(dtype)
           + SUMMATION * sqrt(k * eps(accumulate)**2 + roundings * eps(dtype)**2)
    atol = rtol * scale

- ``eps(t) = torch.finfo(t).eps`` = 2u, ``u`` the unit roundoff.
- ``ROUNDING = 2``: each path rounds its result to ``dtype`` once, an error of at most one ulp
  even when it rounds toward zero (the Triton interpreter's fp32 -> bf16), so two paths differ
  by at most two ulps from that.
- ``SUMMATION * eps * sqrt(k)``: a sum of ``k`` terms (a dot product, a mean, a softmax
  denominator) evaluated in ``accumulate`` precision in any order has an error of at most
  ``gamma_k * sum|terms|`` with ``gamma_k = k u / (1 - k u)`` (Higham, *Accuracy and Stability
  of Numerical Algorithms*, 2nd ed., SIAM 2002, section 3.1) in the worst case. Modelling the
  rounding errors as independent mean-zero random variables (Higham and Mary, "A New Approach
  to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019), it is at most
  ``lambda * sqrt(k) * u * sum|terms|`` except with a probability of about
  ``2 k exp(-lambda**2 / 2)``: with ``lambda = 8`` below 3e-9 per element for ``k <= 10**5``.
  Two paths, each within that of the exact value, differ by at most
  ``2 * lambda * sqrt(k) * u = lambda * sqrt(k) * eps``: ``SUMMATION = lambda = 8``.
- ``roundings``: intermediate values rounded to ``dtype`` on the way (a bf16 kernel's casts of
  its inputs or of the softmax probabilities, each matmul's bf16 result in a chain), each a
  relative error of at most ``u`` of ``dtype``. Independent errors add in variance, hence one
  square root over the ``k`` accumulation and the ``roundings`` errors (0 by default).
- ``scale`` stands for ``sum|terms|``, the magnitude those errors are relative to. The default,
  ``max|want|``, is right for sums that do not cancel much (attention's convex combinations of
  values, a norm); pass a larger one where they do.
- A chain of reductions (a model from embedding to logits): ``k`` is the total number of terms
  summed along the path (:func:`model_reduction_length`), as independent errors add in
  variance. That ignores amplification by the computation's own condition number, so model
  comparisons also check what is discrete: the argmax, the greedy tokens.

Bit-for-bit equality stays right where the same kernel computes the same thing twice (a copy,
pack or transfer moves bytes; a function runs twice on the same input; the same sequence of
PyTorch ops on the same shapes), and each such test says so where it asserts it.
"""
from __future__ import annotations

import math

import torch

ROUNDING = 2.0        # ulps: each path rounds its result to the output dtype once
SUMMATION = 8.0       # lambda of the probabilistic bound, for two paths (see the module doc)


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating-point dtype (2**-23 fp32, 2**-7 bf16, 2**-10 fp16)."""
    return torch.finfo(dtype).eps


def rtol(dtype: torch.dtype, k: int = 1, accumulate: torch.dtype | None = None,
         roundings: int = 0) -> float:
    """The relative bound of two paths that sum ``k`` terms in ``accumulate`` (default:
    ``dtype``), round ``roundings`` intermediate values and the result to ``dtype``:
    ``ROUNDING eps(dtype) + SUMMATION sqrt(k eps(accumulate)**2 + roundings eps(dtype)**2)``."""
    if k < 1 or roundings < 0:
        raise ValueError(f"reduction length k={k} must be >= 1, roundings={roundings} >= 0")
    spread = k * eps(accumulate or dtype) ** 2 + roundings * eps(dtype) ** 2
    return ROUNDING * eps(dtype) + SUMMATION * math.sqrt(spread)


def tolerance(dtype: torch.dtype, k: int = 1, accumulate: torch.dtype | None = None,
              scale: float = 1.0, roundings: int = 0) -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for ``torch.testing.assert_close`` (see the module doc)."""
    r = rtol(dtype, k, accumulate, roundings)
    return dict(rtol=r, atol=r * scale)


def coarsest(*tensors: torch.Tensor) -> torch.dtype:
    """The least precise floating dtype among ``tensors`` (what both results can be held to)."""
    dtypes = [t.dtype for t in tensors if t.is_floating_point()]
    if not dtypes:
        raise ValueError("no floating-point tensor to derive a tolerance from")
    return max(dtypes, key=eps)


def assert_close(got: torch.Tensor, want: torch.Tensor, *, k: int, dtype: torch.dtype | None = None,
                 accumulate: torch.dtype | None = None, scale: float | None = None,
                 roundings: int = 0, msg: str = "") -> None:
    """Assert two code paths' results agree within :func:`tolerance` (compared in fp64).

    ``k``: the reduction length behind each element; ``dtype``: the precision of the results
    (default: the coarsest of ``got``'s and ``want``'s, so an fp64 oracle holds the other side
    to its own dtype); ``accumulate``: the precision the sums ran in (default ``dtype``);
    ``scale``: the magnitude of the summed terms (default ``max|want|``, 1 when that is 0);
    ``roundings``: intermediate values rounded to ``dtype`` on the way.
    Shapes must match; infinities must sit at the same places, NaN nowhere."""
    dtype = dtype or coarsest(got, want)
    if scale is None:
        finite = want[torch.isfinite(want)]
        scale = (float(finite.abs().max()) if finite.numel() else 0.0) or 1.0
    tol = tolerance(dtype, k, accumulate, scale, roundings)
    got64, want64 = got.detach().cpu().double(), want.detach().cpu().double()
    torch.testing.assert_close(got64, want64, **tol,
                               msg=lambda m: f"{msg + ': ' if msg else ''}{m}\n(tolerance for "
                                             f"{dtype}, k={k}, roundings={roundings}, "
                                             f"scale={scale:.3g}: {tol})")


def attention_length(head_dim: int, context: int) -> int:
    """``k`` for one attention output: the scores (``head_dim`` terms), then the softmax
    denominator and the weighted sum of the values (``context`` terms each)."""
    return head_dim + 2 * context


def model_reduction_length(config, context: int) -> int:
    """``k`` for a decoder's logits: the terms of every sum on the path from the embedding to
    one logit, ``context`` tokens attended. Per layer: two RMSNorm means and the q/k/v, gate/up
    and o projections (hidden), the attention scores (head_dim), the softmax denominator and
    the weighted values (context), the MoE router (hidden), the down projection (intermediate,
    times the experts a token is routed to); then the final norm and the head. ``config``: an
    ``common.model.ModelConfig`` or a ``transformers`` config."""
    hidden = config.hidden_size
    layers = getattr(config, "num_layers", None) or config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    moe = getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0)
    experts = getattr(config, "num_experts_per_tok", 0) if moe else 1
    per_layer = (5 * hidden + attention_length(head_dim, context)
                 + experts * config.intermediate_size + (hidden if moe else 0))
    return layers * per_layer + 2 * hidden


def model_matmuls(config) -> int:
    """The weight matmuls on the path from the embedding to one logit: q/k/v, o, gate/up and
    down per layer, then the head: the ``roundings`` of a chain whose matmuls round their
    results to bf16 (``--weights-dtype`` bf16/int8/int4 kernels)."""
    layers = getattr(config, "num_layers", None) or config.num_hidden_layers
    return 4 * layers + 1


def argmax_margin(logits: torch.Tensor, k: int, dtype: torch.dtype = torch.float32,
                  top: int = 1) -> float:
    """How decisively 1-D ``logits`` (a reference's) pick their ``top`` largest (the argmax
    by default) against any other path within :func:`tolerance` of them (scale
    ``max|logits|``): the gap between the ``top``-th and the next largest over
    ``2 (atol + rtol max|logits|)``. Above 1, every such path picks the same, so a
    token-exact comparison rests on the bound, not on how a kernel happens to round."""
    logits = logits.detach().double().flatten()
    ranked = logits.topk(top + 1).values
    scale = float(logits.abs().max())
    bound = 2 * 2 * rtol(dtype, k) * scale        # atol + rtol |x| <= 2 rtol max|x|
    return float(ranked[top - 1] - ranked[top]) / bound if bound else float("inf")


def assert_decisive(logits: torch.Tensor, k: int, msg: str = "", top: int = 1) -> None:
    """Assert :func:`argmax_margin` > 1: no near-tie that another kernel's rounding could flip."""
    margin = argmax_margin(logits, k, top=top)
    assert margin > 1, (f"{msg + ': ' if msg else ''}near-tie: logits {top} and {top + 1} are "
                        f"within {margin:.2f} x twice the fp32 bound for k={k}; an exact "
                        f"comparison here would rest on a kernel's rounding (pick another "
                        f"prompt or seed)")
