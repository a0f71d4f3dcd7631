"""Token sampling: greedy, temperature, top-k, top-p, with per-request reproducible seeds.

Called by the prefill service (token 1) and the decode scheduler (every later token). The
random draw for output token ``i`` of a request uses a generator seeded from
``(seed, i)`` only, so a request's output depends on its seed and inputs, never on which
worker ran it or which other requests shared the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling parameters of one request (the router validates user input first)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_proto(cls, params, seed: int) -> "SamplingConfig":
        top_p = params.top_p if 0.0 < params.top_p < 1.0 else 1.0
        return cls(temperature=params.temperature, top_p=top_p, top_k=params.top_k, seed=seed)


def step_seed(seed: int, index: int) -> int:
    """A 63-bit seed for output token ``index`` of a request seeded with ``seed`` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def sample_one(logits: torch.Tensor, cfg: SamplingConfig, index: int) -> int:
    """Sample output token ``index`` from fp32 ``logits`` [vocab]."""
    if cfg.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.float() / cfg.temperature
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


def sample_batch(logits: torch.Tensor, cfgs: list[SamplingConfig], indices: list[int]) -> list[int]:
    """Sample one token per row of ``logits`` [B, vocab]; greedy rows share one argmax."""
    out = torch.argmax(logits, dim=-1).tolist()
    for row, (cfg, index) in enumerate(zip(cfgs, indices)):
        if not cfg.greedy:
            out[row] = sample_one(logits[row], cfg, index)
    return [int(t) for t in out]
