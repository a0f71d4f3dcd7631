"""The flat batch one forward pass runs over, built by the schedulers, read by the model.

Tokens of several sequences are concatenated into one flat batch of ``T`` tokens (as in
vLLM / nano-vllm). A batch is either all-prefill (each sequence contributes its whole
prompt, attention is causal within each sequence) or all-decode (each sequence contributes
one token that attends to its whole paged context). A prefill batch *with context*
(``ForwardBatch.prefill(..., num_cached=...)``, :attr:`ForwardBatch.has_context`) holds only
the tokens after each prompt's cached prefix, which attend to that prefix through the paged
cache (``kernels.paged_prefill_attention``) and to each other causally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PrefillResult:
    """What an executor's prefill gives back: ``logits`` [1, vocab] fp32 of the prompt's last
    position, and, when asked for, one ``engine.logprobs.TokenLogprob`` per prompt token."""

    logits: torch.Tensor
    prompt_logprobs: list | None = None


def check_num_cached(prompt_len: int, num_cached: int, block_size: int, *,
                     prompt_logprobs: int = -1, cp: int = 1) -> None:
    """Raise ``ValueError`` unless a one-prompt prefill may skip its first ``num_cached``
    tokens (their K/V already cached): ``num_cached`` a multiple of ``block_size`` in
    ``0..prompt_len - 1``; when it is > 0, no prompt log-probabilities (the cached positions'
    logits do not exist) and no context parallelism (``cp > 1`` always prefills whole prompts)."""
    if num_cached == 0:
        return
    if not 0 < num_cached < prompt_len or num_cached % block_size:
        raise ValueError(f"num_cached={num_cached} for a {prompt_len}-token prompt: need a "
                         f"multiple of block_size={block_size} in 0..{prompt_len - 1}")
    if prompt_logprobs >= 0:
        raise ValueError(f"prompt_logprobs={prompt_logprobs} needs a full prefill, got "
                         f"num_cached={num_cached} (the cached positions have no logits)")
    if cp > 1:
        raise ValueError(f"context parallelism (cp={cp}) prefills whole prompts, got "
                         f"num_cached={num_cached}")


class ForwardCancelled(RuntimeError):
    """The pass was stopped between layers because its ``ForwardBatch.cancelled`` was set."""


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor       # [T] int64, flat cache slot each token's K/V is written to
    logits_indices: torch.Tensor     # [B] int64, rows of the flat batch whose logits are wanted
    is_prefill: bool
    # prefill only: sequence boundaries, sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]
    cu_seqlens: torch.Tensor | None = None   # [B+1] int32
    # decode, and prefill with context: the paged context of each sequence (its new tokens
    # included); None in a prefill batch of whole prompts
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, padded with 0
    context_lens: torch.Tensor | None = None  # [B] int32
    # decode only: a bound on every context_lens entry known on the host (CUDA graphs set it so
    # the attention kernel reads nothing back); None = the kernel finds the longest itself
    max_context_len: int | None = None
    # a threading.Event set when nobody wants the result any more (a prefill whose client left):
    # the model stops between layers and raises ForwardCancelled. One-process passes only: every
    # rank of a multi-rank pass would have to agree on the layer to stop at.
    cancelled: Any = None
    # decode only: when set, the step returns an ``engine.sampler.StepLogits`` (every row's max
    # and argmax, the whole logits of these rows only: non-greedy sampling, logprobs) instead of
    # [B, vocab]; reduced on the device, so greedy rows never copy a vocabulary-wide row back
    full_rows: tuple[int, ...] | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.logits_indices.numel())

    @property
    def has_context(self) -> bool:
        """A prefill batch whose sequences attend to a cached prefix through the paged cache."""
        return self.is_prefill and self.block_tables is not None

    def split(self, m: int) -> list["ForwardBatch"]:
        """A decode batch cut into ``m`` consecutive near-equal micro-batches (sequence order
        kept: concatenating their logits gives this batch's). Raises ``ValueError`` for a
        prefill batch or ``m`` outside ``1..num_seqs``."""
        if self.is_prefill or not 1 <= m <= self.num_seqs:
            raise ValueError(f"can split a decode batch of {self.num_seqs} sequences into 1..{self.num_seqs} "
                             f"micro-batches, got prefill={self.is_prefill} m={m}")
        bounds = [self.num_seqs * k // m for k in range(m + 1)]
        return [ForwardBatch(input_ids=self.input_ids[a:b], positions=self.positions[a:b],
                             slot_mapping=self.slot_mapping[a:b],
                             logits_indices=torch.arange(b - a, device=self.logits_indices.device),
                             is_prefill=False, block_tables=self.block_tables[a:b],
                             context_lens=self.context_lens[a:b], max_context_len=self.max_context_len)
                for a, b in zip(bounds, bounds[1:])]

    def all_logits(self) -> "ForwardBatch":
        """This prefill batch asking for the logits of every token (prompt logprobs), not only
        of each sequence's last: rows then follow ``positions``."""
        self.logits_indices = torch.arange(self.input_ids.shape[0], dtype=torch.long)
        return self

    def to(self, device: torch.device) -> "ForwardBatch":
        """This batch with its tensors on ``device`` (the same object when already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in vars(self).items()}
        return ForwardBatch(**moved)

    @staticmethod
    def prefill(prompts: list[list[int]], block_tables: list[list[int]], block_size: int,
                num_cached: list[int] | None = None) -> "ForwardBatch":
        """Batch of prompts; ``block_tables[i]`` must cover ``len(prompts[i])`` tokens.

        ``num_cached[i]``: the leading tokens of prompt ``i`` whose K/V is already in its
        blocks (``0 <= num_cached[i] < len(prompts[i])``). The batch then holds only tokens
        ``num_cached[i]:`` with their true positions and slots, plus ``block_tables`` (int32,
        padded with 0) and ``context_lens`` (the prompt lengths): :attr:`has_context`. Without
        it (or all zero) the batch holds the whole prompts and no block tables. Either way the
        logits rows are each sequence's last token. Raises ``ValueError`` for a table too small
        or a ``num_cached`` out of range.
        """
        cached = list(num_cached) if num_cached is not None else [0] * len(prompts)
        if len(cached) != len(prompts):
            raise ValueError(f"num_cached has {len(cached)} entries for {len(prompts)} prompts")
        ids, pos, slots, cu, last = [], [], [], [0], []
        for toks, table, c in zip(prompts, block_tables, cached):
            n = len(toks)
            if len(table) * block_size < n:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {n} tokens")
            if c and not 0 < c < n:
                raise ValueError(f"num_cached={c} for a {n}-token prompt: need 0 <= num_cached < {n}")
            ids.extend(toks[c:])
            pos.extend(range(c, n))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c, n))
            cu.append(cu[-1] + n - c)
            last.append(cu[-1] - 1)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            logits_indices=torch.tensor(last, dtype=torch.long),
            is_prefill=True,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        )
        if any(cached):
            table = torch.zeros((len(prompts), max(map(len, block_tables))), dtype=torch.int32)
            for i, t in enumerate(block_tables):
                table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
            batch.block_tables = table
            batch.context_lens = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        return batch

    @staticmethod
    def prefill_cp(prompt: list[int], cp_rank: int, cp: int, block_table: list[int],
                   block_size: int) -> "ForwardBatch":
        """Context-parallel prefill: CP rank ``cp_rank``'s tokens of one prompt (possibly none).

        Tokens are those of ``common.layout.cp_token_ranges`` (balanced zigzag chunks) with
        their global positions; slots come from the prompt's one ``block_table`` so each rank
        writes its tokens where a single-rank prefill would; the logits row is the prompt's
        last token when this rank holds it, else there is none.
        """
        from common.layout import cp_token_ranges
        pos = [p for a, b in cp_token_ranges(cp_rank, cp, len(prompt)) for p in range(a, b)]
        last = [pos.index(len(prompt) - 1)] if len(prompt) - 1 in pos else []
        return ForwardBatch(
            input_ids=torch.tensor([prompt[p] for p in pos], dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            slot_mapping=torch.tensor([block_table[p // block_size] * block_size + p % block_size
                                       for p in pos], dtype=torch.long),
            logits_indices=torch.tensor(last, dtype=torch.long),
            is_prefill=True,
            cu_seqlens=torch.tensor([0, len(pos)], dtype=torch.int32),
        )

    @staticmethod
    def decode(tokens: list[int], positions: list[int], block_tables: list[list[int]],
               block_size: int) -> "ForwardBatch":
        """One new token per sequence at ``positions[i]`` (its KV is written there)."""
        b = len(tokens)
        width = max(len(t) for t in block_tables)
        table = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        slots = [block_tables[i][p // block_size] * block_size + p % block_size
                 for i, p in enumerate(positions)]
        return ForwardBatch(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            logits_indices=torch.arange(b, dtype=torch.long),
            is_prefill=False,
            block_tables=table,
            context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32),
        )
