"""The per-phase cost model: time of a prefill pass and of a decode step, and memory per GPU.

Every term is a field of :class:`Breakdown`, so a table can show where the time goes.
Per decoder layer on one rank (the slowest: largest stage, most expert tokens):

- **compute**: ``2 * tokens * params`` FLOPs for the rank's weight shards (q/o and MLP split
  by TP; k/v split, or one replicated head when TP > KV heads; experts: ``tokens * top_k / EP``
  rows times the load imbalance) plus attention ``4 * tokens * keys * heads/TP * head_dim``
  (causal prefill attends to ``(prompt + 1) / 2`` keys on average);
- **memory**: weight bytes of the shard (MoE: only the experts the batch touches,
  ``E/EP * (1 - (1 - k/E)^tokens)``), KV bytes read or written, activations;
- the layer takes ``max(compute / FLOP/s, memory / bandwidth)`` (roofline), plus attention
  score costs beyond FLOPs (softmax; 0 on GPUs with flash kernels, measured on the calibrated
  CPU profile), plus fixed overheads: per layer (kernel launches), per sequence per layer and
  per expert run (the calibrated CPU profile's Python loops), and per forward;
- **TP**: two all-reduces of ``tokens * hidden`` activations per dense layer (after attention
  and after the MLP; Megatron-LM, arXiv:1909.08053), one for a MoE layer (experts are not
  TP-split in Cleave: ``engine/moe.py``), by the algorithm NCCL/RCCL would pick for the
  message, group and topology (``services.capacity.collectives``: ring, tree, one-shot);
- **EP**: dispatch and combine all-to-alls of ``tokens * top_k / EP * hidden`` times the
  imbalance (GShard, arXiv:2006.16668), or, as Cleave's engine does today, one all-reduce of
  ``tokens * hidden`` over the EP group (``ep_exchange="all_reduce"``);
- **CP**: ring attention passes each rank's K/V block ``CP - 1`` times, overlapped with the
  attention of the block in hand; only the part of a pass longer than that compute is exposed
  (Ring Attention, arXiv:2310.01889);
- **PP**: two sends (hidden and residual, as ``engine.runtime.rank.stage_step`` does) per stage boundary
  (a boundary crossing a node uses the NIC), in decode the sampled tokens back to the first
  stage. Prefill: a pass of ``m`` micro-batches takes ``(m + PP - 1)`` stage times (GPipe,
  arXiv:1811.06965). Decode separates latency from throughput: a decode step's ``batch`` is one
  micro-batch, the sequences that pass the stages together, and ``m`` micro-batches (default
  ``PP``) are in flight. A sequence's token passes every stage in turn, so its latency (TPOT)
  is ``PP`` stage times of its micro-batch plus the hand-offs, never less than the same batch
  on one stage; while one micro-batch is on stage ``s`` the others keep the other stages busy,
  so the instance makes ``m x batch`` tokens per round: micro-batching raises throughput
  (and PP the KV room for more micro-batches), not the speed of one token. With ``m > PP`` a
  sequence also waits while its stages serve the other micro-batches (``pp_bubble_s``);
- **KV handoff**: the prompt's KV bytes over the NICs of the smaller of the two instances.

Memory per GPU is in :mod:`services.capacity.memory`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.layout import layout_problem
from common.model import dtype_bytes
from services.capacity.hardware import Hardware
from services.capacity.models import ModelSpec


@dataclass(frozen=True)
class Layout:
    """One instance's layout; world size ``pp * cp * max(tp, ep)`` (``common.layout.ParallelConfig``)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def stage_ranks(self) -> int:
        return max(self.tp, self.ep)

    @property
    def gpus(self) -> int:
        return self.pp * self.cp * self.stage_ranks

    def problem(self, model: ModelSpec) -> str | None:
        """Why the engine cannot run this layout on ``model`` (``common.layout.layout_problem``), or None."""
        lo, hi = sorted((self.tp, self.ep))
        if hi % lo:
            return f"tp={self.tp} and ep={self.ep}: the smaller must divide the larger"
        return layout_problem(self.tp, self.pp, self.ep, model.num_heads, model.num_kv_heads, model.num_layers,
                              model.num_experts)

    def label(self) -> str:
        return "x".join(f"{a.upper()}{getattr(self, a)}" for a in ("tp", "pp", "cp", "ep")
                        if getattr(self, a) > 1 or a == "tp")


