"""Log-probabilities of chosen tokens and the most likely alternatives, from logits rows.

Who calls what: the prefill service (the first output token, and the prompt's tokens when a
request asks for them, through ``RankRunner.prefill``) and the decode scheduler (every later
token) call :func:`logprobs_of` on the rows of the requests that asked.

Distribution: the raw model output, ``log_softmax`` of the fp32 logits, before temperature,
top-k and top-p (vLLM's default, "raw logprobs"). The chosen token's entry is its own value
whatever sampling then did with it, so a sampled token outside the top-k still gets a finite
log-probability. ``top`` lists the ``k`` most likely tokens, most likely first (``torch.topk``
order among ties).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class TokenLogprob:
    """One position: ``token_id``'s log-probability (natural log; None for a prompt's first
    token, which nothing predicts) and ``top``, ``(token id, log-probability)`` pairs."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """Entries for ``chosen[i]`` under ``logits[i]`` ([N, vocab], any float dtype, computed in
    fp32) with the ``k`` (0..``MAX_TOP_LOGPROBS``) most likely tokens of each row.
    Raises ValueError for mismatched lengths or ``k`` out of range."""
    if logits.dim() != 2 or logits.shape[0] != len(chosen):
        raise ValueError(f"need logits [N, vocab] and N chosen tokens, got {tuple(logits.shape)} and {len(chosen)}")
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {k}")
    if not chosen:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    own = lp.gather(1, torch.tensor(chosen, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    tops: list[tuple] = [()] * len(chosen)
    if k:
        values, ids = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(t, o, top) for t, o, top in zip(chosen, own, tops)]


def prompt_logprobs_of(logits: torch.Tensor, positions: list[int], prompt: list[int],
                       k: int) -> dict[int, TokenLogprob]:
    """The prompt tokens that ``logits`` rows predict: row ``i`` (the output at prompt position
    ``positions[i]``) predicts token ``positions[i] + 1``; rows at the last position (they
    predict the next output token) are skipped. Returns ``{token index: entry}``."""
    rows = [i for i, p in enumerate(positions) if p + 1 < len(prompt)]
    targets = [positions[i] + 1 for i in rows]
    entries = logprobs_of(logits[rows], [prompt[t] for t in targets], k)
    return dict(zip(targets, entries))


def assemble_prompt_logprobs(prompt: list[int], parts: list[dict[int, TokenLogprob]]) -> list[TokenLogprob]:
    """One entry per prompt token from the ranks' parts (context parallelism splits the
    positions); the first token's entry has no log-probability. Raises ValueError when a
    position is missing."""
    merged: dict[int, TokenLogprob] = {}
    for part in parts:
        merged.update(part)
    missing = [t for t in range(1, len(prompt)) if t not in merged]
    if missing:
        raise ValueError(f"prompt logprobs missing for token positions {missing[:5]}")
    return [TokenLogprob(prompt[0], None)] + [merged[t] for t in range(1, len(prompt))]
