"""The ``cleave`` command: serve the local stack, run one service, or talk to a router.

    cleave serve [--port 50051] [--model M] [--redis-url URL]      # the local stack (make run)
    cleave worker prefill|decode --redis-url URL [--model M]        # one instance (its rank 0)
    cleave rank prefill|decode --master-addr A --master-port P ...  # its ranks on another host
    cleave router --redis-url URL [--port 50051] [--model M]        # the front door
    cleave planner --redis-url URL --prefill-workload deployment/P --decode-workload deployment/D
                                                                    # scale pools on Kubernetes
    cleave generate "prompt" [--chat] [--max-tokens 64] ...         # stream a completion
    cleave info                                                     # model and pools
    cleave rebalance --redis-url URL [--dry-run]                    # rebalance MoE experts now
    cleave plan --model llama-3.1-70b --hardware h100 --gpus 16 --prompt 2048 --output 256 --rate 10
                                                                    # choose each pool's layout
    cleave bench --goodput ttft:500,tpot:50 [--concurrency 1,4]     # load-test a running stack

The serving commands' flags are declared on their config dataclasses (``common.flags.option``:
``StackConfig``, ``services.config.WorkerConfig`` with its ``RuntimeConfig``, ``RouterConfig``)
and turned back into them here; validation errors are printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from common.environment import Environment


def _add_config_json(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--config-json", default="", help=f"the whole {name} as JSON, as `cleave serve` starts "
                   "this process; no other flag may be given with it")


def _add_planner_flags(p: argparse.ArgumentParser) -> None:
    """The planner's targets and bounds (``services.planner.PlannerConfig``), for serve and planner."""
    from services.planner import PlannerConfig
    d = PlannerConfig()
    for pool in ("prefill", "decode"):
        p.add_argument(f"--{pool}-min", type=int, default=getattr(d, f"{pool}_min"),
                       help=f"fewest {pool} instances the planner keeps")
        p.add_argument(f"--{pool}-max", type=int, default=getattr(d, f"{pool}_max"),
                       help=f"most {pool} instances the planner starts")
    p.add_argument("--interval", type=float, default=d.interval_s, help="seconds between decisions")
    p.add_argument("--window", type=float, default=d.window_s, help="seconds of TTFT/TPOT samples considered")
    p.add_argument("--ttft-target", type=float, default=d.ttft_target_s, help="prefill: p90 TTFT target (s)")
    p.add_argument("--queue-target-tokens", type=int, default=d.queue_target_tokens,
                   help="prefill: queued prompt tokens per instance before growing")
    p.add_argument("--tpot-target", type=float, default=d.tpot_target_s, help="decode: p90 TPOT target (s)")
    p.add_argument("--kv-high", type=float, default=d.kv_high, help="decode: grow above this KV utilisation")
    p.add_argument("--kv-low", type=float, default=d.kv_low, help="decode: shrink when the rest stays below this")
    p.add_argument("--cooldown-up", type=float, default=d.cooldown_up_s, help="seconds between growth steps")
    p.add_argument("--cooldown-down", type=float, default=d.cooldown_down_s,
                   help="seconds a pool must stay idle before it shrinks")


def _planner_config(args):
    from services.planner import PlannerConfig
    return PlannerConfig(interval_s=args.interval, window_s=args.window, prefill_min=args.prefill_min,
                         prefill_max=args.prefill_max, decode_min=args.decode_min, decode_max=args.decode_max,
                         ttft_target_s=args.ttft_target, queue_target_tokens=args.queue_target_tokens,
                         tpot_target_s=args.tpot_target, kv_high=args.kv_high, kv_low=args.kv_low,
                         cooldown_up_s=args.cooldown_up, cooldown_down_s=args.cooldown_down)