@dataclass(frozen=True)
class CostOptions:
    """Knobs of the model. ``micro_batches``: PP micro-batches (0 = ``min(pp, sequences)``);
    ``expert_imbalance``: busiest EP rank's expert tokens over the mean (>= 1; measured from
    Redis expert counts when available); ``reserve``: share of device memory kept free;
    ``ep_exchange``: "all_to_all" (dispatch + combine) or "all_reduce" (Cleave's CPU engine)."""

    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    micro_batches: int = 0
    expert_imbalance: float = 1.0
    reserve: float = 0.1
    ep_exchange: str = "all_to_all"

    def __post_init__(self) -> None:
        dtype_bytes(self.weight_dtype), dtype_bytes(self.kv_dtype)
        if self.expert_imbalance < 1:
            raise ValueError(f"expert_imbalance must be >= 1, got {self.expert_imbalance}")
        if not 0 <= self.reserve < 1:
            raise ValueError(f"reserve must be in [0, 1), got {self.reserve}")
        if self.micro_batches < 0:
            raise ValueError(f"micro_batches must be >= 0, got {self.micro_batches}")
        if self.ep_exchange not in ("all_to_all", "all_reduce"):
            raise ValueError(f"ep_exchange must be 'all_to_all' or 'all_reduce', got {self.ep_exchange!r}")


@dataclass
class Breakdown:
    """Seconds of one prefill pass or decode step on the slowest rank, by term."""

    compute_s: float = 0.0       # layers' roofline time where compute bound (incl. LM head)
    memory_s: float = 0.0        # layers' roofline time where memory bound
    overhead_s: float = 0.0      # fixed per-layer / per-sequence overhead
    tp_s: float = 0.0
    ep_s: float = 0.0
    cp_s: float = 0.0            # exposed part of the ring K/V passes
    pp_send_s: float = 0.0
    pp_bubble_s: float = 0.0
    flops: float = 0.0           # per rank, whole pass
    bytes: float = 0.0
    over_parallelised: bool = False   # a layer's communication exceeds its compute
    layer_compute_s: float = 0.0
    layer_comm_s: float = 0.0
    tp_algorithm: str = ""       # the TP all-reduce's algorithm (collectives.best), "" without TP
    ep_algorithm: str = ""
    micro_batches: int = 1       # PP micro-batches (decode: in flight, each of the step's batch)
    sequences: float = 0.0       # sequences one pass / round serves (decode: micro_batches x batch)

    @property
    def comm_s(self) -> float:
        return self.tp_s + self.ep_s + self.cp_s + self.pp_send_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.overhead_s + self.comm_s + self.pp_bubble_s

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.total_s if self.total_s else 0.0

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(comm_s=self.comm_s, total_s=self.total_s, comm_share=self.comm_share)
        return out


