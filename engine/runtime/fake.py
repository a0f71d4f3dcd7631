"""A one-rank executor with no model: deterministic logits, a real KV cache and real handoff.

Who uses it: unit tests of the services and the router (retry, failover, admission) that need
real prefill/decode workers and real KV transfers but not a model's arithmetic:
``WorkerHost(cfg, make=functools.partial(FakeExecutor, model_config=tiny))``.

The fake model writes each token's id into every K and V element of its slot, and predicts
``next = (sum of the ids of the context + position of the last token) % vocab`` as a peaked
logits row (``PEAK`` at that id, 0 elsewhere). Decode, and a prefill after a cached prefix
(``num_cached``), read the sum back from the KV cache, so a handoff that drops or corrupts a
block, or a wrong cached block, changes the tokens; :meth:`FakeExecutor.expected` gives
the right answer for a prompt in pure Python. ``fault``: set it to an exception and every
forward raises it (a broken worker) until it is cleared.
"""
from __future__ import annotations

import bisect

import torch

from common.model import CacheConfig, ModelConfig
from engine.batch import ForwardBatch, PrefillResult, check_num_cached
from engine.kv_cache import allocate_kv_cache
from engine.loader import ModelSource
from engine.runtime.config import RuntimeConfig
from engine.runtime.executor import InProcessExecutor, merge_prefill
from engine.runtime.rank import split_prefill_logits
from kvtransfer.handoff import KVReceiver, KVSender, compat_hash
from kvtransfer.transport import make_transport

PEAK = 30.0


class _FakeRunner:
    """The parts of a ``RankRunner`` the base executor reads, over the fake model."""

    def __init__(self, cfg: RuntimeConfig, model: ModelConfig, model_id: str, transport) -> None:
        self.cfg, self.model_config, self.device = cfg, model, torch.device("cpu")
        self.source = ModelSource("hf", "", model_id)
        self.num_blocks = CacheConfig(cfg.block_size, cfg.num_blocks, cfg.kv_cache_bytes).blocks_for(model)
        self.kv_cache = allocate_kv_cache(model, CacheConfig(cfg.block_size, self.num_blocks))
        self.transport = transport
        self.compat = compat_hash(model_id, model, cfg.block_size)
        self.layout = cfg.parallel                          # one rank
        self.receiver = KVReceiver(transport, self.kv_cache, model, self.layout, rank=0)
        self.sender = KVSender(transport, model, self.compat, self.layout, rank=0, checksum=cfg.checksum)

    def close(self) -> None:
        self.transport.close()


class FakeExecutor(InProcessExecutor):
    """Executor over the fake model (see the module docstring). ``transport``: a KV transport
    (default: the config's, on its host); ``model_config``: the shape (vocab, layers, heads)."""

    def __init__(self, cfg: RuntimeConfig, on_failure=None, model_config: ModelConfig | None = None,
                 model_id: str = "fake-model", transport=None) -> None:
        if cfg.world_size != 1:
            raise ValueError(f"FakeExecutor runs one rank, got layout {cfg.parallel}")
        model = (model_config or tiny_config()).replace(dtype="float32")
        self.fault: Exception | None = None
        self.forwards = 0                       # forward passes run (prefill and decode)
        transport = transport or make_transport(cfg.transport, host=cfg.host)
        super().__init__(cfg, on_failure, runner=_FakeRunner(cfg, model, model_id, transport))

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        with self._lock:
            if self.fault is not None:
                raise self.fault
            self.forwards += 1
            kv, vocab = self.runner.kv_cache, self.model_config.vocab_size
            flat = kv.view(kv.shape[0], 2, -1, *kv.shape[4:])        # [L, 2, slots, KVH, D]
            flat[:, :, batch.slot_mapping] = batch.input_ids.to(kv.dtype)[None, None, :, None, None]
            targets, starts = [], batch.cu_seqlens.tolist() if batch.is_prefill else []
            for row, idx in enumerate(batch.logits_indices.tolist()):
                # the sequence holding flat token idx (prefill) starts at the last start <= idx
                seq = bisect.bisect_right(starts, idx) - 1 if batch.is_prefill else row
                if batch.is_prefill and not batch.has_context:
                    total = int(batch.input_ids[starts[seq]: idx + 1].sum())
                else:   # decode, or prefill after a cached prefix: the context from the cache
                    n, bs = int(batch.positions[idx]) + 1, self.cfg.block_size
                    slots = [int(batch.block_tables[seq, p // bs]) * bs + p % bs for p in range(n)]
                    total = int(flat[0, 0, slots, 0, 0].sum())
                targets.append((total + int(batch.positions[idx])) % vocab)
            logits = torch.zeros(len(targets), vocab)
            logits[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)] = PEAK
            return logits

    def prefill(self, prompt, blocks, cancelled=None, prompt_logprobs: int = -1,
                num_cached: int = 0) -> PrefillResult:
        bs = self.cfg.block_size
        check_num_cached(len(prompt), num_cached, bs, prompt_logprobs=prompt_logprobs)
        batch = ForwardBatch.prefill([list(prompt)], [list(blocks)], bs,
                                     [num_cached] if num_cached else None)
        if prompt_logprobs < 0:
            return PrefillResult(self.forward(batch))
        logits = self.forward(batch.all_logits())
        part = split_prefill_logits(logits, batch.positions.tolist(), list(prompt), prompt_logprobs)
        return merge_prefill(list(prompt), [part], prompt_logprobs)

    @staticmethod
    def expected(prompt: list[int], max_tokens: int, vocab: int) -> list[int]:
        """The greedy tokens the fake model gives ``prompt`` (no EOS: ``max_tokens`` of them)."""
        ids, out = list(prompt), []
        for _ in range(max_tokens):
            out.append((sum(ids) + len(ids) - 1) % vocab)
            ids.append(out[-1])
        return out


def tiny_config(vocab: int = 512, layers: int = 2, eos: tuple[int, ...] = ()) -> ModelConfig:
    """A small model shape for the fake executor (fp32, 2 KV heads of 8 dims)."""
    return ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=16, num_layers=layers,
                       num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=32, rope_theta=10000.0,
                       rms_norm_eps=1e-5, max_position=2048, tie_word_embeddings=True, eos_token_ids=eos)
