"""Mixtral-style mixture-of-experts feed-forward block with expert parallelism (EP).

Who calls what: :class:`MixtralForCausalLM` (or :func:`build_model`, which picks it for a
config with ``num_experts > 0``) builds a ``LlamaForCausalLM`` whose every MLP is a
:class:`MoEBlock` (through the ``mlp_factory`` hook, :func:`moe_mlp_factory`) and routes the
checkpoint's ``block_sparse_moe.*`` tensors to the blocks. Each forward adds the routed
(token, expert) pairs per expert to ``MoEBlock.expert_counts``; the decode instance gathers them
from its stage leaders (``Executor.expert_counts``) and hands them to
``services.experts.stats.ExpertStatsWriter.flush`` about once a second.

Maths of one block (exactly Hugging Face ``MixtralSparseMoeBlock``), for ``x [T, H]``:

    logits = x G^T                               G: router ``gate.weight`` [E, H]
    p      = softmax(logits in fp32)             over the E experts
    w, ids = topk(p, k);  w = w / sum(w)         renormalised top-k weights (fp32)
    y[t]   = sum_j w[t, j] * expert_{ids[t, j]}(x[t])
    expert_e(x) = W2_e (silu(W1_e x) * (W3_e x))    W1 gate, W3 up [I, H]; W2 down [H, I]

Expert parallelism: a pipeline stage has ``max(tp, ep)`` ranks and attention (TP or
replicated) leaves the *same* ``x`` on every rank of an EP group. EP rank ``e`` of ``ep`` owns
experts ``[e*E/ep, (e+1)*E/ep)`` and holds only their weights. Every rank routes all tokens
(the router is replicated, so all ranks agree), groups the (token, expert) pairs by expert
(``kernels.moe_permute``), runs its own experts on their contiguous rows, scatters the weighted
rows back to ``y_e [T, H]`` (zero for tokens none of its experts got) and one
``ep.all_reduce`` gives ``y = sum_e y_e`` on every rank. Why an all-reduce and not
all-to-all: the tokens are already on every rank (no dispatch needed) and gloo has no
variable-size all-to-all; the all-reduce moves ``T*H`` values per rank, the same order as the
all-to-all's ``T*k*H`` for small k, and leaves the combined output where the next layer's
replicated/TP attention needs it. When ``tp > ep`` the experts are replicated over the extra
ranks (no communication).

Placement (``engine.expert_placement``): which experts an EP rank holds is a :class:`~engine.expert_placement.Placement`
of ``ep * S`` slots, ``[r*E/ep, (r+1)*E/ep)`` on rank ``r`` until a rebalance moves them
(``engine.expert_move.apply_placement``, between two steps). An expert with ``c`` copies has its
pairs split round-robin over the copies, starting one copy further at each step; every token still gets
``sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` whichever rank computes which pair, so a placement
changes the output only by rounding (a matmul over a different number of rows, as when the
batch changes). ``rank_pairs`` counts the pairs this rank computed: the measured rank load.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from common.model import ModelConfig
from engine.expert_placement import Placement, default_placement
from engine.layers import load_param
from engine.model import LlamaForCausalLM
from engine.parallel import ParallelGroups
from kernels import moe_permute, moe_unpermute, silu_and_mul

_EXPERT = re.compile(r"^experts\.(\d+)\.(w1|w2|w3)\.weight$")
_STACKED = re.compile(r"^experts\.(w1|w2|w3)\.weight$")          # GGUF ffn_*_exps, [E, out, in]
# model.layers.<i>.(block_sparse_moe | mlp).<suffix>: saved Mixtral checkpoints use
# block_sparse_moe.{gate.weight, experts.<j>.w1|w2|w3.weight}; transformers >= 5 in memory
# uses mlp.{gate.weight, experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]}.
_MOE_NAME = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(gate\.weight|experts\..+)$")


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] fp32, expert ids [T, k])``: softmax in fp32, top-k, renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


class MoEBlock(nn.Module):
    """Router + this EP rank's SwiGLU experts (see the module docstring for the maths).

    Weights are buffers, not parameters: the block loads them itself through
    :meth:`load_weight` and reports gaps through :meth:`missing_weights` (the dense loader of
    ``LlamaForCausalLM`` tracks only parameters). ``expert_counts [E]`` int64 is cumulative.
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups | None = None, layer_index: int = 0):
        super().__init__()
        groups = groups or ParallelGroups.single()
        e, k, ep = config.num_experts, config.num_experts_per_tok, groups.ep
        if e <= 0 or not 0 < k <= e:
            raise ValueError(f"MoEBlock needs num_experts > 0 and 0 < top_k <= num_experts, "
                             f"got num_experts={e}, num_experts_per_tok={k}")
        if e % ep.size:
            raise ValueError(f"ep={ep.size} does not divide the {e} experts")
        self.layer_index, self.num_experts, self.top_k, self.ep = layer_index, e, k, ep
        h, i, dt = config.hidden_size, config.intermediate_size, config.torch_dtype
        self.intermediate_size = i
        self.register_buffer("gate_weight", torch.empty(e, h, dtype=dt))
        self.register_buffer("expert_counts", torch.zeros(e, dtype=torch.int64), persistent=False)
        # (token, expert) pairs this rank's slots computed, cumulative: the measured rank load
        self.register_buffer("rank_pairs", torch.zeros((), dtype=torch.int64), persistent=False)
        self.set_slots(default_placement(e, ep.size), torch.empty(e // ep.size, 2 * i, h, dtype=dt),
                       torch.empty(e // ep.size, h, i, dtype=dt))
        self._loaded: set[str] = set()
        self._steps = 0       # forwards run; every rank of the EP group runs the same ones

    def set_slots(self, placement: Placement, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Switch to ``placement`` whose slots on this rank hold ``gate_up_proj [S, 2I, H]``
        (``[W1_e; W3_e]``) and ``down_proj [S, H, I]`` (``W2_e``); ``engine.expert_move`` calls
        it between two steps with the moved weights in place."""
        if (placement.num_experts, placement.ep) != (self.num_experts, self.ep.size):
            raise ValueError(f"layer {self.layer_index}: placement for {placement.num_experts} experts "
                             f"over ep={placement.ep}, the block has {self.num_experts} over ep={self.ep.size}")
        if gate_up_proj.shape[0] != placement.slots or down_proj.shape[0] != placement.slots:
            raise ValueError(f"layer {self.layer_index}: {gate_up_proj.shape[0]} weight slots for a "
                             f"placement of {placement.slots} slots per rank")
        self.placement = placement
        self.slot_experts = placement.rank_experts(self.ep.rank)
        reps, copy = placement.replicas(), placement.copy_index()
        base = self.ep.rank * placement.slots
        self._slot_split = [(e, copy[base + s], reps[e]) for s, e in enumerate(self.slot_experts)]
        self.register_buffer("gate_up_proj", gate_up_proj)
        self.register_buffer("down_proj", down_proj)

    # ---- weights ----------------------------------------------------------------------------
    def _expected(self) -> set[str]:
        return {"gate"} | {f"{j}.{w}" for j in set(self.slot_experts) for w in ("w1", "w2", "w3")}

    def _slots_of(self, expert: int) -> list[int]:
        return [s for s, e in enumerate(self.slot_experts) if e == expert]

    def load_weight(self, suffix: str, tensor: torch.Tensor) -> None:
        """Load one checkpoint tensor named ``...block_sparse_moe.<suffix>`` (or ``...mlp.``):
        ``gate.weight``, ``experts.<j>.w1|w2|w3.weight`` (experts of other EP ranks are
        ignored, never held), stacked ``experts.gate_up_proj`` / ``experts.down_proj``
        (transformers) or stacked ``experts.w1|w2|w3.weight`` ``[E, out, in]`` (GGUF). Every
        local slot holding expert ``j`` (``self.slot_experts``) gets its copy."""
        what = f"layer {self.layer_index} {suffix}"
        if suffix == "gate.weight":
            load_param(self.gate_weight, tensor, what)
            self._loaded.add("gate")
            return
        stacked = suffix in ("experts.gate_up_proj", "experts.down_proj")
        m = _STACKED.match(suffix) if tensor.dim() == 3 else None
        if stacked or m:                                  # [E, out, in]: transformers or GGUF
            if tensor.dim() != 3 or tensor.shape[0] != self.num_experts:
                raise ValueError(f"{what}: shape {tuple(tensor.shape)} is not [{self.num_experts}, ., .]")
            w, marks = {"experts.gate_up_proj": ("w1w3", ("w1", "w3")),
                        "experts.down_proj": ("w2", ("w2",))}.get(suffix) or (m.group(1), (m.group(1),))
            for s, j in enumerate(self.slot_experts):
                load_param(self._dst(s, w), tensor[j], what)
                self._loaded |= {f"{j}.{x}" for x in marks}
        elif m := _EXPERT.match(suffix):
            j, w = int(m.group(1)), m.group(2)
            if not 0 <= j < self.num_experts:
                raise ValueError(f"{what}: expert {j} is outside [0, {self.num_experts})")
            for s in self._slots_of(j):                   # none: another EP rank's expert
                load_param(self._dst(s, w), tensor, what)
                self._loaded.add(f"{j}.{w}")
        else:
            raise ValueError(f"unexpected MoE weight {what!r}")

    def _dst(self, slot: int, w: str) -> torch.Tensor:
        """Where weight ``w`` (w1, w3, w2 or both w1w3) of local ``slot`` lives."""
        i = self.intermediate_size
        return {"w1": self.gate_up_proj[slot, :i], "w3": self.gate_up_proj[slot, i:],
                "w1w3": self.gate_up_proj[slot], "w2": self.down_proj[slot]}[w]

    def missing_weights(self) -> list[str]:
        return sorted(self._expected() - self._loaded)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` -> ``y [T, H]`` (summed over the EP group); counts routed pairs.

        Local slot ``s`` holds copy ``j`` of ``c`` of expert ``e`` and computes the pairs ``i``
        of ``e`` in this step with ``(i + step) % c == j`` (all of them when ``c = 1``); the
        step count rotates the first pair over the copies, so copies share the load even when
        a step routes one token to ``e``."""
        t = x.shape[0]
        weights, ids = route(F.linear(x, self.gate_weight), self.top_k)
        x_sorted, order, counts = moe_permute(x, ids, self.num_experts)
        self.expert_counts += counts
        offsets = [0] + torch.cumsum(counts, 0).tolist()
        outs, mine = [], []
        for s, (e, j, c) in enumerate(self._slot_split):
            lo, hi = offsets[e], offsets[e + 1]
            first = lo + (j - self._steps) % c         # pair i goes to copy (i + step) % c
            if hi <= first:                            # no pair for this copy in this step
                continue
            if c == 1:
                rows, pairs = x_sorted[lo:hi], order[lo:hi]
            else:
                pick = torch.arange(first, hi, c, device=x.device)
                rows, pairs = x_sorted[pick], order[pick]
            if rows.shape[0]:
                h = silu_and_mul(F.linear(rows, self.gate_up_proj[s]))
                outs.append(F.linear(h, self.down_proj[s]))
                mine.append(pairs)
        y = torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])
        pairs = torch.cat(mine) if mine else order.new_zeros(0)
        self.rank_pairs += pairs.numel()
        self._steps += 1
        return self.ep.all_reduce(moe_unpermute(y, pairs, weights, t))


def moe_mlp_factory(config: ModelConfig, groups: ParallelGroups, layer_index: int) -> nn.Module:
    """``LlamaForCausalLM``'s ``mlp_factory`` for Mixtral-style models."""
    return MoEBlock(config, groups, layer_index)


class MixtralForCausalLM(LlamaForCausalLM):
    """Llama decoder with :class:`MoEBlock` feed-forward layers; loads Mixtral checkpoints."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups | None = None):
        if not config.num_experts:
            raise ValueError(f"MixtralForCausalLM needs num_experts > 0, got {config.num_experts}")
        super().__init__(config, groups, mlp_factory=moe_mlp_factory)

    def moe_blocks(self) -> dict[int, MoEBlock]:
        """This stage's MoE blocks by *global* layer index."""
        return {layer.mlp.layer_index: layer.mlp for layer in self.model.layers}

    def expert_counts(self) -> dict[int, torch.Tensor]:
        """Cumulative routed (token, expert) pairs per expert, by global layer (this stage)."""
        return {i: b.expert_counts.clone() for i, b in self.moe_blocks().items()}

    def rank_pairs(self) -> dict[int, int]:
        """(token, expert) pairs this rank's slots computed, cumulative, by global layer."""
        return {i: int(b.rank_pairs) for i, b in self.moe_blocks().items()}

    def placements(self) -> dict:
        """The current ``engine.expert_placement.Placement`` of each MoE layer of this stage."""
        return {i: b.placement for i, b in self.moe_blocks().items()}

    def apply_placement(self, placements: dict) -> dict:
        """Move experts to ``placements`` ({layer: Placement}); collective over the EP groups,
        see ``engine.expert_move.apply_placement`` (returns its summary)."""
        from engine.expert_move import apply_placement
        with torch.inference_mode():
            return apply_placement(self.moe_blocks(), placements)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Route ``block_sparse_moe.*`` / ``mlp.{gate,experts}.*`` tensors to the MoE blocks and
        the rest to ``LlamaForCausalLM.load_weights``; raise ValueError on missing weights."""
        blocks = self.moe_blocks()

        def dense():
            for name, tensor in weights:
                m = _MOE_NAME.match(name)
                if m is None:
                    yield name, tensor
                elif self.wants(name):
                    blocks[int(m.group(1))].load_weight(m.group(2), tensor)

        super().load_weights(dense())
        missing = [f"layer {i}: {w}" for i, b in blocks.items() for w in b.missing_weights()]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} MoE weights, e.g. {missing[:5]}")


def build_model(config: ModelConfig, groups: ParallelGroups | None = None) -> LlamaForCausalLM:
    """The model class for ``config``: :class:`MixtralForCausalLM` when it has experts, else
    the dense ``LlamaForCausalLM`` (weights not loaded yet)."""
    if config.num_experts:
        return MixtralForCausalLM(config, groups)
    return LlamaForCausalLM(config, groups)
