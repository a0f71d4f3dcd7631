"""``cleave plan``: flags -> :class:`~services.capacity.search.PlanRequest` -> tables, JSON, Helm values.

    cleave plan --model NAME_OR_DIR --hardware NAME --gpus N [--gpus-per-node N]
                --prompt TOKENS --output TOKENS (--batch B | --rate R) [--ttft SECONDS]
                [--tpot SECONDS] [--weight-dtype bf16|fp8|int8|int4] [--kv-dtype ...]
                [--format table|json] [--helm-values FILE] [--prefill-chunk-tokens 256] [--no-aggregated]
    cleave plan sweep --model M (--hardware NAME | --hardware-file FILE.yaml) --vary tp|pp|link-bw|batch|prompt
                [--values 1,2,4,8] [--tp N --pp N --ep N] [--batch B] [--threshold 0.5] ...
    cleave plan --calibrate [--profile FILE]        # measure this machine -> --hardware local

``--link-bw GB/s`` replaces the profile's per-link bandwidth; ``--hardware-file`` reads a custom
profile (``services.capacity.hardware_file``).

``services/cli.py`` registers the subcommand with :func:`add_plan_flags` and runs :func:`plan_cli`.
"""
from __future__ import annotations

import argparse
import sys

from common.model import DTYPE_BYTES
from services.capacity.hardware import DEFAULT_PROFILE

DTYPES = sorted(DTYPE_BYTES)


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["sweep"], default=None,
                   help="sweep: vary one dimension (--vary) and show where returns diminish")
    p.add_argument("--model", default="", help="built-in model (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b, "
                   "mixtral-8x7b, qwen3-30b-a3b, qwen3-235b-a22b, smollm2-135m) or a directory with a config.json")
    p.add_argument("--hardware", default="", help="h100, h200, b200, a100, mi300x, mi325x, mi355x, or local "
                   "(the profile written by --calibrate)")
    p.add_argument("--gpus", type=int, default=0, help="GPU budget: the most GPUs all instances may use")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0 = the profile's; "
                   "groups larger than this use the NIC)")
    p.add_argument("--prompt", type=int, default=0, help="prompt length, tokens")
    p.add_argument("--output", type=int, default=0, help="output length, tokens")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--batch", type=int, default=0, help="plan single instances at this batch "
                      "(prompts per prefill pass, sequences per decode step)")
    load.add_argument("--rate", type=float, default=0.0, help="plan instance counts for this request rate (req/s)")
    p.add_argument("--ttft", type=float, default=None, help="TTFT target, seconds")
    p.add_argument("--tpot", type=float, default=None, help="TPOT target, seconds")
    p.add_argument("--weight-dtype", default="bf16", choices=DTYPES, help="weight precision")
    p.add_argument("--kv-dtype", default="", choices=[""] + DTYPES, help="KV cache precision (default: the weights')")
    p.add_argument("--format", default="table", choices=["table", "json"], help="output format")
    p.add_argument("--helm-values", default="", metavar="FILE", help="write Helm chart values deploying the recommendation")
    p.add_argument("--top", type=int, default=12, help="table rows per pool")
    p.add_argument("--prefill-chunk-tokens", type=int, default=256, help="aggregated serving: prompt tokens a "
                   "decode instance prefills per step (the workers' --prefill-chunk-tokens)")
    p.add_argument("--no-aggregated", dest="compare_aggregated", action="store_false", help="leave out the "
                   "aggregated-vs-disaggregated comparison")
    p.add_argument("--micro-batches", type=int, default=0, help="PP micro-batches (0 = min(pp, batch))")
    p.add_argument("--expert-imbalance", type=float, default=0.0, help="busiest EP rank's expert load over "
                   "the mean (0 = from --redis-url expert counts, else 1.2)")
    p.add_argument("--reserve", type=float, default=0.1, help="share of device memory kept free")
    p.add_argument("--redis-url", default="", help="read expert statistics from this deployment's Redis; "
                   "with --publish, store the recommendation there for GetModelInfo")
    p.add_argument("--key-prefix", default="cleave:", help="Redis key prefix")
    p.add_argument("--publish", action="store_true", help="store the recommendation in --redis-url")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="calibrated profile file (hardware local)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine (matmul, memory, gloo "
                   "collectives for 2-4 ranks) and write --profile")
    p.add_argument("--max-ranks", type=int, default=4, help="--calibrate: largest rank count measured")
    p.add_argument("--hardware-file", default="", metavar="FILE.yaml", help="a custom hardware profile "
                   "(keys with units; 'base: mi300x' starts from a built-in one) instead of --hardware")
    p.add_argument("--link-bw", type=float, default=0.0, metavar="GB/S", help="replace the profile's "
                   "intra-node bandwidth per link and direction, GB/s")
    s = p.add_argument_group("sweep")
    s.add_argument("--vary", default="", help="sweep: tp, pp, link-bw (GB/s per link), batch or prompt")
    s.add_argument("--values", default="", help="sweep: comma-separated increasing values (default per dimension)")
    s.add_argument("--threshold", type=float, default=0.5, help="sweep: returns diminish when the elasticity "
                   "of a benefit to the varied value falls below this (0.5: doubling buys < 1.41x)")
    for dim in ("tp", "pp", "ep"):
        s.add_argument(f"--{dim}", type=int, default=1, help=f"sweep: the base layout's {dim.upper()}")


