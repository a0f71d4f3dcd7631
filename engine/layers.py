"""Building blocks of the Llama-family decoder: Megatron-style tensor-parallel layers.

Callers: ``engine.model`` builds its decoder from these and ``LlamaForCausalLM.load_weights``
feeds each *full* checkpoint tensor to the owning layer's loader (``load_shard`` for one of
q|k|v or gate|up, ``load`` for a row-parallel weight, :func:`load_param` for replicated
parameters); the layer slices out the rank's shard. With one rank (``tp is None`` or size 1)
every layer holds the whole matrix and runs exactly the single-rank maths.

- :class:`MergedColumnLinear` is ColumnParallel: ``Y = X A`` with ``A = [A_1 | ... | A_tp]``
  split along its output columns; each logical shard (q | k | v, or gate | up) is split
  separately, so rank ``r`` holds rows ``[off_i, off_i + n_i)`` of checkpoint tensor ``i``
  (``off_i`` given by the model: query heads ``[r*H/tp, (r+1)*H/tp)``, kv heads per
  ``common.layout.kv_head_range``, FFN columns ``[r*I/tp, (r+1)*I/tp)``). No communication:
  the rank's output ``Y_r = X A_r`` is exactly its heads / FFN columns.
- :class:`RowLinear` is RowParallel: ``Y = X A`` with ``A`` split along its input rows
  (``A^T`` columns ``[off, off + n)`` in checkpoint layout ``[out, in]``); each rank
  multiplies its slice ``X_r`` (its heads / its FFN columns, the output of the column-parallel
  layer before it) and the partial ``Y = sum_r X_r A_r`` are summed with ONE
  ``tp.all_reduce``. This gives the Megatron pairing: one all-reduce per attention block and
  one per MLP block.
- :class:`Embedding` (token table, and the LM head) is replicated on every rank: the vocab of
  the models we serve is small, so a replicated table costs little memory and no
  communication (a vocab-parallel head would need an all-gather of logits per step).
- :class:`RMSNorm` weights are replicated.

Parameters are created empty (no random init): a model is always loaded from a checkpoint.
The linear layers and the embedding hold their weight in the ``weights`` mode of
``engine.quant`` (``--weights-dtype``: fp32 = the model dtype, exact; bf16, int8, int4):
each full checkpoint tensor is first put in that form (``prepare``), then sliced, then stored.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.quant import GroupQuant, WeightStore


def load_param(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """Copy a tensor (a :class:`~engine.quant.GroupQuant` is dequantized) into ``param``;
    shapes must match exactly."""
    if isinstance(loaded, GroupQuant):
        loaded = loaded.dequantize()
    if param.shape != loaded.shape:
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} does not match "
                         f"parameter shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


def _narrow(tensor: torch.Tensor, dim: int, start: int, length: int, full: int, what: str) -> torch.Tensor:
    """``tensor[..., start:start+length, ...]`` along ``dim`` after checking its full size."""
    if tensor.dim() <= dim or tensor.shape[dim] != full:
        raise ValueError(f"{what}: checkpoint shape {tuple(tensor.shape)} does not have {full} "
                         f"along dim {dim}")
    return tensor if length == full else tensor.narrow(dim, start, length)


def _empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class MergedColumnLinear(nn.Module, WeightStore):
    """``y = x W_r^T (+ b_r)``: the rank's rows of several column-parallel logical shards.

    ``output_sizes[i]`` is this rank's width ``n_i`` of logical shard ``i`` (e.g.
    ``[H/tp*D, KVH_r*D, KVH_r*D]`` for q|k|v, ``[I/tp, I/tp]`` for gate|up),
    ``full_sizes[i]`` the checkpoint tensor's rows and ``shard_offsets[i]`` the first of them
    this rank holds (defaults: the whole tensor, i.e. one rank). ``load_shard(i, leaf, t)``
    copies ``t[off_i : off_i + n_i]`` into the rank's rows ``[sum(n_<i), sum(n_<=i))``.
    ``weights``: how the weight is held (``engine.quant``); the bias stays in ``dtype``.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, dtype: torch.dtype,
                 full_sizes: list[int] | None = None, shard_offsets: list[int] | None = None,
                 weights: str = "fp32"):
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.full_sizes = list(full_sizes or output_sizes)
        self.shard_offsets = list(shard_offsets or [0] * len(output_sizes))
        for n, full, off in zip(self.output_sizes, self.full_sizes, self.shard_offsets):
            if not 0 <= off <= off + n <= full:
                raise ValueError(f"shard rows [{off}, {off + n}) do not fit a {full}-row tensor")
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.init_weight(sum(output_sizes), input_size, dtype, weights)
        self.bias = _empty_param(sum(output_sizes), dtype=dtype) if bias else None

    def load_shard(self, index: int, name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's rows of logical shard ``index`` (``name``: "weight" | "bias")."""
        if name == "bias" and self.bias is None:
            raise ValueError(f"checkpoint has a {name} for a layer built without one")
        n, lo, what = self.output_sizes[index], self.offsets[index], f"shard {index} {name}"
        if name == "weight":
            tensor = self.prepare(tensor)
        part = _narrow(tensor, 0, self.shard_offsets[index], n, self.full_sizes[index], what)
        if name == "weight":
            self.store_rows(lo, part, what)
        else:
            load_param(self.bias[lo: lo + n], part, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class RowLinear(nn.Module, WeightStore):
    """``y = all_reduce_tp(x_r W_r^T)``, no bias (Llama family); see the module doc.

    ``input_size`` is this rank's slice ``n`` of the full input ``full_input`` (default: all
    of it), starting at column ``input_offset`` of the checkpoint weight ``[out, full_input]``.
    ``tp`` is the ``engine.parallel.Group`` to sum over (None: one rank, no communication).
    ``weights``: how the weight is held (``engine.quant``); quantized in groups of columns, the
    rank's columns must start and end on a group boundary (else ``load`` raises ``ValueError``).
    """

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype, tp=None,
                 full_input: int | None = None, input_offset: int = 0, weights: str = "fp32"):
        super().__init__()
        self.tp = tp
        self.full_input = full_input or input_size
        self.input_offset = input_offset
        if not 0 <= input_offset <= input_offset + input_size <= self.full_input:
            raise ValueError(f"input columns [{input_offset}, {input_offset + input_size}) do not "
                             f"fit {self.full_input}")
        self.init_weight(output_size, input_size, dtype, weights)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's columns ``[input_offset, input_offset + n)`` of the full weight."""
        if name != "weight":
            raise ValueError(f"checkpoint has a {name} for a row-parallel layer built without one")
        part = _narrow(self.prepare(tensor), 1, self.input_offset, self.in_features, self.full_input, name)
        self.store_all(part, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.tp is not None and self.tp.size > 1:
            self.tp.all_reduce(y)
        return y


class Embedding(nn.Module, WeightStore):
    """Token embedding table ``[vocab, hidden]`` (replicated); also the LM head's weight
    (:meth:`project`). ``weights`` int4 holds the table as int8 (see ``engine.quant``)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, weights: str = "fp32"):
        super().__init__()
        self.init_weight(vocab_size, hidden_size, dtype, "int8" if weights == "int4" else weights)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        """Copy the whole table (``name`` must be "weight")."""
        if name != "weight":
            raise ValueError(f"checkpoint has a {name} for an embedding table")
        self.store_all(self.prepare(tensor), name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """LM head: ``h [T, hidden] -> logits [T, vocab] = h W^T`` in ``h``'s dtype."""
        return self.matmul(h)


class RMSNorm(nn.Module):
    """Holds the norm weight; the maths is ``kernels.rms_norm`` (replicated on every rank)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _empty_param(hidden_size, dtype=dtype)
