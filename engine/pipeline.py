"""Greedy generation on one rank of a TP x PP instance, with pipelined micro-batches.

Who calls what: every rank of an instance builds its model shard (``engine.offline``) and calls
:meth:`PipelineRunner.generate` with the same prompts; the runner drives this rank's stage and
exchanges activations and sampled tokens with the other stages through ``groups.pp``. TP ranks
of a stage run the same control flow (their collectives live inside the model's layers), and
rank ``t`` of stage ``s`` talks only to rank ``t`` of stages ``s +- 1`` (its PP group).

Schedule. The sequences are split into ``m`` micro-batches (``m = pp`` by default, at most one
per sequence; ``micro_batching=False`` gives ``m = 1``: the stages run in turn). A *round*
processes every live micro-batch once, in order; round 0 is the prefill, every later round one
decode step. For micro-batch ``i``, stage ``s``:

1. (s > 0) receives ``(hidden, residual)`` ``[T_i, hidden_size]`` from stage ``s - 1``;
   (s = 0) embeds the micro-batch's tokens;
2. runs its layers, writing K/V into its cache (its layers, its kv heads);
3. (s < last) sends ``(hidden, residual)`` to ``s + 1`` without waiting (``isend``);
   (s = last) takes the argmax of the logits and sends the tokens to every earlier stage.

Before a stage touches micro-batch ``i`` in round ``r > 0`` it receives micro-batch ``i``'s
tokens of round ``r - 1`` from the last stage, so every stage knows every token, makes the same
end-of-sequence decisions and builds the same batches. With ``m >= pp`` the pipeline is full:
while the last stage works on micro-batch ``i``, the stage before it works on ``i + 1`` and the
first stage on the next round of an earlier one. Sends are non-blocking and every receive is
posted in the order the sender sends (messages between two ranks are FIFO), so no cycle of
waits can form.

Block tables: a trivial per-call allocator (sequence ``j`` owns blocks
``[j*per_seq, (j+1)*per_seq)``, ``engine.batch.offline_block_tables``). Each micro-batch step is
the runtime's one stage step (``engine.runtime.rank.stage_step``) with non-blocking sends.
"""
from __future__ import annotations

import time

import torch

from common.model import CacheConfig
from engine.batch import ForwardBatch, offline_block_tables
from engine.parallel import AsyncSender, ParallelGroups
from engine.runtime.rank import stage_step


def split_micro_batches(num_seqs: int, m: int) -> list[list[int]]:
    """Sequence indices ``0..num_seqs-1`` cut into ``min(m, num_seqs)`` contiguous near-equal runs."""
    if m < 1:
        raise ValueError(f"micro-batch count must be >= 1, got {m}")
    m = min(m, num_seqs)
    bounds = [num_seqs * k // m for k in range(m + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(m)]


class PipelineRunner:
    """Prefill + greedy decode of a batch of prompts on one rank (see the module doc).

    ``model`` is this rank's :class:`engine.model.LlamaForCausalLM` shard; ``num_micro_batches``
    defaults to the number of stages; ``micro_batching=False`` runs the batch as one.
    """

    def __init__(self, model, groups: ParallelGroups, block_size: int = 16, micro_batching: bool = True,
                 num_micro_batches: int | None = None):
        self.model, self.groups, self.block_size = model, groups, block_size
        self.config = model.config
        self.m = (num_micro_batches or groups.pp.size) if micro_batching else 1
        if self.m < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
        self.pp = groups.pp
        self.sender = AsyncSender(self.pp)
        # seconds of the last generate(): "total", "decode" (rounds after the prefill) and
        # "recv" (waiting on activations/tokens from other stages; for the bench)
        self.timings: dict[str, float] = {}

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool = True
                 ) -> tuple[list[list[int]], torch.Tensor | None]:
        """``(new tokens per prompt, prefill logits [len(prompts), vocab] or None)``.

        Tokens are returned on every rank (EOS included when it stops a sequence); the
        last-position prefill logits only on last-stage ranks (None elsewhere).
        """
        cfg = self.config
        bs = self.block_size
        per_seq, self.tables = offline_block_tables(cfg, prompts, max_new_tokens, bs)
        self.device = next(self.model.parameters()).device
        self.kv = self.model.allocate_kv_cache(CacheConfig(block_size=bs, num_blocks=per_seq * len(prompts)),
                                               device=self.device)
        eos = set(cfg.eos_token_ids) if stop_at_eos else set()
        micro = split_micro_batches(len(prompts), self.m)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        awaiting: dict[int, list[int]] = {}     # micro-batch -> sequences whose tokens are in flight
        prefill_logits: list[torch.Tensor | None] = [None] * len(prompts)
        first_round = True
        self.timings = {"recv": 0.0}
        start = time.perf_counter()
        while True:
            busy = False
            for k, seqs in enumerate(micro):
                if k in awaiting:                               # tokens of its last step
                    self._take_tokens(awaiting.pop(k), out, done, eos, max_new_tokens)
                live = [j for j in seqs if not done[j]]
                if not live:
                    continue
                busy = True
                batch = self._batch(live, prompts, out, first_round)
                result = self._stage_step(batch)
                if self.groups.is_last_stage:
                    if first_round:
                        for j, row in zip(live, result):
                            prefill_logits[j] = row
                    toks = result.argmax(-1)
                    for s in range(self.pp.size - 1):
                        self.sender.send(toks, s)
                    self._record(live, toks.tolist(), out, done, eos, max_new_tokens)
                else:
                    awaiting[k] = live
            if first_round:
                decode_start = time.perf_counter()
            first_round = False
            if not busy and not awaiting:
                break
        self.sender.flush()
        end = time.perf_counter()
        self.timings.update(total=end - start, decode=end - decode_start)
        logits = torch.stack(prefill_logits) if self.groups.is_last_stage else None
        return out, logits

    def _batch(self, live: list[int], prompts, out, prefill: bool) -> ForwardBatch:
        if prefill:
            return ForwardBatch.prefill([prompts[j] for j in live], [self.tables[j] for j in live],
                                        self.block_size)
        return ForwardBatch.decode([out[j][-1] for j in live],
                                   [len(prompts[j]) + len(out[j]) - 1 for j in live],
                                   [self.tables[j] for j in live], self.block_size)

    def _stage_step(self, batch: ForwardBatch):
        """This stage's share of one micro-batch step (see module doc): the runtime's stage step."""
        return stage_step(self.model, self.groups, self.kv, batch.to(self.device), send=self.sender.send,
                          timings=self.timings)

    def _take_tokens(self, live: list[int], out, done, eos, max_new_tokens) -> None:
        t0 = time.perf_counter()
        toks = self.pp.recv(torch.empty(len(live), dtype=torch.long, device=self.device), self.pp.size - 1)
        self.timings["recv"] += time.perf_counter() - t0
        self._record(live, toks.tolist(), out, done, eos, max_new_tokens)

    @staticmethod
    def _record(live, toks, out, done, eos, max_new_tokens) -> None:
        for j, t in zip(live, toks):
            out[j].append(t)
            done[j] = t in eos or len(out[j]) >= max_new_tokens
