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

Flags become config dataclasses here (and only here); their validation errors are printed
as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from common.environment import Environment


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="model: empty for the embedded SmolLM2-135M-Instruct, "
                   "a .gguf file or a Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind and advertise")


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = a free port)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus /metrics on this port (0 = do not serve them)")
    p.add_argument("--redis-url", default="", help="Redis to register in")
    p.add_argument("--key-prefix", default="cleave:")
    p.add_argument("--worker-id", default="")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache size of the instance")
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks (overrides --kv-cache-mb)")
    p.add_argument("--transport", default="ucx", choices=["ucx", "tcp", "fake"], help="KV transport")
    p.add_argument("--no-checksum", action="store_true", help="skip the CRC32 of KV messages")
    p.add_argument("--max-batch", type=int, default=64, help="decode: running sequences per step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM, seconds to let running requests finish before exiting")
    p.add_argument("--max-reservation", type=float, default=900.0,
                   help="decode: seconds a KV reservation may live at most, whatever deadline the caller asks")
    p.add_argument("--max-reservations-per-caller", type=int, default=512,
                   help="decode: reservations not yet decoding that one calling host may hold")
    for axis in ("tp", "pp", "cp", "ep"):
        p.add_argument(f"--{axis}", type=int, default=1, help=f"{axis.upper()} degree of the instance")
    _add_expert_flags(p)
    from services.rank import add_runtime_flags
    add_runtime_flags(p)


