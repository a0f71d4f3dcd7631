"""``cleave plan --calibrate``: measure this machine and write the ``local`` hardware profile.

What is measured (each the median of several runs, one torch thread per rank as the engine's
rank processes use, ``engine.parallel``):

- **matmul FLOP/s**: fp32 ``F.linear`` at ``[256, 512] x [1536, 512]`` and ``[256, 1024] x [1024, 1024]``;
- **memory bandwidth**: the rate ``F.linear`` streams a 32 MiB weight for 8 rows (decode),
  capped by ``copy_`` of 128 MiB; and all cores copying at once (ranks running together share
  the memory bus);
- **the engine's layer rates**: FLOP/s of a 128-token prefill and weight-streaming bytes/s of
  an 8-sequence decode step through the engine's own decoder layers (a synthetic hidden-512
  model, per layer from 2 vs 6 layers, overheads removed); they replace the matmul and copy
  figures above (kept for the shared-bandwidth ratio);
- **overheads of the engine** on a micro Llama (hidden 32, random weights, built in memory with
  ``engine.model``): per layer per forward, per sequence per layer (attention runs per
  sequence), and per forward (embedding, final norm, LM head call) — from decode steps of 2 and
  6 layers at 1 and 8 sequences, where the arithmetic is negligible;
- **a pipeline message**: what a PP2 micro-batched serving decode step of a micro model (the
  stage step ``RankRunner.forward_micro`` runs, the tokens then sent back to the first stage)
  costs beyond the same model on one rank, per message on the step's critical path;
- **collectives over the real gloo backend** for 2..``max_ranks`` ranks, time vs bytes:
  ``all_reduce``, ``all_to_all_single``, and ``send``/``recv`` between two ranks (half a
  round trip), each between barriers, the slowest rank's time (timed on each rank by
  ``engine.comm_timing``). The profile interpolates these times; its ``link_latency_s`` and
  ``link_bw`` are the alpha-beta fit of the send/recv times (``collectives.fit_alpha_beta``),
  and :func:`collective_fit_table` fits each op's alpha and beta to the algorithm gloo runs
  (ring all-reduce, direct all-to-all, send/recv) over 2..``max_ranks`` ranks and shows how far
  each measured time is from that formula.

The profile's "GPU" is one core: ``gpus_per_node`` = cores, memory = RAM / cores, and layouts
with more ranks than cores share them (``Hardware.oversubscription``).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from services.capacity import collectives
from services.capacity.hardware import Hardware

SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 23)     # bytes per rank


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_compute() -> dict:
    """``flops``: FLOP/s of ``F.linear`` (weights ``[out, in]`` as the engine holds them) at two
    prefill-like shapes; ``mem_bw``: bytes/s at which ``F.linear`` streams a 32 MiB weight for 8
    rows (decode's memory-bound case), capped by ``copy_``; ``mem_bw_all``: all cores copying.
    One thread each, except the last."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    rates = []
    for m, k, n in ((256, 512, 1536), (256, 1024, 1024)):
        x, w = torch.randn(m, k), torch.randn(n, k)
        rates.append(2 * m * k * n / _median_time(lambda: F.linear(x, w), 20))
    x, w = torch.randn(8, 2048), torch.randn(4096, 2048)
    stream = w.numel() * 4 / _median_time(lambda: F.linear(x, w), 20)
    src = torch.ones(32 << 20)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), 7)
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    copy_all = 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), 7)
    torch.set_num_threads(1)
    return {"flops": statistics.mean(rates), "mem_bw": min(stream, copy), "mem_bw_all": copy_all * min(stream, copy) / copy}


def _micro_model(layers: int, experts: int = 0, groups=None, hidden: int = 32, intermediate: int = 64):
    import torch
    from common.model import CacheConfig, ModelConfig
    from engine.moe import build_model
    cfg = ModelConfig(architecture="mixtral" if experts else "llama", vocab_size=128, hidden_size=hidden,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                      intermediate_size=intermediate, rope_theta=1e4, rms_norm_eps=1e-5, max_position=256,
                      tie_word_embeddings=False, num_experts=experts, num_experts_per_tok=2 if experts else 0)
    model = build_model(cfg, groups).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, model.allocate_kv_cache(CacheConfig(block_size=16, num_blocks=64))


def _decode_step_time(model, kv, seqs: int) -> float:
    """One decode step as a runner takes it: build the batch, forward, argmax."""
    from engine.batch import ForwardBatch

    def step():
        batch = ForwardBatch.decode([5] * seqs, [15] * seqs, [[i] for i in range(seqs)], 16)
        model(batch, kv).argmax(dim=-1).tolist()
    return _median_time(step, 30)


