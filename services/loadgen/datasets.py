"""Synthetic request sets for ``cleave bench``: prompt and output lengths drawn from a
distribution, and a shared-prefix set (requests that reuse one of a few long prefixes).

Prompts are token ids drawn uniformly from a token range, so a prompt of ``n`` tokens is
exactly ``n`` tokens on every backend (the gRPC API takes ``token_ids``, the OpenAI
``/v1/completions`` endpoint a list of ids as ``prompt``). Everything is a pure function of
the seed: the same flags give the same requests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

DISTRIBUTIONS = ("fixed", "uniform", "normal")


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: ``fixed`` = ``mean``; ``uniform`` in ``[mean*(1-spread), mean*(1+spread)]``;
    ``normal`` with standard deviation ``mean*spread``; always rounded and clipped to ``>= 1``."""

    mean: int
    kind: str = "fixed"
    spread: float = 0.0

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise ValueError(f"a mean length must be >= 1 token, got {self.mean}")
        if self.kind not in DISTRIBUTIONS:
            raise ValueError(f"length distribution must be one of {DISTRIBUTIONS}, got {self.kind!r}")
        if not 0 <= self.spread <= 1 and self.kind == "uniform" or self.spread < 0:
            raise ValueError(f"spread must be in [0, 1] for uniform (>= 0 for normal), got {self.spread}")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed" or self.spread == 0:
            return self.mean
        if self.kind == "uniform":
            lo, hi = self.mean * (1 - self.spread), self.mean * (1 + self.spread)
            return max(1, round(rng.uniform(lo, hi)))
        return max(1, round(rng.gauss(self.mean, self.mean * self.spread)))


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt as token ids and how many tokens to make.

    ``history`` (multi-turn, ``services.loadgen.conversations``): the conversation so far as
    ``(role, content)`` pairs, role ``"user"`` or ``"assistant"``, content token ids (a tuple)
    or text (a str: what the OpenAI API returned as a reply). When set it is the prompt:
    ``/v1/chat/completions`` sends one message per pair, ``/v1/completions`` one text, the
    contents joined by newlines (ids written as space-separated numbers: replies come back as
    text, so every turn goes as text, the first one too), and gRPC ``prompt_ids``, the
    contents' ids joined (every content must be ids). Build it with :meth:`of_history`.
    ``request_id``: sent as the request id (``""``: the server makes one)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    history: tuple[tuple[str, tuple[int, ...] | str], ...] = ()
    request_id: str = ""

    @classmethod
    def of_history(cls, history, max_tokens: int, request_id: str = "") -> "BenchRequest":
        """A request whose prompt is ``history`` (``prompt_ids`` = its ids joined, or ``()``
        when some content is text)."""
        history = tuple((role, content if isinstance(content, str) else tuple(content)) for role, content in history)
        text = any(isinstance(content, str) for _, content in history)
        ids = () if text else tuple(i for _, content in history for i in content)
        return cls(ids, max_tokens, history, request_id)

    @property
    def has_text(self) -> bool:
        """Whether some content of ``history`` is text (then there are no ``prompt_ids``)."""
        return any(isinstance(content, str) for _, content in self.history)


def render(content: tuple[int, ...] | str) -> str:
    """A history content as text: token ids as space-separated numbers, text as it is."""
    return content if isinstance(content, str) else " ".join(map(str, content))


@dataclass(frozen=True)
class DatasetConfig:
    """What ``cleave bench`` sends. ``prefix_len`` > 0 makes a shared-prefix set: every prompt
    starts with one of ``num_prefixes`` fixed prefixes of ``prefix_len`` tokens (chosen in turn)
    followed by a random part drawn from ``prompt``."""

    num_requests: int
    prompt: LengthDist
    output: LengthDist
    token_range: tuple[int, int] = (1000, 10000)   # ids drawn from [lo, hi)
    prefix_len: int = 0
    num_prefixes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ValueError(f"token range must satisfy 0 <= lo < hi, got {lo}:{hi}")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError(f"need prefix_len >= 0 and num_prefixes >= 1, got {self.prefix_len} and "
                             f"{self.num_prefixes}")


def make_requests(cfg: DatasetConfig) -> list[BenchRequest]:
    """The request list of ``cfg`` (deterministic in ``cfg.seed``)."""
    rng = random.Random(cfg.seed)
    lo, hi = cfg.token_range

    def ids(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    prefixes = [ids(cfg.prefix_len) for _ in range(cfg.num_prefixes)] if cfg.prefix_len else [[]]
    out = []
    for i in range(cfg.num_requests):
        prompt = prefixes[i % len(prefixes)] + ids(cfg.prompt.sample(rng))
        out.append(BenchRequest(tuple(prompt), cfg.output.sample(rng)))
    return out