def _parser() -> argparse.ArgumentParser:
    from common.config import POOLS, RouterConfig
    from common.flags import add_arguments
    from common.layout import ParallelConfig
    from engine.runtime.config import RuntimeConfig
    from services.config import WorkerConfig
    from services.launcher import SERVE_DECODE_FIELDS, SERVE_WORKER_FIELDS, StackConfig
    env = Environment.read()
    parser = argparse.ArgumentParser(prog="cleave", description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default=env.log_level, help="DEBUG, INFO, WARNING or ERROR "
                        "(env CLEAVE_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the local stack (Redis, router, prefill, decode)")
    add_arguments(StackConfig, serve, defaults={"http_port": 8000})
    add_arguments(RuntimeConfig, serve, only=SERVE_WORKER_FIELDS)         # for every worker
    serve.add_argument("--planner", action="store_true",
                       help="also run the planner: it starts and drains instances of each pool")
    _add_planner_flags(serve)
    add_arguments(WorkerConfig, serve, only=SERVE_DECODE_FIELDS)          # for every decode instance
    for pool, axes in SERVE_LAYOUTS.items():
        add_arguments(ParallelConfig, serve, only=axes, prefix=f"{pool}-",
                      help=f"{{NAME}} degree of each {pool} instance")

    for name, text in (("worker", "run one prefill or decode instance"),
                       ("rank", "run ranks of an instance whose rank 0 (cleave worker) is elsewhere: they "
                                "join its rendezvous (multi-host instances)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("pool", choices=POOLS, help="the instance's pool")
        add_arguments(WorkerConfig, cmd)
        if name == "worker":
            _add_config_json(cmd, "WorkerConfig")

    router = sub.add_parser("router", help="run the public router")
    add_arguments(RouterConfig, router, defaults={"redis_url": ""})      # no default Redis: name it
    _add_config_json(router, "RouterConfig")

    planner = sub.add_parser("planner", help="scale the pools of a Kubernetes deployment")
    planner.add_argument("--backend", default="kubernetes", choices=["kubernetes", "local"],
                         help="what starts and stops instances (local: use `cleave serve --planner`)")
    planner.add_argument("--redis-url", required=True, help="the deployment's Redis")
    planner.add_argument("--key-prefix", default="cleave:", help="prefix of the deployment's Redis keys")
    planner.add_argument("--namespace", default="", help="'' = the pod's own namespace")
    planner.add_argument("--prefill-workload", default="", help="e.g. deployment/cleave-prefill")
    planner.add_argument("--decode-workload", default="", help="e.g. deployment/cleave-decode")
    planner.add_argument("--kubeconfig", default="", help="'' = in-cluster config, else ~/.kube/config")
    planner.add_argument("--context", default="", help="kubeconfig context")
    _add_planner_flags(planner)

    gen = sub.add_parser("generate", help="stream a completion from a router")
    gen.add_argument("prompt", help="the prompt (with --chat: the user message)")
    gen.add_argument("--address", default=env.address, help="router address (env CLEAVE_ADDRESS)")
    gen.add_argument("--chat", action="store_true", help="send as a chat message (chat template)")
    gen.add_argument("--system", default="", help="system message (implies --chat)")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 = off)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    gen.add_argument("--show-usage", action="store_true", help="print token counts and finish reason")

    bench = sub.add_parser("bench", help="load-test a running Cleave (gRPC or OpenAI API): TTFT, TPOT, ITL, goodput")
    from services.loadgen.cli import add_arguments as add_bench_arguments
    add_bench_arguments(bench, env.address)

    plan = sub.add_parser("plan", help="choose each pool's layout and instance count (capacity planner)")
    from services.capacity.cli import add_plan_flags
    add_plan_flags(plan)

    rebalance = sub.add_parser("rebalance", help="recompute the MoE expert placement from the statistics "
                                                  "in Redis and publish it to the decode instances")
    rebalance.add_argument("--redis-url", required=True, help="the pool's Redis")
    rebalance.add_argument("--key-prefix", default="cleave:", help="Redis key prefix of the deployment")
    rebalance.add_argument("--model-id", default="",
                           help="model whose placement to change ('' = the only one recorded)")
    rebalance.add_argument("--window", type=float, default=None,
                           help="seconds of statistics to balance over (default: the recorded window)")
    rebalance.add_argument("--threshold", type=float, default=0.0,
                           help="publish only when the mean hotspot ratio drops by more than this fraction")
    rebalance.add_argument("--dry-run", action="store_true", help="print the prediction, publish nothing")

    info = sub.add_parser("info", help="show the served model and pools")
    info.add_argument("--address", default=env.address, help="router address (env CLEAVE_ADDRESS)")
    return parser


def _config_json_alone(args) -> None:
    """Refuse flags given beside --config-json (it carries the whole config)."""
    defaults = vars(_parser().parse_args([args.command, *([args.pool] if "pool" in args else [])]))
    extra = sorted(k for k, v in vars(args).items() if k not in ("config_json", "log_level") and defaults.get(k) != v)
    if extra:
        raise ValueError("--config-json carries the whole config; drop "
                         + ", ".join("--" + k.replace("_", "-") for k in extra))


def _worker_config(args):
    """The ``WorkerConfig`` of ``cleave worker`` / ``cleave rank`` (the internal token from the environment)."""
    from common.flags import from_args, from_json
    from services.config import WorkerConfig
    token = Environment.read().internal_token
    if getattr(args, "config_json", ""):
        _config_json_alone(args)
        cfg = from_json(WorkerConfig, args.config_json, internal_token=token)
        if cfg.pool != args.pool:
            raise ValueError(f"--config-json is a {cfg.pool} config, the command says {args.pool}")
        return cfg
    if args.command == "worker":
        args.rank = -1        # a worker is rank 0, whatever RANK says
    return from_args(WorkerConfig, args, pool=args.pool, internal_token=token)


def _run_worker(args) -> int:
    from engine.runtime.device import resolve_device
    resolve_device(args.device)  # --device cuda without CUDA: a clear error before anything starts
    cfg = _worker_config(args)  # its layout is checked against the model by engine.runtime
    if cfg.pool == "decode":
        from services.decode import DecodeService as service, add_to_server
    else:
        from services.prefill import PrefillService as service, add_to_server
    from services.worker import serve_worker
    asyncio.run(serve_worker(cfg, service, add_to_server))
    return 0


def _run_rank(args) -> int:
    from engine.runtime.device import resolve_device
    from services.rank import run_rank
    resolve_device(args.device)  # --device cuda without CUDA: a clear error before anything else
    return run_rank(_worker_config(args).runtime)


def _run_router(args) -> int:
    from common.config import RouterConfig
    from common.flags import from_args, from_json
    from router.server import serve_router
    from services.router_views import MODEL_INFO_VIEWS
    token = Environment.read().internal_token
    if args.config_json:
        _config_json_alone(args)
        cfg = from_json(RouterConfig, args.config_json, internal_token=token)
    else:
        cfg = from_args(RouterConfig, args, internal_token=token)
    asyncio.run(serve_router(cfg, views=MODEL_INFO_VIEWS))
    return 0


def _run_planner(args) -> int:
    """A standalone planner; the local backend lives inside `cleave serve --planner` instead."""
    if args.backend == "local":
        raise ValueError("the local backend scales the processes of `cleave serve`: run "
                         "`cleave serve --planner` (or `make run ARGS=--planner`)")
    from services.planner import Planner
    from services.scaling import backend_class
    backend_cls = backend_class(args.backend)  # a clear error if its client is not installed
    from services.scaling_k8s import KubernetesConfig
    k8s = KubernetesConfig(namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context,
                           workloads={"prefill": args.prefill_workload, "decode": args.decode_workload})
    backend = backend_cls(k8s)
    planner = Planner(_planner_config(args), backend, args.redis_url, args.key_prefix)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logging.getLogger(__name__).info("planner scaling %s in namespace %s", dict(k8s.workloads),
                                         backend.namespace)
        await planner.run(stop)

    asyncio.run(run())
    return 0


SERVE_LAYOUTS = {"prefill": ("tp", "cp"), "decode": ("tp", "pp", "ep")}   # cleave serve --prefill-tp ...


def pool_layouts(args):
    """The prefill and decode ParallelConfigs of ``cleave serve``'s flags (validated)."""
    from common.flags import values
    from common.layout import ParallelConfig
    return tuple(ParallelConfig(**values(ParallelConfig, args, only=axes, prefix=f"{pool}-",
                                         help="{NAME} degree"))
                 for pool, axes in SERVE_LAYOUTS.items())


def check_layouts(model_spec: str, layouts) -> None:
    """Raise ValueError quoting the values when a layout cannot split the model."""
    from engine.source import load_model_config, resolve_model
    model = load_model_config(resolve_model(model_spec))
    for name, layout in layouts:
        try:
            layout.validate_for(model, model.num_experts)
        except ValueError as exc:
            raise ValueError(f"{name} layout: {exc}") from None


def _run_serve(args) -> int:
    from common.flags import from_args, values
    from engine.runtime.config import RuntimeConfig
    from services.config import WorkerConfig
    from services.launcher import SERVE_DECODE_FIELDS, SERVE_WORKER_FIELDS, StackConfig, workers
    from services.serve import run_stack
    prefill, decode = pool_layouts(args)
    check_layouts(args.model, [("prefill", prefill), ("decode", decode)])
    both = values(RuntimeConfig, args, only=SERVE_WORKER_FIELDS)
    templates = workers(prefill={"parallel": prefill},
                        decode={"parallel": decode, **values(WorkerConfig, args, only=SERVE_DECODE_FIELDS)}, **both)
    cfg = from_args(StackConfig, args, **templates, log_level=args.log_level,
                    planner=_planner_config(args) if args.planner else None)
    return run_stack(cfg)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # as PID 1 in a container, SIGTERM is ignored unless handled: stop cleanly even while a
    # model is still loading (services install their own draining handlers once they serve)
    signal.signal(signal.SIGTERM, _terminate)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        if args.command == "generate":
            from services.client import generate_cli
            return generate_cli(args)
        if args.command == "plan":
            from services.capacity.cli import plan_cli
            return plan_cli(args)
        if args.command == "info":
            from services.client import info_cli
            return info_cli(args)
        if args.command == "rebalance":
            from services.experts.balance import rebalance_cli
            return rebalance_cli(args)
        if args.command == "bench":
            from services.loadgen.cli import run as run_bench
            return run_bench(args, Environment.read().address)
        return {"serve": _run_serve, "worker": _run_worker, "rank": _run_rank, "router": _run_router,
                "planner": _run_planner}[args.command](args)
    except ValueError as exc:   # flags, and a --device this machine does not have
        print(f"cleave {args.command}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from engine.runtime.rendezvous import RendezvousTimeout   # loaded already if one was raised
        if not isinstance(exc, RendezvousTimeout):
            raise
        print(f"cleave {args.command}: {exc}", file=sys.stderr)   # names the ranks that never came
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
