"""Decode steps replayed from CUDA graphs, captured once per bucketed batch size.

A decode step of a small model is dominated by kernel launches (tens of kernels per layer);
replaying a captured graph launches them all at once (the technique vLLM and SGLang use for
decode; PyTorch's ``torch.cuda.CUDAGraph``). Who calls it: :class:`engine.runtime.rank.RankRunner`
calls :meth:`DecodeGraphs.run` for every decode batch (serving, and ``engine.llm_engine``);
it returns ``None`` for a batch it does not cover (prefill, larger than the largest bucket,
MoE, CPU) and the caller runs the model eagerly, so token parity holds either way.

Mechanics. For a bucket ``B`` (1, 2, 4, 8, 16, 32, ... up to ``max_batch``) the graph is
captured on first use, over static input tensors: ``input_ids``/``positions``/``slot_mapping``/
``context_lens`` ``[B]`` and ``block_tables [B, W]`` with ``W`` blocks enough for the model's
whole context, so the attention kernel gets the static bound ``max_context_len = W * block_size``
and never reads lengths back. A batch of ``n <= B`` sequences is copied into the first ``n``
rows; the other rows are padding whose K/V goes to ``pad_slot`` (a slot of a block the
allocator never hands out) and whose one-token context reads it back. Outputs are copied out
of the graph's static output before the next replay.
"""
from __future__ import annotations

import logging

import torch

from engine.batch import ForwardBatch

log = logging.getLogger(__name__)


def buckets_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, ... doubling, then ``max_batch`` itself (ascending, no duplicates)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class DecodeGraphs:
    """CUDA graphs of one rank's model forward over decode batches (see the module docstring).

    ``model``: this rank's shard; ``kv_cache``: its cache on CUDA; ``max_batch``: the largest
    bucket; ``block_size``: the cache's tokens per block; ``pad_slot``: a flat slot index that no
    sequence owns. A later pipeline stage passes :meth:`run` the ``(hidden, residual)`` it
    received (``[n, hidden_size]`` each), copied into static tensors like the inputs. Graphs are
    captured lazily; every rank of an instance runs the same batches in the same order, so TP
    collectives inside a graph are captured in step."""

    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, block_size: int, pad_slot: int):
        self.model, self.kv, self.block_size, self.pad_slot = model, kv_cache, block_size, pad_slot
        self.config = model.config
        self.buckets = buckets_up_to(max_batch)
        self.width = -(-self.config.max_position // block_size)
        self.enabled = kv_cache.is_cuda and not self.config.num_experts   # MoE routing is dynamic
        self._graphs: dict[int, tuple] = {}
        self._pool = None

    def run(self, batch: ForwardBatch, hidden=None):
        """The model's output for ``batch`` from a graph, or ``None`` when no graph covers it."""
        n = batch.num_seqs
        if not self.enabled or batch.is_prefill or n == 0 or n > self.buckets[-1] \
                or batch.block_tables.shape[1] > self.width:
            return None
        size = next(b for b in self.buckets if b >= n)
        if size not in self._graphs:
            try:
                self._graphs[size] = self._capture(size, hidden is not None)
            except Exception as exc:   # a kernel that cannot be captured: run eagerly from now on
                log.warning("CUDA graph capture at batch %d failed (%s): decode runs eagerly", size, exc)
                self.enabled = False
                return None
        graph, static, out = self._graphs[size]
        self._fill(static, batch, n, hidden)
        graph.replay()
        if isinstance(out, tuple):
            return tuple(t[:n].clone() for t in out)
        return out[:n].clone()

    def _static(self, size: int, with_hidden: bool) -> dict:
        dev = self.kv.device
        static = {
            "input_ids": torch.zeros(size, dtype=torch.long, device=dev),
            "positions": torch.zeros(size, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((size,), self.pad_slot, dtype=torch.long, device=dev),
            "block_tables": torch.full((size, self.width), self.pad_slot // self.block_size,
                                       dtype=torch.int32, device=dev),
            "context_lens": torch.ones(size, dtype=torch.int32, device=dev),
        }
        if with_hidden:
            h = self.config.hidden_size
            static["hidden"] = (torch.zeros(size, h, dtype=self.config.torch_dtype, device=dev),
                                torch.zeros(size, h, dtype=self.config.torch_dtype, device=dev))
        return static

    def _batch(self, static: dict, size: int) -> ForwardBatch:
        return ForwardBatch(input_ids=static["input_ids"], positions=static["positions"],
                            slot_mapping=static["slot_mapping"],
                            logits_indices=torch.arange(size, device=self.kv.device), is_prefill=False,
                            block_tables=static["block_tables"], context_lens=static["context_lens"],
                            max_context_len=self.width * self.block_size)

    def _capture(self, size: int, with_hidden: bool):
        static = self._static(size, with_hidden)
        batch = self._batch(static, size)
        hidden = static.get("hidden")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):                              # warm-up: autotuning, lazy inits
                self.model(batch, self.kv, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            out = self.model(batch, self.kv, hidden)
        self._pool = graph.pool()
        log.info("captured a CUDA graph for decode batches of up to %d sequences", size)
        return graph, static, out

    def _fill(self, static: dict, batch: ForwardBatch, n: int, hidden) -> None:
        static["input_ids"][:n].copy_(batch.input_ids, non_blocking=True)
        static["positions"][:n].copy_(batch.positions, non_blocking=True)
        static["slot_mapping"][:n].copy_(batch.slot_mapping, non_blocking=True)
        static["slot_mapping"][n:].fill_(self.pad_slot)
        static["context_lens"][:n].copy_(batch.context_lens, non_blocking=True)
        static["context_lens"][n:].fill_(1)
        width = batch.block_tables.shape[1]
        static["block_tables"][:n, :width].copy_(batch.block_tables, non_blocking=True)
        static["block_tables"][n:].fill_(self.pad_slot // self.block_size)
        if hidden is not None:
            static["hidden"][0][:n].copy_(hidden[0])
            static["hidden"][1][:n].copy_(hidden[1])