def _scheduler_step_time(model, kv) -> float:
    """Seconds per decode step of the serving scheduler (``engine.scheduler.DecodeScheduler.step``:
    batch, forward, sampling, bookkeeping) over one sequence on one rank."""
    from engine.block_manager import BlockManager
    from engine.sampler import SamplingConfig
    from engine.scheduler import DecodeScheduler, Sequence
    blocks = BlockManager(kv.shape[2], 16, prefix_cache=False)
    blocks.allocate("calibrate", None, 4)
    sched = DecodeScheduler(lambda batch: model(batch, kv), blocks)
    sched.add(Sequence("calibrate", tokens=[5] * 4, num_cached=3, generated=1,
                       max_tokens=1 << 30, sampling=SamplingConfig(), eos_token_ids=frozenset(), ignore_eos=True,
                       emit=lambda *a: None))
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(40):
            sched.step()
        runs.append((time.perf_counter() - t0) / 40)
    return statistics.median(runs)


def _pp_round_rank(groups, seqs: int, steps: int) -> float:
    """Seconds per micro-batched decode step on this rank's stage of a 4-layer micro model: the
    batch cut into ``pp`` micro-batches, each received, computed and sent on without waiting (as
    ``RankRunner.forward_micro``), then the last stage's tokens sent back to every earlier stage."""
    import torch

    from engine.batch import ForwardBatch
    from engine.parallel import AsyncSender
    from engine.runtime.rank import stage_step
    model, kv = _micro_model(4, groups=groups)
    batch = ForwardBatch.decode([5] * seqs, [15] * seqs, [[i] for i in range(seqs)], 16)
    parts, pp, last = batch.split(min(groups.pp.size, seqs)), groups.pp, groups.pp.size - 1

    def step():
        sender, outs = AsyncSender(pp), []
        for part in parts:
            outs.append(stage_step(model, groups, kv, part, send=sender.send))
        if groups.is_last_stage:
            for s in range(last):
                sender.send(torch.cat(outs).argmax(-1), s)
        else:
            pp.recv(torch.empty(seqs, dtype=torch.long), last)
        sender.flush()

    with torch.inference_mode():
        for _ in range(4):                                         # warm-up
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
    return (time.perf_counter() - t0) / steps


def measure_pp_message(seqs: int = 8, new_tokens: int = 33) -> float:
    """Seconds one PP message (hidden, residual or tokens) adds on the critical path of a
    serving decode step: a micro-batched PP2 step of a 4-layer micro model, less the one-rank
    step of the same model, over the 3 messages of a step's critical path."""
    from common.layout import ParallelConfig
    from engine.parallel import ParallelGroups
    from engine.runtime.spawn import spawn_ranks
    runs = []
    for _ in range(3):
        pp = max(spawn_ranks(ParallelConfig(pp=2), _pp_round_rank, seqs, new_tokens, timeout_s=120))
        one = _pp_round_rank(ParallelGroups.single(), seqs, new_tokens)
        runs.append(max(0.0, (pp - one) / 3))
    return statistics.median(runs)