def _need(args, *names) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (see cleave plan --help)")


def build_hardware(args):
    """The profile named by --hardware or read from --hardware-file, with --gpus-per-node and
    --link-bw applied (validated again)."""
    from services.capacity.hardware import GB, get_hardware, with_overrides
    if args.link_bw < 0:
        raise ValueError(f"--link-bw must be positive GB/s, got {args.link_bw:g}")
    if args.hardware_file:
        if args.hardware:
            raise ValueError(f"give --hardware ({args.hardware}) or --hardware-file ({args.hardware_file}), not both")
        from services.capacity.hardware_file import load_hardware_file
        return with_overrides(load_hardware_file(args.hardware_file), args.gpus_per_node, args.link_bw * GB)
    _need(args, "hardware")
    return get_hardware(args.hardware, args.profile, args.gpus_per_node, args.link_bw * GB)


def _options(args, model, hw):
    from services.capacity.cost import CostOptions
    imbalance = args.expert_imbalance
    if not imbalance and model.is_moe and args.redis_url:
        from services.capacity.published import read_expert_imbalance
        imbalance = read_expert_imbalance(args.redis_url, args.key_prefix, model.name)
    return CostOptions(weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype or args.weight_dtype,
                       micro_batches=args.micro_batches, expert_imbalance=imbalance or 1.2, reserve=args.reserve,
                       ep_exchange="all_reduce" if hw.measured else "all_to_all")


def build_request(args):
    """A validated PlanRequest from the flags; ValueError naming what is missing or wrong."""
    from services.capacity.models import get_model
    from services.capacity.search import PlanRequest
    _need(args, "model", "gpus", "prompt", "output")
    if not (args.batch or args.rate):
        raise ValueError("give --batch B or --rate R")
    model = get_model(args.model)
    hw = build_hardware(args)
    return PlanRequest(model=model, hardware=hw, gpus=args.gpus, prompt=args.prompt, output=args.output,
                       batch=args.batch, rate=args.rate, ttft_s=args.ttft, tpot_s=args.tpot,
                       options=_options(args, model, hw), prefill_chunk_tokens=args.prefill_chunk_tokens,
                       compare_aggregated=args.compare_aggregated)


def build_sweep(args):
    """A validated SweepRequest from the flags (``cleave plan sweep``)."""
    from services.capacity.cost import Layout
    from services.capacity.models import get_model
    from services.capacity.sweep import SweepRequest, default_values
    _need(args, "model", "prompt", "output", "vary")
    if args.rate:
        raise ValueError(f"a sweep runs at a batch (--batch, or the largest that fits), not --rate {args.rate:g}")
    model = get_model(args.model)
    hw = build_hardware(args)
    try:
        values = tuple(float(v) for v in args.values.split(",")) if args.values else None
    except ValueError:
        raise ValueError(f"--values must be comma-separated numbers, got {args.values!r}") from None
    if values is None and args.vary in ("tp", "pp", "link-bw", "batch", "prompt"):
        values = default_values(args.vary, hw)
    return SweepRequest(model=model, hardware=hw, vary=args.vary, values=values or (), prompt=args.prompt,
                        output=args.output, base=Layout(tp=args.tp, pp=args.pp, ep=args.ep), batch=args.batch,
                        ttft_s=args.ttft, tpot_s=args.tpot, threshold=args.threshold,
                        options=_options(args, model, hw))


def plan_cli(args) -> int:
    if args.calibrate:
        from services.capacity.calibrate import calibrate_cli
        return calibrate_cli(args)
    from services.capacity import report
    if args.action == "sweep":
        from services.capacity.sweep import format_sweep, sweep
        result = sweep(build_sweep(args))
        print(report.format_json(result) if args.format == "json" else format_sweep(result))
        return 0
    from services.capacity.search import plan
    result = plan(build_request(args))
    print(report.format_json(result) if args.format == "json" else report.format_table(result, args.top))
    if args.helm_values:
        report.write_helm_values(result, args.helm_values)
        print(f"wrote {args.helm_values}", file=sys.stderr)
    if args.publish:
        _need(args, "redis_url")
        from services.capacity.published import publish
        from common.registry import mask_url
        publish(args.redis_url, args.key_prefix, result)
        print(f"published the recommendation to {mask_url(args.redis_url)}", file=sys.stderr)
    return 0
