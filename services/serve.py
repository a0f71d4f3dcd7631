"""``cleave serve`` in the foreground: the local stack, its ready lines, the planner, supervision.

Called by ``services.cli`` (``cleave serve`` / ``make run``). :func:`run_stack` starts a
:class:`services.launcher.LocalStack` (Redis, workers, router as processes), prints where it
listens and where its metrics are, starts a :class:`services.scaling_local.PlannerThread` when
``cfg.planner`` is set, supervises the stack every 0.2 s (``LocalStack.supervise``) and, on
SIGINT/SIGTERM or a fatal death, stops the planner and then every process. It sits above both
the launcher and the local scaling backend, which builds on the launcher, so neither imports
the other back.

Exit codes: 0 after a signal, 1 when the stack could not start or died (the reason is printed
or logged), 130 when interrupted while starting.
"""
from __future__ import annotations

import logging
import signal
import sys
import time

from common.registry import mask_url
from services.launcher import LocalStack, StackConfig
from services.scaling_local import PlannerThread

log = logging.getLogger(__name__)


def run_stack(cfg: StackConfig) -> int:
    """Foreground ``cleave serve``: start, print the ready line, supervise, stop on a signal."""
    stack = LocalStack(cfg)
    stopping = False
    started = False
    planner = None

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        if not started:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        address = stack.start()
        started = True
        print(f"Cleave ready: router listening on {address} (gRPC) and http://{cfg.host}:{stack.http_port}/v1 "
              f"(OpenAI API; /metrics) (model {cfg.model or 'SmolLM2-135M-Instruct'}, "
              f"redis {mask_url(stack.redis_url)}, {stack.ready_summary()}); "
              f"Ctrl-C stops", flush=True)
        workers = ", ".join(f"{name} :{port}" for name, port in sorted(stack.metrics_ports.items()))
        print(f"Cleave metrics: http://{cfg.host}:{stack.http_port}/metrics (router); workers' /metrics on "
              f"{workers}", flush=True)
        print(f"Cleave cores: {describe_cores(stack.cores)}", flush=True)
        if cfg.planner is not None:
            planner = PlannerThread(stack, cfg.planner).start()
            print(f"Cleave planner: scaling prefill within [{cfg.planner.prefill_min}, "
                  f"{cfg.planner.prefill_max}] and decode within [{cfg.planner.decode_min}, "
                  f"{cfg.planner.decode_max}] instances", flush=True)
        while not stopping:
            fatal = stack.supervise()
            if fatal:
                log.error("%s; stopping the stack", fatal)
                return 1
            time.sleep(0.2)
        return 0
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        if not stopping:
            print(f"cleave serve: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        if planner is not None:
            planner.stop()
        stack.stop()


def describe_cores(plan: dict) -> str:
    """The core split of the ready line, e.g. ``prefill-0 0, decode-0 1, router shared``."""
    from engine.runtime.cores import format_cpus
    if not plan:
        return "not pinned (--no-pin-cores)"
    parts = [f"{name} {format_cpus(cores)}" for name, cores in plan.items() if name != "router"]
    router = format_cpus(plan["router"]) if "router" in plan else "shared (no spare core)"
    return ", ".join(parts) + f", router and Redis {router}; one torch thread per core"