def measure_overheads(rounds: int = 3) -> dict:
    """:func:`measure_overheads_once` ``rounds`` times, the median of each figure (a shared
    machine's noise is in single runs)."""
    runs = [measure_overheads_once() for _ in range(rounds)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure_overheads_once() -> dict:
    """Engine overheads in seconds: ``layer``, ``seq`` (per sequence per layer), ``step`` (per
    decode step of the serving scheduler beyond its layers: batch, embedding, LM head, sampling, bookkeeping),
    ``expert`` (per expert run per layer) — from a micro model where arithmetic is nil."""
    import torch
    torch.set_num_threads(1)
    t = {}
    with torch.inference_mode():
        for layers in (2, 6):
            model, kv = _micro_model(layers)
            for seqs in (1, 8):
                t[layers, seqs] = _decode_step_time(model, kv, seqs)
        moe, kv = _micro_model(6, experts=8)
        t_moe = _decode_step_time(moe, kv, 8)
        round_s = _scheduler_step_time(*_micro_model(2))
    per_layer_1 = (t[6, 1] - t[2, 1]) / 4
    per_layer_8 = (t[6, 8] - t[2, 8]) / 4
    seq = max(0.0, (per_layer_8 - per_layer_1) / 7)
    touched = 8 * (1 - (1 - 2 / 8) ** 8)
    return {"layer": max(1e-6, per_layer_1 - seq), "seq": seq, "step": max(0.0, round_s - 2 * per_layer_1),
            "expert": max(0.0, (t_moe - t[6, 8]) / 6 / touched)}


def measure_layer_rates(overhead: dict, hidden: int = 512, intermediate: int = 1536) -> dict:
    """FLOP/s and weight-streaming bytes/s of the engine's own decoder layer (fp32, one thread)
    on a mid-size synthetic model: a 128-token prefill (compute bound) and an 8-sequence decode
    step (memory bound), per layer from 2 vs 6 layers, less the measured overheads."""
    import torch
    from engine.batch import ForwardBatch
    torch.set_num_threads(1)
    params = 4 * hidden * hidden * 3 // 4 + 3 * hidden * intermediate    # q, o + k, v (2 of 4 heads) + MLP
    t = {}
    with torch.inference_mode():
        for layers in (2, 6):
            model, kv = _micro_model(layers, hidden=hidden, intermediate=intermediate)
            pre = ForwardBatch.prefill([[5] * 128], [list(range(8))], 16)
            dec = ForwardBatch.decode([5] * 8, [15] * 8, [[i] for i in range(8)], 16)
            t[layers] = (_median_time(lambda: model(pre, kv), 7), _median_time(lambda: model(dec, kv), 15))
    pre_layer = (t[6][0] - t[2][0]) / 4 - overhead["layer"] - overhead["seq"]
    dec_layer = (t[6][1] - t[2][1]) / 4 - overhead["layer"] - 8 * overhead["seq"]
    return {"flops": 2 * 128 * params / max(pre_layer, 1e-6), "mem_bw": params * 4 / max(dec_layer, 1e-6)}


def measure_attention(flops: float) -> dict:
    """Seconds per attention score element beyond the FLOPs, of the engine's prefill kernel
    (``kernels.prefill_attention``: causal, fused) and ring-attention block kernel
    (``kernels.ring_attention.masked_block_attention``: full masked blocks), 8 heads of 8."""
    import torch
    from kernels import prefill_attention
    from kernels.ring_attention import masked_block_attention
    torch.set_num_threads(1)
    n, h, d = 512, 8, 8
    q, k, v = torch.randn(n, h, d), torch.randn(n, h, d), torch.randn(n, h, d)
    cu = torch.tensor([0, n], dtype=torch.int32)
    t = _median_time(lambda: prefill_attention(q, k, v, cu, 0.3), 10)
    causal = n * (n + 1) / 2 * h
    pos = torch.arange(n)
    tr = _median_time(lambda: masked_block_attention(q, k, v, pos, pos, 0.3), 10)
    full = n * n * h
    return {"score": max(0.0, (t - 4 * d * causal / flops) / causal),
            "ring_score": max(0.0, (tr - 4 * d * full / flops) / full)}


def fit_alpha_beta(points: list) -> list:
    """Least-squares ``t = a + b * bytes`` (a, b >= 0) through noisy ``[[bytes, seconds], ...]``,
    returned as points at the same sizes: a small gloo message can take longer than a larger one
    in a single sample, and the cost model must grow with bytes."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    b = max(0.0, sum((p[0] - mx) * (p[1] - my) for p in points) / var) if var else 0.0
    a = max(0.0, my - b * mx)
    return [[p[0], a + b * p[0]] for p in points]


def measure_collectives(max_ranks: int, reps: int = 3) -> dict:
    """``{op: {ranks: [[bytes, seconds], ...]}}`` over gloo: the slowest rank's median, fitted
    to a line per op and rank count (:func:`fit_alpha_beta`)."""
    from engine.comm_timing import time_collectives
    from common.layout import ParallelConfig
    from engine.runtime.spawn import RankFailure, spawn_ranks
    measured: dict = {"all_reduce": {}, "all_to_all": {}, "send_recv": {}}
    for ranks in range(2, max_ranks + 1):
        try:
            res = spawn_ranks(ParallelConfig(tp=ranks), time_collectives, SIZES, reps, timeout_s=90)
        except RankFailure:      # e.g. the free port was taken before rank 0 bound it: once more
            res = spawn_ranks(ParallelConfig(tp=ranks), time_collectives, SIZES, reps, timeout_s=90)
        for op in measured:
            if res[0][op]:
                raw = [[n, max(r[op][i][1] for r in res)] for i, (n, _) in enumerate(res[0][op])]
                measured[op][ranks] = fit_alpha_beta(raw)
    return measured


def _ram_bytes() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9


def calibrate(max_ranks: int = 4) -> Hardware:
    """Measure everything above and return the ``local`` profile."""
    if not 2 <= max_ranks <= 8:
        raise ValueError(f"max_ranks must be in 2..8, got {max_ranks}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    c = measure_compute()
    o = measure_overheads()
    rates = measure_layer_rates(o)
    c = {"flops": rates["flops"], "mem_bw": rates["mem_bw"],
         "mem_bw_all": c["mem_bw_all"] * rates["mem_bw"] / c["mem_bw"]}
    a = measure_attention(c["flops"])
    pp_message = measure_pp_message()
    measured = measure_collectives(max_ranks)
    alpha, bw = collectives.fit_alpha_beta({"send_recv": measured["send_recv"]})
    return Hardware(
        name="local", memory_bytes=_ram_bytes() / cores, flops={"fp32": c["flops"]}, mem_bw=c["mem_bw"],
        mem_bw_all=c["mem_bw_all"], link_bw=bw, link_latency_s=alpha, nic_bw=bw, nic_latency_s=alpha,
        gpus_per_node=cores, flops_eff=1.0, mem_eff=1.0,
        link_eff=1.0, layer_overhead_s=o["layer"], seq_overhead_s=o["seq"], step_overhead_s=o["step"],
        expert_overhead_s=o["expert"], score_s=a["score"], ring_score_s=a["ring_score"], pp_message_s=pp_message,
        act_bytes=4, cores=cores, measured=measured,
        source=f"measured by `cleave plan --calibrate` on {platform.node()} ({cores} cores, gloo) "
               f"at {time.strftime('%Y-%m-%d %H:%M:%S')}")


def calibration_table(hw: Hardware) -> str:
    lines = [f"matmul: {hw.flops['fp32'] / 1e9:.1f} GFLOP/s per core (fp32); memory: {hw.mem_bw / 1e9:.1f} GB/s "
             f"(all cores: {hw.mem_bw_all / 1e9:.1f}); "
             f"overhead: {hw.layer_overhead_s * 1e6:.0f} us per layer, {hw.seq_overhead_s * 1e6:.0f} us per "
             f"sequence per layer, {hw.step_overhead_s * 1e6:.0f} us per forward, {hw.expert_overhead_s * 1e6:.0f} us "
             f"per expert per layer; attention {hw.score_s * 1e9:.2f} ns per causal score, "
             f"ring attention {hw.ring_score_s * 1e9:.2f} ns per masked score; "
             f"{hw.pp_message_s * 1e3:.2f} ms per pipeline message",
             "op           ranks " + " ".join(f"{n:>10}" for n in SIZES) + "   (bytes -> ms)"]
    for op, by_ranks in hw.measured.items():
        for ranks, pts in sorted(by_ranks.items()):
            lines.append(f"{op:<12} {ranks:>5} " + " ".join(f"{t * 1e3:>10.3f}" for _, t in pts))
    return "\n".join(lines)


def collective_fit_table(measured: dict) -> str:
    """Each op's measured gloo times against the alpha-beta formula of the algorithm gloo runs,
    alpha and beta fitted per op over all its rank counts (ms, by bytes per rank), and the
    median and worst relative error (all points, and the 2-rank ones)."""
    lines = ["op           ranks  alg     " + " ".join(f"{n:>16}" for n in SIZES) + "   (measured / model ms)"]
    rows, fits = [], []
    for op, by_ranks in measured.items():
        if not by_ranks:
            continue
        alpha, bw = collectives.fit_alpha_beta({op: by_ranks})
        fits.append(f"{op} {alpha * 1e6:.0f} us/step, {bw / 1e9:.2f} GB/s")
        mine = collectives.fit_errors({op: by_ranks}, alpha, bw)
        rows += mine
        for ranks in sorted({r["ranks"] for r in mine}):
            lines.append(f"{op:<12} {ranks:>5}  {collectives.GLOO_ALGORITHM[op]:<7} " + " ".join(
                f"{r['measured_s'] * 1e3:>7.3f}/{r['model_s'] * 1e3:<8.3f}" for r in mine if r["ranks"] == ranks))
    errs = sorted(abs(r["error"]) for r in rows)
    two = sorted(abs(r["error"]) for r in rows if r["ranks"] == 2)
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines.insert(0, "collective formulas fitted to gloo per op: " + "; ".join(fits))
    lines.append(f"{len(rows)} points: median |error| {statistics.median(errs):.0%}, worst {errs[-1]:.0%} "
                 f"({worst['op']}, {worst['ranks']} ranks, {worst['bytes']} bytes); 2 ranks: median "
                 f"{statistics.median(two):.0%}, worst {two[-1]:.0%}")
    return "\n".join(lines)


def calibrate_cli(args) -> int:
    hw = calibrate(args.max_ranks)
    path = os.path.expanduser(args.profile)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hw.to_json(), f, indent=1)
    print(calibration_table(hw))
    print(collective_fit_table(hw.measured))
    print(f"wrote {path} (use --hardware local)", file=sys.stderr)
    return 0
