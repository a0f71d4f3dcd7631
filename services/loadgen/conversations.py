"""Multi-turn conversations for ``cleave bench``: ``conversations x turns`` requests, each
turn's prompt the whole conversation so far.

Turn ``k``'s prompt is turn ``k-1``'s prompt, then the reply the server actually returned to
it, then turn ``k``'s new user text (random token ids, ``ConversationConfig.user`` tokens).
Over gRPC the history is token ids, so the prompt grows by exactly (reply + new) tokens; over
``/v1/chat/completions`` it is a list of messages (user messages of ids written as numbers,
assistant messages of the reply text), over ``/v1/completions`` one text (the parts joined by
newlines), as :class:`~services.loadgen.datasets.BenchRequest` says. Replies are ``max_tokens``
long (``ignore_eos``); a prefix cache can serve every turn after the first its history.

Think time: after turn ``k``'s reply, a conversation waits ``think_s[k]`` seconds before
turn ``k+1``: ``fixed`` (the mean) or ``exponential`` (mean ``think_s``), drawn from the seed.

Load (a :class:`~services.loadgen.runner.LoadConfig`): ``concurrency c`` keeps at most ``c``
conversations in flight (a client starts its next conversation when its last one ended);
``rate r`` starts conversations at Poisson arrivals of ``r`` per second, at most
``max_concurrency`` in flight if set. The turns of a conversation are sequential. A turn that
fails ends its conversation: its later turns are not sent and count as failed
(:data:`SKIPPED`).

Everything is a pure function of the seed. The lengths and think times are the same at every
load level; the token ids are drawn afresh per ``level`` (and for the warm-up), so one level's
prefix cache does not serve the next level's first turns.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

from services.loadgen.backends import Timing
from services.loadgen.datasets import BenchRequest, LengthDist
from services.loadgen.runner import LoadConfig, _closed_loop, poisson_starts

THINK_DISTRIBUTIONS = ("exponential", "fixed")
SKIPPED = "not sent: an earlier turn of its conversation failed"


@dataclass(frozen=True)
class ConversationConfig:
    """What the multi-turn workload sends: ``conversations`` of ``turns`` turns; ``user``:
    new user tokens per turn; ``output``: reply tokens per turn; ``think_s``: mean seconds
    between a reply and the next turn, drawn ``think_dist``; ids from ``token_range``
    ``[lo, hi)``. Raises ValueError for a bad value."""

    conversations: int
    turns: int
    user: LengthDist
    output: LengthDist
    think_s: float = 0.0
    think_dist: str = "exponential"
    token_range: tuple[int, int] = (1000, 10000)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.conversations < 1 or self.turns < 1:
            raise ValueError(f"need >= 1 conversation of >= 1 turn, got {self.conversations} x {self.turns}")
        if not 0 <= self.think_s < math.inf:
            raise ValueError(f"think time must be >= 0 seconds, got {self.think_s}")
        if self.think_dist not in THINK_DISTRIBUTIONS:
            raise ValueError(f"think-time distribution must be one of {THINK_DISTRIBUTIONS}, got {self.think_dist!r}")
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ValueError(f"token range must satisfy 0 <= lo < hi, got {lo}:{hi}")

    @property
    def requests(self) -> int:
        return self.conversations * self.turns


@dataclass(frozen=True)
class Conversation:
    """One conversation's script: each turn's new user content (token ids, or text for the
    OpenAI API), its reply length (tokens) and the seconds waited after it (``think_s[k]``
    after turn ``k``'s reply; one fewer than the turns)."""

    user: tuple[tuple[int, ...] | str, ...]
    max_tokens: tuple[int, ...]
    think_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.user or len(self.max_tokens) != len(self.user) or len(self.think_s) not in (0, len(self.user) - 1):
            raise ValueError(f"a conversation needs >= 1 turn, one max_tokens per turn and one think time "
                             f"between turns; got {len(self.user)}, {len(self.max_tokens)}, {len(self.think_s)}")

    def think(self, turn: int) -> float:
        """Seconds to wait after turn ``turn`` (0-based)'s reply."""
        return self.think_s[turn] if self.think_s else 0.0


def _ids_rng(cfg: ConversationConfig, stream: str) -> random.Random:
    return random.Random(f"cleave-bench-conversations:{cfg.seed}:{stream}")


def make_conversations(cfg: ConversationConfig, level: int = 0) -> list[Conversation]:
    """The conversations of ``cfg`` at load level ``level``: lengths and think times depend
    on ``cfg.seed`` only, token ids on the seed and ``level``."""
    rng, ids_rng = random.Random(cfg.seed), _ids_rng(cfg, f"level{level}")
    lo, hi = cfg.token_range
    out = []
    for _ in range(cfg.conversations):
        lengths = [cfg.user.sample(rng) for _ in range(cfg.turns)]
        max_tokens = tuple(cfg.output.sample(rng) for _ in range(cfg.turns))
        think = tuple(cfg.think_s if cfg.think_dist == "fixed" or cfg.think_s == 0 else rng.expovariate(1 / cfg.think_s)
                      for _ in range(cfg.turns - 1))
        user = tuple(tuple(ids_rng.randrange(lo, hi) for _ in range(n)) for n in lengths)
        out.append(Conversation(user, max_tokens, think))
    return out


def warmup_requests(cfg: ConversationConfig, n: int, level: int = 0) -> list[BenchRequest]:
    """``n`` one-turn requests of ids no measured conversation starts with (not measured)."""
    rng, ids_rng = random.Random(cfg.seed), _ids_rng(cfg, f"warmup{level}")
    lo, hi = cfg.token_range
    return [BenchRequest(tuple(ids_rng.randrange(lo, hi) for _ in range(cfg.user.sample(rng))), cfg.output.sample(rng))
            for _ in range(n)]


@dataclass
class ConversationRun:
    """What :func:`run_conversations` measured: ``timings[i]`` is turn ``turns[i]`` (1-based)
    of conversation ``conversation[i]`` (0-based), in conversation then turn order; ``seconds``:
    the measured window, first send to last response (think times inside it included)."""

    timings: list[Timing]
    turns: list[int]
    conversation: list[int]
    seconds: float


async def run_conversations(backend, conversations: list[Conversation], load: LoadConfig, progress=None,
                            warmup: list[BenchRequest] = (), sleep=asyncio.sleep,
                            request_id: str = "") -> ConversationRun:
    """Run ``conversations`` against ``backend`` (an object with ``async send(BenchRequest)
    -> Timing``) under ``load``, after the ``warmup`` requests (sent ``concurrency`` or
    ``max_concurrency`` at a time, not measured; ``load.warmup`` is the caller's to honour).
    ``progress``: has ``update(n)``, called once per turn done or skipped. ``sleep``: awaited
    with each think time in seconds. ``request_id``: when set, turn ``t`` of conversation
    ``c`` is sent with id ``f"{request_id}-c{c}-t{t}"``."""
    if warmup:
        await _closed_loop(backend, list(warmup), load.concurrency or load.max_concurrency or 1, None)
    rows: list[list[Timing]] = [[] for _ in conversations]

    async def converse(c: int) -> None:
        conv, history = conversations[c], []
        for k, user in enumerate(conv.user):
            if k:
                await sleep(conv.think(k - 1))
            history.append(("user", user))
            rid = f"{request_id}-c{c}-t{k + 1}" if request_id else ""
            t = await backend.send(BenchRequest.of_history(history, conv.max_tokens[k], rid))
            rows[c].append(t)
            if progress is not None:
                progress.update(1)
            if not t.ok:
                skipped = len(conv.user) - k - 1
                rows[c] += [Timing(time.perf_counter(), error=SKIPPED) for _ in range(skipped)]
                if progress is not None and skipped:
                    progress.update(skipped)
                return
            history.append(("assistant", t.reply))

    t0 = time.perf_counter()
    if load.concurrency:
        queue = iter(range(len(conversations)))

        async def client() -> None:
            for c in queue:   # one shared iterator: each conversation is run by exactly one client
                await converse(c)

        await asyncio.gather(*(client() for _ in range(min(load.concurrency, len(conversations)))))
    else:
        await poisson_starts(converse, len(conversations), load)
    seconds = time.perf_counter() - t0
    flat = [(c, k + 1, t) for c, row in enumerate(rows) for k, t in enumerate(row)]
    return ConversationRun([t for _, _, t in flat], [k for _, k, _ in flat], [c for c, _, _ in flat], seconds)