def _add_expert_flags(p: argparse.ArgumentParser) -> None:
    """MoE decode: expert load balancing (``services.expert_balance``)."""
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="MoE decode: extra expert slots over the EP group for copies of hot experts "
                        "(ep must divide num_experts + this)")
    p.add_argument("--expert-stats-interval", type=int, default=10,
                   help="MoE decode: seconds per windowed expert-statistics bucket in Redis")
    p.add_argument("--expert-window", type=float, default=300.0,
                   help="MoE decode: seconds of expert statistics the load view and rebalancer use")
    p.add_argument("--rebalance-interval", type=float, default=0.0,
                   help="MoE decode: seconds between automatic rebalancing checks (0 = only `cleave rebalance`)")
    p.add_argument("--rebalance-threshold", type=float, default=0.1,
                   help="MoE decode: rebalance when the predicted hotspot ratio drops by more than this fraction")


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
    env = Environment.read()
    parser = argparse.ArgumentParser(prog="cleave", description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default=env.log_level)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the local stack (Redis, router, prefill, decode)")
    _add_model(serve)
    serve.add_argument("--port", type=int, default=50051, help="router port")
    serve.add_argument("--http-port", type=int, default=8000,
                       help="router's OpenAI-compatible HTTP API and /metrics (0 = a free port)")
    serve.add_argument("--redis-url", default="", help="use this Redis instead of a private one")
    serve.add_argument("--prefill-instances", type=int, default=1)
    serve.add_argument("--decode-instances", type=int, default=1)
    serve.add_argument("--transport", default="ucx", choices=["ucx", "tcp", "fake"])
    serve.add_argument("--kv-cache-mb", type=int, default=1024)
    serve.add_argument("--threads", type=int, default=0,
                       help="torch threads per worker rank (0 = one per core it is given)")
    serve.add_argument("--cpus", default="", help="cores the stack may use, e.g. 0-7 (default: all this "
                       "process may use); split between the workers in proportion to their ranks, with a "
                       "spare core for the router when there is one")
    serve.add_argument("--weights-dtype", default="fp32", choices=["fp32", "bf16", "int8", "int4"],
                       help="how every worker holds its weights: fp32 (exact, the default), bf16, or int8/int4 "
                            "weight-only quantized (measured, not exact: see make bench)")
    serve.add_argument("--pin-cores", action=argparse.BooleanOptionalAction, default=True,
                       help="give each worker its own cores (--no-pin-cores: let them share every core)")
    serve.add_argument("--ready-timeout", type=float, default=300.0)
    serve.add_argument("--planner", action="store_true",
                       help="also run the planner: it starts and drains instances of each pool")
    _add_planner_flags(serve)
    _add_expert_flags(serve)                  # passed to every decode instance
    for pool, axes in (("prefill", ("tp", "cp")), ("decode", ("tp", "pp", "ep"))):
        for axis in axes:
            serve.add_argument(f"--{pool}-{axis}", type=int, default=1,
                               help=f"{axis.upper()} degree of each {pool} instance")

    worker = sub.add_parser("worker", help="run one prefill or decode instance")
    worker.add_argument("pool", choices=["prefill", "decode"])
    _add_model(worker)
    _add_worker_flags(worker)

    rank = sub.add_parser("rank", help="run ranks of an instance whose rank 0 (cleave worker) is "
                                       "elsewhere: they join its rendezvous (multi-host instances)")
    rank.add_argument("pool", choices=["prefill", "decode"])
    _add_model(rank)
    _add_worker_flags(rank)

    router = sub.add_parser("router", help="run the public router")
    _add_model(router)
    router.add_argument("--port", type=int, default=50051, help="public gRPC port")
    router.add_argument("--http-port", type=int, default=8000,
                        help="OpenAI-compatible HTTP API and Prometheus /metrics (0 = a free port)")
    router.add_argument("--redis-url", required=True)
    router.add_argument("--key-prefix", default="cleave:")
    router.add_argument("--transfer-timeout", type=float, default=30.0)
    router.add_argument("--request-timeout", type=float, default=0.0,
                        help="seconds: a deadline on every request (0 = none: only the client's own "
                             "deadline, its leaving or max_tokens ends a request)")
    router.add_argument("--admission-wait", type=float, default=10.0,
                        help="seconds a request waits for KV room before RESOURCE_EXHAUSTED")
    router.add_argument("--pool-wait", type=float, default=60.0,
                        help="seconds a request waits for a worker while its pool has none registered "
                             "and reachable (a restart) before UNAVAILABLE")
    router.add_argument("--worker-grace", type=float, default=30.0,
                        help="seconds a worker may be absent from the registry (nothing in flight) "
                             "before its channel is closed; a shorter gap only pauses new requests to it")
    router.add_argument("--max-queued", type=int, default=256)

    planner = sub.add_parser("planner", help="scale the pools of a Kubernetes deployment")
    planner.add_argument("--backend", default="kubernetes", choices=["kubernetes", "local"])
    planner.add_argument("--redis-url", required=True)
    planner.add_argument("--key-prefix", default="cleave:")
    planner.add_argument("--namespace", default="", help="'' = the pod's own namespace")
    planner.add_argument("--prefill-workload", default="", help="e.g. deployment/cleave-prefill")
    planner.add_argument("--decode-workload", default="", help="e.g. deployment/cleave-decode")
    planner.add_argument("--kubeconfig", default="", help="'' = in-cluster config, else ~/.kube/config")
    planner.add_argument("--context", default="", help="kubeconfig context")
    _add_planner_flags(planner)

    gen = sub.add_parser("generate", help="stream a completion from a router")
    gen.add_argument("prompt", help="the prompt (with --chat: the user message)")
    gen.add_argument("--address", default=env.address)
    gen.add_argument("--chat", action="store_true", help="send as a chat message (chat template)")
    gen.add_argument("--system", default="", help="system message (implies --chat)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
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
    info.add_argument("--address", default=env.address)
    return parser


def _worker_config(args):
    from common.config import WorkerConfig
    from common.layout import ParallelConfig
    from engine.runtime.cores import parse_cpus
    from services.rank import rendezvous_from
    return WorkerConfig(pool=args.pool, model=args.model, host=args.host, port=args.port,
                        redis_url=args.redis_url, key_prefix=args.key_prefix, worker_id=args.worker_id,
                        block_size=args.block_size, num_blocks=args.num_blocks,
                        kv_cache_bytes=args.kv_cache_mb << 20, transport=args.transport,
                        checksum=not args.no_checksum, max_batch=args.max_batch, threads=args.threads,
                        drain_timeout_s=args.drain_timeout,
                        max_reservation_s=args.max_reservation,
                        max_reservations_per_caller=args.max_reservations_per_caller, metrics_port=args.metrics_port,
                        parallel=ParallelConfig(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep),
                        redundant_experts=args.redundant_experts, expert_stats_interval_s=args.expert_stats_interval,
                        expert_window_s=args.expert_window, rebalance_interval_s=args.rebalance_interval,
                        rebalance_threshold=args.rebalance_threshold,
                        internal_token=Environment.read().internal_token,
                        device=args.device, dtype=args.dtype, weights_dtype=args.weights_dtype,
                        cuda_graphs=args.cuda_graphs,
                        cpus=parse_cpus(args.cpus),
                        rendezvous=rendezvous_from(args))


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
    from services.worker import runtime_config
    resolve_device(args.device)  # --device cuda without CUDA: a clear error before anything else
    return run_rank(runtime_config(_worker_config(args)))


def _run_router(args) -> int:
    from common.config import RouterConfig
    from router.server import serve_router
    from services.router_views import MODEL_INFO_VIEWS
    cfg = RouterConfig(model=args.model, host=args.host, port=args.port, http_port=args.http_port,
                       redis_url=args.redis_url,
                       key_prefix=args.key_prefix, transfer_timeout_s=args.transfer_timeout,
                       request_timeout_s=args.request_timeout, admission_wait_s=args.admission_wait,
                       pool_wait_s=args.pool_wait, worker_grace_s=args.worker_grace,
                       max_queued=args.max_queued, internal_token=Environment.read().internal_token)
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


def pool_layouts(args):
    """The prefill and decode ParallelConfigs of ``cleave serve``'s flags (validated)."""
    from common.layout import ParallelConfig
    prefill = ParallelConfig(tp=args.prefill_tp, cp=args.prefill_cp)
    decode = ParallelConfig(tp=args.decode_tp, pp=args.decode_pp, ep=args.decode_ep)
    return prefill, decode


def check_layouts(model_spec: str, layouts) -> None:
    """Raise ValueError quoting the values when a layout cannot split the model."""
    from engine.source import load_model_config, resolve_model
    model = load_model_config(resolve_model(model_spec))
    for name, layout in layouts:
        try:
            layout.validate_for(model, model.num_experts)
        except ValueError as exc:
            raise ValueError(f"{name} layout: {exc}") from None


def _layout_flags(layout) -> list[str]:
    return [f"--{a}={getattr(layout, a)}" for a in ("tp", "pp", "cp", "ep") if getattr(layout, a) != 1]


def _expert_flags(args) -> list[str]:
    """The decode instances' expert-balancing flags of ``cleave serve`` (see _add_expert_flags)."""
    return [f"--redundant-experts={args.redundant_experts}", f"--expert-stats-interval={args.expert_stats_interval}",
            f"--expert-window={args.expert_window}", f"--rebalance-interval={args.rebalance_interval}",
            f"--rebalance-threshold={args.rebalance_threshold}"]


def _run_serve(args) -> int:
    from engine.runtime.cores import parse_cpus
    from services.launcher import StackConfig
    from services.serve import run_stack
    prefill, decode = pool_layouts(args)
    check_layouts(args.model, [("prefill", prefill), ("decode", decode)])
    worker = ["--transport", args.transport, "--kv-cache-mb", str(args.kv_cache_mb), "--threads", str(args.threads),
              "--weights-dtype", args.weights_dtype]
    cfg = StackConfig(port=args.port, http_port=args.http_port, host=args.host, redis_url=args.redis_url,
                      model=args.model,
                      prefill_instances=args.prefill_instances, decode_instances=args.decode_instances,
                      worker_args=tuple(worker), prefill_args=tuple(_layout_flags(prefill)),
                      decode_args=tuple(_layout_flags(decode) + _expert_flags(args)), ready_timeout_s=args.ready_timeout,
                      log_level=args.log_level, planner=_planner_config(args) if args.planner else None,
                      cpus=parse_cpus(args.cpus), pin_cores=args.pin_cores)
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
            from services.expert_balance import rebalance_cli
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
        if type(exc).__name__ != "RendezvousTimeout":
            raise
        print(f"cleave {args.command}: {exc}", file=sys.stderr)   # names the ranks that never came
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
