"""Building blocks of the Llama-family decoder, shaped for tensor parallelism.

Callers: ``engine.model`` builds its decoder from these; ``LlamaForCausalLM.load_weights``
copies each checkpoint tensor in with :func:`load_param` (whole parameters) or
``MergedColumnLinear.load_shard`` (one of q|k|v, gate|up). Today every layer holds the
whole matrix (tp = 1). The next issue turns them into Megatron-style parallel layers, keeping
these names, shapes-per-rank and loaders' call signature:

- :class:`MergedColumnLinear` is ColumnParallel: ``Y = X A`` with ``A`` split along its output
  columns, each logical shard (q | k | v, or gate | up) split separately, so rank ``r`` of ``tp``
  holds heads ``[r*H/tp, (r+1)*H/tp)`` of q and of k/v. No communication in forward.
- :class:`RowLinear` is RowParallel: ``Y = X A`` with ``A`` split along its input rows; each rank
  multiplies its slice of ``X`` (its heads / its FFN columns) and the partial ``Y`` are
  all-reduced (the bias, if any, added once after the reduction).
- :class:`Embedding` is VocabParallel-ready: rows split across ranks, masked lookup, all-reduce.

Parameters are created empty (no random init): a model is always loaded from a checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def load_param(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """Copy a full checkpoint tensor into ``param`` (a TP layer will slice ``loaded`` first)."""
    if param.shape != loaded.shape:
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} does not match "
                         f"parameter shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


def _empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class MergedColumnLinear(nn.Module):
    """``y = x W^T (+ b)`` whose output is the concatenation of logical shards.

    ``output_sizes`` lists each shard's width (e.g. ``[H*D, KVH*D, KVH*D]`` for q|k|v,
    ``[I, I]`` for gate|up). ``load_shard(i, w, b)`` copies checkpoint tensor ``i`` into its rows.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.weight = _empty_param(sum(output_sizes), input_size, dtype=dtype)
        self.bias = _empty_param(sum(output_sizes), dtype=dtype) if bias else None

    def load_shard(self, index: int, name: str, tensor: torch.Tensor) -> None:
        """Copy shard ``index`` (``name`` is "weight" or "bias") from a full checkpoint tensor."""
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {name} for a layer built without one")
        lo = self.offsets[index]
        load_param(param[lo: lo + self.output_sizes[index]], tensor, f"shard {index} {name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowLinear(nn.Module):
    """``y = x W^T`` (no bias in the Llama family); RowParallel under TP (see module doc)."""

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty_param(output_size, input_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    """Token embedding table ``[vocab, hidden]``; also the tied LM head's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty_param(vocab_size, hidden_size, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """Holds the norm weight; the maths is ``kernels.rms_norm`` (replicated on every rank)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _empty_param(hidden_size, dtype=dtype)
