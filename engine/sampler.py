"""Token sampling: greedy, temperature, top-k, top-p, with per-request reproducible seeds.

Called by the prefill service (token 1) and the decode scheduler (every later token). The
random draw for output token ``i`` of a request uses a generator seeded from
``(seed, i)`` only, so a request's output depends on its seed and inputs, never on which
worker ran it or which other requests shared the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.config import MAX_TOP_LOGPROBS

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling parameters of one request (the router validates user input first)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int = -1  # -1: none; k >= 0: each token's log-probability and the k most likely

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not -1 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS} (-1 = off), got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_proto(cls, params, seed: int) -> "SamplingConfig":
        top_p = params.top_p if 0.0 < params.top_p < 1.0 else 1.0
        return cls(temperature=params.temperature, top_p=top_p, top_k=params.top_k, seed=seed,
                   logprobs=params.top_logprobs if params.logprobs else -1)


def step_seed(seed: int, index: int) -> int:
    """A 63-bit seed for output token ``index`` of a request seeded with ``seed`` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class SamplingError(ValueError):
    """This request's token could not be sampled: its logits row holds NaN or +inf, or its
    parameters leave no token to draw. Deterministic: another worker would fail the same way."""


def check_row(logits: torch.Tensor) -> int:
    """The argmax of a logits row [vocab] (first of ties); raises SamplingError when the row
    cannot be sampled from. One pass: the max is NaN when the row holds a NaN (max propagates
    NaN), +inf when it holds +inf, -inf when every logit is -inf."""
    best, index = logits.max(dim=-1)
    best = float(best)
    if best != best or best == float("inf"):
        raise SamplingError("the model produced NaN or +inf logits for this request")
    if best == float("-inf"):
        raise SamplingError("every logit of this request is -inf: there is no token to sample")
    return int(index)


def sample_one(logits: torch.Tensor, cfg: SamplingConfig, index: int) -> int:
    """Sample output token ``index`` from ``logits`` [vocab] (any float dtype).

    Numerics: scores are ``(logits - max) / temperature`` in float64, so every score is <= 0
    and the best is exactly 0: ``exp`` cannot overflow and softmax cannot divide by zero for
    any temperature > 0, however small (tiny temperatures converge to greedy, ties aside).
    top-k above the vocabulary size keeps every token; top-p always keeps the most likely token.
    Raises SamplingError (see :func:`check_row`).
    """
    argmax = check_row(logits)
    if cfg.greedy:
        return argmax
    row = logits.double()
    scores = (row - row.max()) / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.numel():
        kth = torch.topk(scores, cfg.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= cfg.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, index))
    return int(torch.multinomial(probs, 1, generator=gen).item())


@dataclass
class StepLogits:
    """A decode step's logits reduced where they were made (on the device, before the copy to
    the host): every row's max ``best`` [B] (fp32) and ``argmax`` [B] (int64, first of ties as
    ``torch.argmax``), and the whole rows ``rows`` only, ``logits`` [len(rows), vocab] fp32.
    Greedy rows need nothing more, so a step of B greedy sequences moves 2·B numbers, not
    B·vocab (vLLM samples on the GPU for the same reason). Picklable (it crosses the ranks'
    control channel). Made by :meth:`of` (``engine.runtime.rank``) or an executor directly."""

    best: torch.Tensor
    argmax: torch.Tensor
    rows: list[int]
    logits: torch.Tensor
    _where: dict | None = field(default=None, repr=False, compare=False)   # row -> index in logits

    @classmethod
    def of(cls, logits: torch.Tensor, rows) -> "StepLogits":
        """``logits`` [B, vocab] reduced, keeping the whole rows ``rows`` (CPU tensors)."""
        best, argmax = logits.max(dim=-1)
        rows = list(rows)
        kept = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)] if rows else logits[:0]
        return cls(best.float().cpu(), argmax.cpu(), rows, kept.float().cpu())

    def row(self, i: int) -> torch.Tensor | None:
        """The whole logits row ``i`` [vocab], None when it was not kept."""
        if self._where is None:
            self._where = {r: k for k, r in enumerate(self.rows)}
        k = self._where.get(i)
        return None if k is None else self.logits[k]


def full_rows(cfgs: list[SamplingConfig]) -> tuple[int, ...]:
    """The rows whose whole logits a step must keep: those not sampled greedily or asking logprobs."""
    return tuple(i for i, c in enumerate(cfgs) if not c.greedy or c.logprobs >= 0)


def sample_batch(logits: "torch.Tensor | StepLogits", cfgs: list[SamplingConfig],
                 indices: list[int]) -> list[int | SamplingError]:
    """One token per row of ``logits`` ([B, vocab], or a :class:`StepLogits` keeping at least
    the :func:`full_rows` of ``cfgs``); greedy rows share one argmax.

    A row that cannot be sampled yields its SamplingError in place of a token, so one
    request's failure never touches its batch-mates' tokens. Raises ValueError for a
    StepLogits missing a row that a non-greedy config needs.
    """
    # one pass: a row's max is NaN when it holds a NaN (max propagates NaN), +inf when it holds
    # +inf, -inf when every logit is -inf; a finite max means a sound row, and its index is the
    # argmax (first of ties, as torch.argmax)
    step = logits if isinstance(logits, StepLogits) else None
    best, argmax = (step.best, step.argmax) if step is not None else logits.max(dim=-1)
    out: list[int | SamplingError] = argmax.tolist()
    unsound = (~torch.isfinite(best)).tolist()
    for row, (cfg, index) in enumerate(zip(cfgs, indices)):
        if unsound[row] or not cfg.greedy:
            whole = logits[row] if step is None else step.row(row)
            try:
                if whole is None:
                    if not unsound[row]:
                        raise ValueError(f"row {row} samples with temperature {cfg.temperature} but its "
                                         f"logits were not kept (StepLogits.rows)")
                    check_row(best[row:row + 1])     # its max tells what is wrong with it
                out[row] = sample_one(whole, cfg, index)
            except SamplingError as exc:
                out[row] = exc
            except RuntimeError as exc:  # torch refusing the distribution
                out[row] = SamplingError(f"sampling failed: {exc}")
    return out
