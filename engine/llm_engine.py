"""The in-process engine: requests in, tokens out, through the serving scheduler and executors.

Who calls what: offline generation, the parity tests and the benches build one
:class:`LLMEngine` from a ``RuntimeConfig`` (nano-vllm's ``LLMEngine`` shape) and call
:meth:`~LLMEngine.add_request`, then :meth:`~LLMEngine.step` while
:meth:`~LLMEngine.has_unfinished` (or :meth:`~LLMEngine.generate` for both). Nothing here is a
loop of its own: the parts are the ones that serve.

- The executor (``engine.runtime.executor.make_executor``): one rank in this process, or the
  TP / PP / EP ranks of the layout spawned on this host.
- The blocks: an ``engine.block_manager.BlockManager`` over the executor's cache, with the
  prefix cache on unless ``cfg.prefix_cache`` is off (always off with context parallelism): a
  request takes its prompt's blocks (cached leading blocks shared) and grows on demand, as in
  the decode service; its KV stays cached after it ends.
- Prefill: ``Executor.prefill`` one prompt at a time over its uncached part and
  ``engine.sampler.sample_one`` for token 1 (output index 0), as the prefill service does
  (``services.prefill``).
- Decode: an ``engine.scheduler.DecodeScheduler`` over ``Executor.forward`` (PP decode batches
  run as micro-batches there), stepped here instead of by its thread, as the decode service
  (``services.decode``) hands it landed sequences; it preempts and resumes (recompute through
  ``Executor.prefill``) when the cache runs out.

A :meth:`~LLMEngine.step` prefills the waiting requests there is room for if there are any,
else runs one decode step over every running sequence, and returns what each touched request
produced.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from common.kv_hash import chain_root
from engine.block_manager import BlockManager
from engine.kv_cache import OutOfBlocks
from engine.runtime.config import RuntimeConfig
from engine.runtime.executor import make_executor
from engine.sampler import SamplingConfig, sample_one
from engine.scheduler import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, DecodeScheduler, Sequence


class GenerationError(RuntimeError):
    """A request ended in an error (its text is the scheduler's reason)."""


@dataclass
class StepOutput:
    """What one request produced in one step: its new tokens and, once it ended, why
    (``engine.scheduler``'s ``FINISH_*``; ``error`` says more for ``FINISH_ERROR``)."""

    request_id: str
    new_tokens: list[int]
    finished: str | None = None
    error: str | None = None
    cached_tokens: int = 0           # prompt tokens served from the prefix cache


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingConfig
    max_tokens: int
    eos_token_ids: frozenset[int]
    ignore_eos: bool
    tokens: list[int] = field(default_factory=list)
    fresh: list[int] = field(default_factory=list)     # produced since the last step's output
    finished: str | None = None
    error: str | None = None
    prefill_logits: torch.Tensor | None = None         # [vocab] of the prompt's last position
    seq: Sequence | None = None                         # in the decode scheduler after token 1
    cached_tokens: int = 0                              # prompt tokens the prefix cache held


class LLMEngine:
    """One instance in this process (see the module docstring). ``executor``: an already-built
    one (tests); default ``make_executor(cfg)``. Close it (or use ``with``) to stop the ranks."""

    def __init__(self, cfg: RuntimeConfig, executor=None) -> None:
        self.cfg = cfg
        self.executor = executor if executor is not None else make_executor(cfg)
        self.model_config = self.executor.model_config
        ex = self.executor
        self.blocks = BlockManager(ex.num_blocks, cfg.block_size, chain_root(ex.compat, ex.layout),
                                   prefix_cache=cfg.prefix_cache and cfg.parallel.cp == 1)
        self.scheduler = DecodeScheduler(ex.forward, self.blocks, cfg.max_batch,
                                         prefill_fn=lambda toks, table, k: ex.prefill(toks, table, num_cached=k),
                                         max_preemptions=cfg.max_preemptions)
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingConfig | None = None,
                    max_tokens: int = 16, eos_token_ids=None, ignore_eos: bool = False) -> str:
        """Queue a prompt for prefill; its id. ``eos_token_ids`` default to the model's. Raises
        ``ValueError`` for an empty prompt or one whose tokens would pass the context length."""
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt_ids) + max_tokens > self.model_config.max_position:
            raise ValueError(f"prompt + max_tokens = {len(prompt_ids) + max_tokens} exceeds the context length "
                             f"{self.model_config.max_position}")
        eos = self.model_config.eos_token_ids if eos_token_ids is None else eos_token_ids
        req = _Request(str(next(self._ids)), list(prompt_ids), sampling or SamplingConfig(), max_tokens,
                       frozenset(eos), ignore_eos)
        self._requests[req.request_id] = req
        self._waiting.append(req)
        return req.request_id

    def has_unfinished(self) -> bool:
        return any(r.finished is None for r in self._requests.values())

    def step(self) -> list[StepOutput]:
        """Prefill the waiting requests (in order, while the cache has room for the next), or
        (none prefilled) one decode step; the outputs of the requests that produced a token or
        ended in it (ended requests are then forgotten)."""
        touched = []
        while self._waiting and self._prefill(self._waiting[0]):
            touched.append(self._waiting.popleft())
        if not touched:
            self.scheduler.step()
            touched = [r for r in self._requests.values() if r.fresh or r.finished is not None]
        out = []
        for req in touched:
            out.append(StepOutput(req.request_id, req.fresh, req.finished, req.error, req.cached_tokens))
            req.fresh = []
            if req.finished is not None:
                self._requests.pop(req.request_id, None)
        return out

    def _prefill(self, req: _Request) -> bool:
        """The prompt's blocks (its cached leading blocks shared), the forward pass of the rest,
        token 1; the request then joins the decode scheduler unless token 1 ended it. False
        (nothing done) while the cache has no room for the prompt and sequences still run."""
        rid, n = req.request_id, len(req.prompt)
        try:
            req.cached_tokens = self.blocks.allocate(rid, req.prompt, n + 1, max_cached=n - 1)
        except OutOfBlocks as exc:
            if self.scheduler.num_running or self.scheduler.num_preempted:
                return False              # room comes back as sequences end
            req.finished, req.error = FINISH_ERROR, f"the prompt does not fit the KV cache: {exc}"
            return True
        try:
            logits = self.executor.prefill(req.prompt, self.blocks.table(rid), num_cached=req.cached_tokens).logits
            self.blocks.commit(rid, req.prompt)
            token = sample_one(logits[0], req.sampling, 0)
        except Exception as exc:
            self.blocks.release(rid)
            req.finished, req.error = FINISH_ERROR, f"prefill failed: {exc}"
            return True
        req.prefill_logits = logits[0]
        req.tokens.append(token)
        req.fresh.append(token)
        if token in req.eos_token_ids and not req.ignore_eos:
            req.finished = FINISH_STOP
        elif req.max_tokens == 1:
            req.finished = FINISH_LENGTH
        if req.finished is not None:
            self.blocks.release(rid)
            return True
        req.seq = Sequence(
            seq_id=rid, tokens=req.prompt + [token], num_cached=n, generated=1,
            max_tokens=req.max_tokens, sampling=req.sampling, eos_token_ids=req.eos_token_ids,
            ignore_eos=req.ignore_eos, emit=lambda tok, reason, _lp, req=req: self._emit(req, tok, reason))
        self.scheduler.add(req.seq)
        return True

    def _emit(self, req: _Request, token: int | None, reason: str | None) -> None:
        """The scheduler's callback for ``req``: a token, and the reason once it ends."""
        if token is not None:
            req.tokens.append(token)
            req.fresh.append(token)
        if reason is not None:
            req.finished = reason
            req.error = req.seq.error

    # ---- convenience ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 ignore_eos: bool = False, return_logits: bool = False):
        """New tokens per prompt (the EOS token included when it stops one), all prompts batched;
        with ``return_logits`` also the prompts' last-position prefill logits ``[len(prompts),
        vocab]`` (fp32, CPU). Raises :class:`GenerationError` when a request fails."""
        ids = [self.add_request(p, sampling, max_new_tokens, ignore_eos=ignore_eos) for p in prompts]
        reqs = [self._requests[i] for i in ids]
        while self.has_unfinished():
            self.step()
        failed = [r for r in reqs if r.finished == FINISH_ERROR]
        if failed:
            raise GenerationError(f"request {failed[0].request_id}: {failed[0].error}")
        tokens = [r.tokens for r in reqs]
        if not return_logits:
            return tokens
        return tokens, torch.stack([r.prefill_logits for r in reqs])

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
