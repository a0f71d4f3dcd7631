"""``cleave plan``: flags -> :class:`~services.capacity.search.PlanRequest` -> tables, JSON, Helm values.

    cleave plan --model NAME_OR_DIR --hardware NAME --gpus N [--gpus-per-node N]
                --prompt TOKENS --output TOKENS (--batch B | --rate R) [--ttft SECONDS]
                [--tpot SECONDS] [--weight-dtype bf16|fp8|int8|int4] [--kv-dtype ...]
                [--format table|json] [--helm-values FILE]
    cleave plan --calibrate [--profile FILE]        # measure this machine -> --hardware local

``services/cli.py`` registers the subcommand with :func:`add_plan_flags` and runs :func:`plan_cli`.
"""
from __future__ import annotations

import argparse
import sys

from services.capacity.hardware import DEFAULT_PROFILE
from services.capacity.models import DTYPE_BYTES

DTYPES = sorted(DTYPE_BYTES)


def add_plan_flags(p: argparse.ArgumentParser) -> None:
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


def _need(args, *names) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (see cleave plan --help)")


def build_request(args):
    """A validated PlanRequest from the flags; ValueError naming what is missing or wrong."""
    from services.capacity.cost import CostOptions
    from services.capacity.hardware import get_hardware
    from services.capacity.models import get_model
    from services.capacity.search import PlanRequest
    _need(args, "model", "hardware", "gpus", "prompt", "output")
    if not (args.batch or args.rate):
        raise ValueError("give --batch B or --rate R")
    model = get_model(args.model)
    hw = get_hardware(args.hardware, args.profile, args.gpus_per_node)
    imbalance = args.expert_imbalance
    if not imbalance and model.is_moe and args.redis_url:
        from services.capacity.published import read_expert_imbalance
        imbalance = read_expert_imbalance(args.redis_url, args.key_prefix, model.name)
    opts = CostOptions(weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype or args.weight_dtype,
                       micro_batches=args.micro_batches, expert_imbalance=imbalance or 1.2, reserve=args.reserve,
                       ep_exchange="all_reduce" if hw.measured else "all_to_all")
    return PlanRequest(model=model, hardware=hw, gpus=args.gpus, prompt=args.prompt, output=args.output,
                       batch=args.batch, rate=args.rate, ttft_s=args.ttft, tpot_s=args.tpot, options=opts)


def plan_cli(args) -> int:
    if args.calibrate:
        from services.capacity.calibrate import calibrate_cli
        return calibrate_cli(args)
    from services.capacity import report
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
