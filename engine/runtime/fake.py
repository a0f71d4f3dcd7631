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

import torch

from common.model import CacheConfig, ModelConfig
from engine.batch import ForwardBatch, PrefillResult, check_num_cached
from engine.kv_cache import allocate_kv_cache
from engine.loader import ModelSource, load_model_config, resolve_model
from engine.runtime.config import RuntimeConfig
from engine.runtime.executor import InProcessExecutor, merge_prefill
from engine.runtime.rank import split_prefill_logits
from engine.sampler import StepLogits
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
            kv, vocab, bs = self.runner.kv_cache, self.model_config.vocab_size, self.cfg.block_size
            flat = kv.view(kv.shape[0], 2, -1, *kv.shape[4:])        # [L, 2, slots, KVH, D]
            flat[:, :, batch.slot_mapping] = batch.input_ids.to(kv.dtype)[None, None, :, None, None]
            idx = batch.logits_indices.long()                         # [R] flat token of each logits row
            pos = batch.positions[idx].long()
            if batch.is_prefill:   # the sequence holding flat token idx starts at the last start <= idx
                starts = batch.cu_seqlens[:-1].long()
                seq = torch.searchsorted(starts, idx, right=True) - 1
            else:
                seq = torch.arange(len(idx))
            if batch.is_prefill and not batch.has_context:
                c0 = torch.cat([torch.zeros(1, dtype=torch.long), batch.input_ids.long().cumsum(0)])
                total = c0[idx + 1] - c0[starts[seq]]
            else:   # decode, or prefill after a cached prefix: the context read back from the cache
                p = torch.arange(int(pos.max()) + 1)                  # [P] positions
                tables = batch.block_tables[seq].long()               # [R, blocks]
                slots = tables[:, p // bs].clamp(min=0) * bs + p % bs  # [R, P]
                ids = flat[0, 0][slots.flatten(), 0, 0].view(slots.shape).long()   # ids < 2**24: exact
                total = (ids * (p[None, :] <= pos[:, None])).sum(1)
            targets = (total + pos) % vocab
            if batch.full_rows is not None:   # reduced as a rank reduces it: no vocabulary-wide row
                rows = list(batch.full_rows)
                kept = torch.zeros(len(rows), vocab)
                kept[torch.arange(len(rows)), targets[rows]] = PEAK
                return StepLogits(torch.full((len(targets),), PEAK), targets, rows, kept)
            logits = torch.zeros(len(targets), vocab)
            logits[torch.arange(len(targets)), targets] = PEAK
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


def fake_engine_executor(cfg: RuntimeConfig, on_failure=None) -> FakeExecutor:
    """``--fake-engine``: the fake model in the shape of ``cfg.model`` (its vocabulary, layers,
    KV heads and EOS ids, read from its config; no weights loaded), under that model's id, so the
    router's tokenizer and checks hold. A benchmark of the serving path, not a model."""
    source = resolve_model(cfg.model)
    model = load_model_config(source)
    if model.num_experts:
        raise ValueError(f"--fake-engine has no experts: {source.model_id} is a mixture of experts; "
                         f"benchmark the serving path on a dense model")
    return FakeExecutor(cfg, on_failure, model_config=model, model_id=source.model_id)


def tiny_config(vocab: int = 512, layers: int = 2, eos: tuple[int, ...] = ()) -> ModelConfig:
    """A small model shape for the fake executor (fp32, 2 KV heads of 8 dims)."""
    return ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=16, num_layers=layers,
                       num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=32, rope_theta=10000.0,
                       rms_norm_eps=1e-5, max_position=2048, tie_word_embeddings=True, eos_token_ids=eos)