def kv_heads_per_rank(model: ModelSpec, tp: int) -> int:
    """KV heads a TP rank holds: a split when tp <= kv heads, else one replicated head."""
    return max(1, model.num_kv_heads // tp)


@dataclass(frozen=True)
class _Step:
    """Work of one forward on one rank: ``tokens`` rows, ``keys`` attended per row,
    ``kv_tokens`` K/V rows read or written, ``seqs`` sequences (LM head rows)."""

    tokens: float
    keys: float
    kv_tokens: float
    seqs: float
    causal_full: bool = False    # CP ring attention (scores full masked blocks where ring_score_s > 0)


@dataclass(frozen=True)
class _LayerCost:
    """One decoder layer on the slowest rank: roofline seconds, FLOPs, bytes, overhead and
    communication seconds, the attention's share of the roofline, the collectives' algorithms."""

    roof: float
    compute_bound: bool
    flops: float
    bytes: float
    overhead: float
    tp_s: float
    ep_s: float
    attn_s: float
    tp_alg: str
    ep_alg: str


def _layer(model: ModelSpec, hw: Hardware, lay: Layout, opt: CostOptions, s: _Step) -> _LayerCost:
    wb, kvb, ab = dtype_bytes(opt.weight_dtype), dtype_bytes(opt.kv_dtype), hw.act_bytes
    h, d, t = model.hidden_size, model.head_dim, lay.tp
    kvh = kv_heads_per_rank(model, t)
    heads = model.num_heads / t
    lin = 2 * h * model.num_heads * d / t + 2 * h * kvh * d
    flops = 2 * s.tokens * lin
    wbytes = lin * wb
    if model.is_moe:
        k = model.num_experts_per_tok
        rows = s.tokens * k / lay.ep * opt.expert_imbalance
        flops += 2 * rows * model.expert_params() + 2 * s.tokens * h * model.num_experts
        touched = model.num_experts / lay.ep * (1 - (1 - k / model.num_experts) ** s.tokens)
        wbytes += touched * model.expert_params() * wb + h * model.num_experts * wb
        inter = k * model.expert_intermediate_size * opt.expert_imbalance / lay.ep
    else:
        flops += 2 * s.tokens * 3 * h * model.intermediate_size / t
        wbytes += 3 * h * model.intermediate_size / t * wb
        inter = model.intermediate_size / t
    attn_flops = 4 * s.tokens * s.keys * heads * d
    flops += attn_flops
    act = ab * s.tokens * (8 * h + 2 * (heads + 2 * kvh) * d + 3 * inter)
    nbytes = wbytes + s.kv_tokens * 2 * kvh * d * kvb + act
    over, share = hw.oversubscription(lay.gpus), hw.bandwidth_share(lay.gpus)
    rate_f, rate_m = hw.flops_for(opt.weight_dtype), hw.mem_rate() * share
    scores = s.tokens * s.keys * heads * (hw.ring_score_s if s.causal_full else hw.score_s) / share
    roof = (max(flops / rate_f, nbytes / rate_m) + scores) * over
    experts = touched if model.is_moe else 0.0
    overhead = (hw.layer_overhead_s + hw.seq_overhead_s * s.seqs + hw.expert_overhead_s * experts) * over
    node = hw.gpus_per_node
    msg = s.tokens * h * ab
    tp_one, tp_alg = hw.collective("all_reduce", msg, t, t > node)
    tp_s = (1 if model.is_moe else 2) * tp_one * _crowding(hw, lay, t)
    ep_s, ep_alg = 0.0, ""
    if lay.ep > 1:
        cross = lay.stage_ranks > node
        if opt.ep_exchange == "all_reduce":
            ep_s, ep_alg = hw.collective("all_reduce", msg, lay.ep, cross)
        else:
            one, ep_alg = hw.collective("all_to_all", msg * model.num_experts_per_tok / lay.ep * opt.expert_imbalance,
                                        lay.ep, cross)
            ep_s = 2 * one
        ep_s *= _crowding(hw, lay, lay.ep)
    attn_s = (attn_flops / rate_f + scores) * over
    return _LayerCost(roof, flops / rate_f >= nbytes / rate_m, flops, nbytes, overhead, tp_s, ep_s, attn_s,
                      tp_alg, ep_alg)


def _crowding(hw: Hardware, lay: Layout, group: int) -> float:
    """How much slower a collective measured over ``group`` ranks runs when the instance has
    more ranks than cores (calibrated CPU profiles: peers wait to be scheduled); 1 on devices."""
    return hw.oversubscription(lay.gpus) / hw.oversubscription(group)


def _stage_layers(model: ModelSpec, pp: int) -> int:
    return -(-model.num_layers // pp)   # the largest stage (the first ``layers % pp`` get one more)


def _boundaries_crossing(lay: Layout, hw: Hardware) -> int:
    """Stage boundaries whose two stages sit on different nodes (GPUs placed stage by stage)."""
    per_stage = lay.gpus // lay.pp
    return sum(1 for s in range(1, lay.pp) if per_stage > hw.gpus_per_node
               or (s * per_stage) // hw.gpus_per_node != (s * per_stage - 1) // hw.gpus_per_node)


def _head_s(model: ModelSpec, hw: Hardware, lay: Layout, opt: CostOptions, seqs: float) -> float:
    """The LM head over ``seqs`` rows (compute or weight streaming, whichever is slower)."""
    return max(2 * seqs * model.hidden_size * model.vocab_size / hw.flops_for(opt.weight_dtype),
               model.vocab_size * model.hidden_size * dtype_bytes(opt.weight_dtype) / hw.mem_rate()) \
        * hw.oversubscription(lay.gpus)


def _pp_sends(model: ModelSpec, hw: Hardware, lay: Layout, tokens: float, seqs: float, decode: bool) -> float:
    """Seconds of one micro-batch's hand-offs through every stage boundary: hidden and residual
    per boundary (over the NIC where it crosses a node), in decode the sampled tokens back."""
    if lay.pp == 1:
        return 0.0
    act = tokens * model.hidden_size * hw.act_bytes
    crowd = _crowding(hw, lay, 2)
    send, send_nic = (2 * crowd * max(hw.pp_message_s, hw.comm_time("send_recv", act, 2, nic))
                      for nic in (False, True))                    # hidden and residual
    cross = min(_boundaries_crossing(lay, hw), lay.pp - 1)
    out = (lay.pp - 1 - cross) * send + cross * send_nic
    if decode:                                  # the sampled tokens return to the first stage
        out += crowd * max(hw.pp_message_s, hw.comm_time("send_recv", 8 * seqs, 2, cross > 0))
    return out


def _fill(b: Breakdown, c: _LayerCost, layers: float, head_s: float, cp_s: float = 0.0) -> Breakdown:
    """Spread ``layers`` layer times and the LM head over the terms of ``b``."""
    if c.compute_bound:
        b.compute_s = layers * c.roof + head_s
    else:
        b.memory_s, b.compute_s = layers * c.roof, head_s
    b.overhead_s += layers * c.overhead
    b.tp_s, b.ep_s, b.cp_s = layers * c.tp_s, layers * c.ep_s, layers * cp_s
    b.layer_compute_s, b.layer_comm_s = c.roof, c.tp_s + c.ep_s + cp_s
    b.over_parallelised = b.layer_comm_s > c.roof
    b.tp_algorithm, b.ep_algorithm = c.tp_alg, c.ep_alg
    return b


def _prefill_pass(model, hw, lay, opt, step: _Step, m: int) -> Breakdown:
    """One prefill pass of ``step`` split into ``m`` micro-batches: ``(m + PP - 1)`` stage times."""
    micro = _Step(step.tokens / m, step.keys, step.kv_tokens / m, step.seqs / m, step.causal_full)
    c = _layer(model, hw, lay, opt, micro)
    cp_s = 0.0
    if lay.cp > 1:
        block = micro.tokens * 2 * kv_heads_per_rank(model, lay.tp) * model.head_dim * hw.act_bytes
        cp_s = (lay.cp - 1) * max(0.0, hw.comm_time("send_recv", block, 2) - c.attn_s / lay.cp)
    n = _stage_layers(model, lay.pp)
    head_s = _head_s(model, hw, lay, opt, micro.seqs) + hw.step_overhead_s * hw.oversubscription(lay.gpus)
    stage = n * (c.roof + c.overhead + c.tp_s + c.ep_s + cp_s) + head_s
    b = _fill(Breakdown(micro_batches=m, sequences=step.seqs), c, m * n, m * head_s, cp_s)
    b.pp_bubble_s = (lay.pp - 1) * stage
    b.pp_send_s = _pp_sends(model, hw, lay, micro.tokens, micro.seqs, False)
    b.flops = m * (n * c.flops + 2 * micro.seqs * model.hidden_size * model.vocab_size)
    b.bytes = m * n * c.bytes
    return b


def _decode_round(model, hw, lay, opt, step: _Step, m: int) -> Breakdown:
    """One decode round: ``m`` micro-batches of ``step`` each advance one token (module doc).

    ``total_s`` is one sequence's time per token: ``max(path, m x stage)``, the path being its
    micro-batch through every stage in turn (``PP`` stages of the largest's layers and per-forward
    overhead, one LM head, the hand-offs) and ``m x stage`` the busiest stage serving every
    micro-batch once. The round makes ``sequences = m x batch`` tokens.
    """
    c = _layer(model, hw, lay, opt, step)
    n = _stage_layers(model, lay.pp)
    over = hw.oversubscription(lay.gpus)
    fwd, head = hw.step_overhead_s * over, _head_s(model, hw, lay, opt, step.seqs)
    layers_s = n * (c.roof + c.overhead + c.tp_s + c.ep_s)
    b = _fill(Breakdown(micro_batches=m, sequences=m * step.seqs), c, lay.pp * n, head)
    b.overhead_s += lay.pp * fwd
    b.pp_send_s = _pp_sends(model, hw, lay, step.tokens, step.seqs, True)
    path = lay.pp * (layers_s + fwd) + head + b.pp_send_s
    b.pp_bubble_s = max(0.0, m * (layers_s + fwd + head) - path)
    b.flops = lay.pp * n * c.flops + 2 * step.seqs * model.hidden_size * model.vocab_size
    b.bytes = lay.pp * n * c.bytes
    return b


def _micro(opt: CostOptions, lay: Layout, seqs: int = 0) -> int:
    """Micro-batches: 1 without PP; else ``opt.micro_batches`` or PP, at most ``seqs`` when > 0
    (prefill splits its batch; a decode step's batch is one micro-batch of several in flight)."""
    if lay.pp == 1:
        return 1
    m = opt.micro_batches or lay.pp
    return max(1, min(m, seqs)) if seqs else m


def prefill_time(model: ModelSpec, hw: Hardware, lay: Layout, opt: CostOptions, batch: int, prompt: int) -> Breakdown:
    """One prefill pass of ``batch`` prompts of ``prompt`` tokens (each prompt split over CP ranks)."""
    tokens = batch * prompt / lay.cp
    ring = lay.cp > 1
    keys = prompt if ring and hw.ring_score_s else (prompt + 1) / 2
    return _prefill_pass(model, hw, lay, opt, _Step(tokens, keys, tokens, batch, ring), _micro(opt, lay, batch))


def chunk_prefill_time(model: ModelSpec, hw: Hardware, lay: Layout, opt: CostOptions, tokens: int,
                       context: int) -> Breakdown:
    """One forward of a prompt chunk on a decode instance (chunked prefill): ``tokens`` new rows
    attending to ``context`` earlier tokens of the prompt (read from the KV cache) and, causally,
    to each other: ``context + (tokens + 1) / 2`` keys per row, ``context + tokens`` KV rows read
    or written; one micro-batch (``services.capacity.aggregated``; Sarathi-Serve, OSDI 2024)."""
    step = _Step(tokens, context + (tokens + 1) / 2, context + tokens, 1)
    return _prefill_pass(model, hw, lay, opt, step, 1)


def decode_step_time(model: ModelSpec, hw: Hardware, lay: Layout, opt: CostOptions, batch: float,
                     context: float) -> Breakdown:
    """One decode step of ``batch`` sequences (one micro-batch) attending to ``context`` tokens
    each: ``total_s`` is the per-token latency (TPOT) a sequence sees; with PP, ``micro_batches``
    such steps are in flight and the round makes ``sequences`` tokens (:func:`decode_throughput`)."""
    return _decode_round(model, hw, lay, opt, _Step(batch, context, batch * context, batch), decode_micro_batches(opt, lay))


def decode_micro_batches(opt: CostOptions, lay: Layout) -> int:
    """Micro-batches a decode instance keeps in flight: 1 without PP, else ``opt.micro_batches`` or PP."""
    return _micro(opt, lay)


def decode_throughput(step: Breakdown) -> float:
    """Tokens/s of one instance running :func:`decode_step_time`'s round over and over."""
    return step.sequences / step.total_s if step.total_s else 0.0


def kv_handoff_time(model: ModelSpec, hw: Hardware, opt: CostOptions, prompt: int, prefill: Layout, decode: Layout) -> float:
    """Seconds to move one prompt's KV from a prefill to a decode instance over the NICs."""
    nbytes = prompt * model.kv_bytes_per_token(opt.kv_dtype)
    links = min(prefill.gpus, decode.gpus)
    if hw.measured.get("send_recv"):
        return hw.comm_time("send_recv", nbytes / links, 2)
    return nbytes / links / (hw.nic_bw * hw.link_eff) + hw.nic_latency_s


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-9))
