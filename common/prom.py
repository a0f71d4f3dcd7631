"""Prometheus metrics of the router and the workers (``prometheus_client``), named ``cleave_*``.

Names follow what operators' dashboards and load tools already know (vLLM's set, with ``_`` for
its ``:``: Prometheus reserves ``:`` for recording rules, and ``promtool check metrics`` flags it):
histograms in seconds or tokens, counters ending in ``_total``. Each ``RouterMetrics`` and
``WorkerMetrics`` owns one :class:`Registry` (no module-global registry, so tests and several
cores in one process never share counters), which exports no ``_created`` series (see
:class:`Registry`).

Router (``RouterMetrics``, label ``model_name``; scraped at ``/metrics`` of its HTTP port):

| metric | type | what |
| --- | --- | --- |
| ``cleave_time_to_first_token_seconds`` | histogram | arrival at the router to the first token sent |
| ``cleave_inter_token_latency_seconds`` | histogram | gap between output tokens (a message of k tokens after a gap g counts k samples of g/k) |
| ``cleave_e2e_request_latency_seconds`` | histogram | arrival to the last token, finished requests |
| ``cleave_request_queue_time_seconds`` | histogram | arrival until a decode instance reserved KV room (admission wait) |
| ``cleave_request_prompt_tokens`` / ``cleave_request_generation_tokens`` | histogram | tokens per finished request |
| ``cleave_request_success_total{finish_reason}`` | counter | finished requests, ``stop`` or ``length`` |
| ``cleave_request_failures_total{reason}`` | counter | failed or cancelled requests by error kind (``invalid_request``, ``exhausted``, ``unavailable``, ``deadline_exceeded``, ``cancelled``, ...) |
| ``cleave_http_internal_errors_total`` | counter | HTTP requests answered 500 ``internal_error`` (an unexpected exception) |
| ``cleave_request_migrations_total`` | counter | attempts retried on another worker (attempts - 1 per request) |
| ``cleave_num_requests_running`` / ``cleave_num_requests_waiting`` | gauge | in flight / waiting for KV room, now |
| ``cleave_kv_index_mode{pool,mode}`` | gauge | 1 for the KV index's current mode of the pool (``exact``, ``resyncing``, ``approximate``), 0 for the others (``router.kv_index``) |
| ``cleave_kv_index_blocks{pool}`` | gauge | block hashes the KV index holds for the pool's instances |
| ``cleave_prefill_route_total{mode,reason}`` | counter | attempts prefilled through the pool or locally on the decode instance, and why |
| ``cleave_kv_prediction_error_tokens{pool}`` | histogram | delivered minus predicted cached prompt tokens per routed request |

Workers (``WorkerMetrics``, labels ``pool``, ``worker_id``, ``layout`` such as ``tp1-pp2-cp1-ep1``;
served on ``--metrics-port``):

| metric | type | what |
| --- | --- | --- |
| ``cleave_kv_cache_usage_perc`` | gauge | used share of the instance's KV blocks, 0..1 (1 = full) |
| ``cleave_kv_transfer_seconds`` | histogram | prefill: one KV push; decode: reservation to landed |
| ``cleave_kv_transfer_bytes_total`` | counter | KV bytes pushed (prefill) |
| ``cleave_kv_transfer_failures_total`` | counter | pushes (prefill) or landings (decode) that failed |
| ``cleave_prefill_queue_tokens`` | gauge | prompt tokens queued or running on a prefill instance |
| ``cleave_batch_size`` | gauge | sequences in the running decode batch |
| ``cleave_decode_step_seconds`` | histogram | decode: engine time of one step (forward over the running batch and sampling) |
| ``cleave_decode_step_tokens_total`` | counter | decode: tokens made by decode steps (the sum of their batch sizes) |
| ``cleave_decode_step_token_seconds_total`` | counter | decode: the sum over steps of step seconds x tokens made; / ``cleave_decode_step_tokens_total`` = the step as the mean stream sees it |
| ``cleave_expert_hotspot_ratio{layer}`` | gauge | MoE decode: the hottest EP rank's routed tokens / the mean over EP ranks (1 = balanced) |

No metric carries a request id (unbounded label values would grow the registry forever).
"""
from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

# bucket edges as vLLM publishes them, so the same dashboards and alerts apply
PREDICTION_BUCKETS = (-4096, -1024, -256, -64, -16, -1, 0, 16, 64, 256, 1024, 4096)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _without_created(metrics):
    """``metrics`` with each family's ``<name>_created`` samples left out (copies; the input is
    not changed)."""
    for metric in metrics:
        created = metric.name + "_created"
        if not any(s.name == created for s in metric.samples):
            yield metric
            continue
        kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        kept.samples = [s for s in metric.samples if s.name != created]
        yield kept


class Registry(CollectorRegistry):
    """A ``CollectorRegistry`` whose exposition has no ``_created`` series.

    ``prometheus_client`` gives every counter and histogram a ``<name>_created`` sample (its
    creation time). The classic text format, the one Prometheus scrapes by default, has no place
    for it, so it comes out as a gauge family of its own, which ``promtool check metrics`` flags
    and which adds a series per labelled child. The library's own switches are process-global:
    ``disable_created_metrics()`` flips a module variable for every registry in the process
    (an embedding application's too), and ``PROMETHEUS_DISABLE_CREATED_SERIES`` is read once,
    when ``prometheus_client.metrics`` is first imported, so setting it from here would depend on
    import order and leak into child processes. Leaving the samples out where this registry is
    collected touches nothing outside it and sets no state: ``collect()`` serves every exposition
    (the router's ``/metrics`` and the workers' HTTP server, text or OpenMetrics), and
    ``restricted_registry()`` a worker scrape that asks for ``name[]``.
    """

    def collect(self):
        yield from _without_created(super().collect())

    def restricted_registry(self, names):
        return _WithoutCreated(super().restricted_registry(names))


class _WithoutCreated:
    """A collector's metrics less their ``_created`` samples."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def collect(self):
        return _without_created(self._inner.collect())


class _Sampled:
    """A collector of gauges read at scrape time from callables (no stale values to keep)."""

    def __init__(self, labels: Callable[[], dict[str, str]]) -> None:
        self._labels = labels
        self._gauges: list[tuple[str, str, Callable[[], object]]] = []

    def add(self, name: str, doc: str, read: Callable[[], object]) -> None:
        """``read`` returns a number, or a dict ``{extra label value: number}`` keyed by the
        value of one more label named by ``name``'s ``{label}`` suffix (e.g. ``"x{layer}"``)."""
        self._gauges.append((name, doc, read))

    def collect(self):
        labels = self._labels()
        for spec, doc, read in self._gauges:
            name, _, extra = spec.partition("{")
            extra = extra.rstrip("}")
            family = GaugeMetricFamily(name, doc, labels=[*labels, *([extra] if extra else [])])
            value = read()
            if extra:
                for key, v in (value or {}).items():
                    family.add_metric([*labels.values(), str(key)], float(v))
            elif value is not None:
                family.add_metric(list(labels.values()), float(value))
            yield family


class _ModeGauge:
    """``cleave_kv_index_mode{model_name,pool,mode}``: 1 for each pool's current mode, 0 for the others."""

    def __init__(self, model_name: str, modes: Callable[[], dict[str, str]], all_modes: tuple[str, ...]) -> None:
        self._model, self._modes, self._all = model_name, modes, all_modes

    def collect(self):
        family = GaugeMetricFamily("cleave_kv_index_mode", "KV index mode per pool (1 = current)",
                                   labels=["model_name", "pool", "mode"])
        for pool, current in self._modes().items():
            for mode in self._all:
                family.add_metric([self._model, pool, mode], 1.0 if mode == current else 0.0)
        yield family


class RouterMetrics:
    """The router's request metrics (see the module docstring). One per ``RouterCore``."""

    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.registry = Registry()
        self._model = model_name
        lbl = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, lbl, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = hist("cleave_time_to_first_token_seconds", "Time to first token (s)", TTFT_BUCKETS)
        self.itl = hist("cleave_inter_token_latency_seconds", "Inter-token latency (s)", ITL_BUCKETS)
        self.e2e = hist("cleave_e2e_request_latency_seconds", "End-to-end request latency (s)", REQUEST_BUCKETS)
        self.queue = hist("cleave_request_queue_time_seconds", "Time waiting for KV room (s)", REQUEST_BUCKETS)
        self._routes = Counter("cleave_prefill_route", "Attempts by where their prompt was prefilled: mode pool "
                               "(a prefill instance, then a KV handoff) or local (the decode instance), and why",
                               lbl + ["mode", "reason"], registry=self.registry)
        self._routes_seen: set[tuple[str, str]] = set()
        self._miss = Histogram("cleave_kv_prediction_error_tokens", "Delivered minus predicted cached prompt tokens "
                               "of a routed request (0: the KV index was right; < 0: a routing miss, e.g. a stale "
                               "index or an eviction)", lbl + ["pool"], buckets=PREDICTION_BUCKETS,
                               registry=self.registry)
        self.prompt_tokens = hist("cleave_request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.generation_tokens = hist("cleave_request_generation_tokens", "Generated tokens per request",
                                      TOKEN_BUCKETS)
        self.success = Counter("cleave_request_success", "Finished requests", lbl + ["finish_reason"],
                               registry=self.registry)
        self.failures = Counter("cleave_request_failures", "Failed or cancelled requests", lbl + ["reason"],
                                registry=self.registry)
        self.migrations = Counter("cleave_request_migrations", "Attempts retried on another worker", lbl,
                                  registry=self.registry).labels(model_name)
        self.internal_errors = Counter("cleave_http_internal_errors", "HTTP requests that raised an unexpected "
                                       "exception (answered 500 internal_error)", lbl,
                                       registry=self.registry).labels(model_name)
        gauges = _Sampled(lambda: {"model_name": model_name})
        gauges.add("cleave_num_requests_running", "Requests in flight past admission", running)
        gauges.add("cleave_num_requests_waiting", "Requests waiting for KV room", waiting)
        self.registry.register(gauges)

    def kv_index(self, modes: Callable[[], dict[str, str]], blocks: Callable[[], dict[str, int]],
                 all_modes: tuple[str, ...]) -> None:
        """Export the KV index's mode per pool (``modes()``: pool -> one of ``all_modes``) and
        its block count per pool, read at scrape time."""
        self.registry.register(_ModeGauge(self._model, modes, all_modes))
        gauges = _Sampled(lambda: {"model_name": self._model})
        gauges.add("cleave_kv_index_blocks{pool}", "Block hashes the KV index holds for the pool's instances", blocks)
        self.registry.register(gauges)

    def internal_error(self) -> None:
        self.internal_errors.inc()

    def prefill_route(self, mode: str, reason: str) -> bool:
        """One attempt prefilled in ``mode`` ("pool" or "local") for ``reason``; True the first
        time this pair is seen (the caller logs it once)."""
        self._routes.labels(self._model, mode, reason).inc()
        first = (mode, reason) not in self._routes_seen
        self._routes_seen.add((mode, reason))
        return first

    def prediction(self, pool: str, predicted: int, delivered: int) -> None:
        """The KV index predicted ``predicted`` cached prompt tokens on ``pool``'s chosen worker;
        the worker found ``delivered``."""
        self._miss.labels(self._model, pool).observe(delivered - predicted)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, gap_s: float, count: int) -> None:
        """``count`` tokens arrived ``gap_s`` after the previous ones: ``count`` ITL samples."""
        for _ in range(count):
            self.itl.observe(gap_s / count)

    def finished(self, finish_reason: str, prompt_tokens: int, generated: int, e2e_s: float,
                 queue_s: float | None, attempts: int) -> None:
        self.success.labels(self._model, finish_reason).inc()
        self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(generated)
        self.e2e.observe(e2e_s)
        self._common(queue_s, attempts)

    def failed(self, reason: str, queue_s: float | None, attempts: int) -> None:
        self.failures.labels(self._model, reason).inc()
        self._common(queue_s, attempts)

    def _common(self, queue_s: float | None, attempts: int) -> None:
        if queue_s is not None:
            self.queue.observe(queue_s)
        if attempts > 1:
            self.migrations.inc(attempts - 1)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


def layout_label(layout) -> str:
    """``tp1-pp1-cp1-ep1`` for a layout (an object or mapping with tp, pp, cp, ep)."""
    get = layout.get if isinstance(layout, dict) else lambda k: getattr(layout, k)
    return "-".join(f"{axis}{int(get(axis))}" for axis in ("tp", "pp", "cp", "ep"))


class WorkerMetrics:
    """One worker instance's metrics (see the module docstring).

    ``worker_id`` is a callable because the id is known only once the gRPC server is bound;
    labels are resolved when a metric moves or is scraped.
    """

    def __init__(self, pool: str, worker_id: Callable[[], str], layout: str) -> None:
        self.registry = Registry()
        self._pool, self._worker_id, self._layout = pool, worker_id, layout
        names = ["pool", "worker_id", "layout"]
        self._transfer_s = Histogram("cleave_kv_transfer_seconds", "KV transfer time (s)", names,
                                     buckets=TRANSFER_BUCKETS, registry=self.registry)
        self._transfer_bytes = Counter("cleave_kv_transfer_bytes", "KV bytes pushed", names,
                                       registry=self.registry)
        self._transfer_failures = Counter("cleave_kv_transfer_failures", "KV transfers that failed", names,
                                          registry=self.registry)
        self._step_s = Histogram("cleave_decode_step_seconds",
                                 "Engine time of one decode step: forward over the running batch and sampling (s)",
                                 names, buckets=STEP_BUCKETS, registry=self.registry)
        # a step of B sequences is felt by B streams: weighted by its tokens, the mean step a
        # stream waits for (what its TPOT is made of when batch sizes vary over the window)
        self._step_tokens = Counter("cleave_decode_step_tokens", "Tokens made by decode steps (the sum of "
                                    "their batch sizes)", names, registry=self.registry)
        self._step_token_s = Counter("cleave_decode_step_token_seconds", "Sum over decode steps of step seconds x "
                                     "tokens made; divided by cleave_decode_step_tokens_total: the step the mean "
                                     "stream waits for", names, registry=self.registry)
        self._preemptions = Counter("cleave_kv_preemptions", "Decode sequences preempted for lack of KV blocks "
                                    "(resumed later by recompute)", names, registry=self.registry)
        self._queried = Counter("cleave_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                                names, registry=self.registry)
        self._hits = Counter("cleave_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (KV "
                             "reused, not computed or not received)", names, registry=self.registry)
        self._kv_published = Counter("cleave_kv_events_published", "Block stored/removed events published to the "
                                     "pool's KV event stream in Redis", names, registry=self.registry)
        self._kv_dropped = Counter("cleave_kv_events_dropped", "Block events lost before reaching Redis (it was slow "
                                   "or down too long; routers resync from the next snapshot)", names,
                                   registry=self.registry)
        self._local_prefills = Counter("cleave_local_prefills", "Requests a decode instance prefilled itself "
                                       "(conditional disaggregation)", names, registry=self.registry)
        self._local_prefill_tokens = Counter("cleave_local_prefill_tokens", "Prompt tokens a decode instance "
                                             "computed for its local prefills (cached ones excluded)", names,
                                             registry=self.registry)
        self.gauges = _Sampled(self.labels)
        self.registry.register(self.gauges)
        self._server = None

    def labels(self) -> dict[str, str]:
        return {"pool": self._pool, "worker_id": self._worker_id(), "layout": self._layout}

    def transfer(self, seconds: float, nbytes: int = 0) -> None:
        lbl = self.labels()
        self._transfer_s.labels(**lbl).observe(seconds)
        if nbytes:
            self._transfer_bytes.labels(**lbl).inc(nbytes)

    def decode_step(self, seconds: float, batch_size: int) -> None:
        """One decode step's engine time (served TPOT minus this is what the hops add)."""
        lbl = self.labels()
        self._step_s.labels(**lbl).observe(seconds)
        self._step_tokens.labels(**lbl).inc(batch_size)
        self._step_token_s.labels(**lbl).inc(seconds * batch_size)

    def transfer_failed(self) -> None:
        self._transfer_failures.labels(**self.labels()).inc()

    def preempted(self) -> None:
        self._preemptions.labels(**self.labels()).inc()

    def prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """One prompt looked up in the prefix cache: its length and the tokens found."""
        lbl = self.labels()
        self._queried.labels(**lbl).inc(queried_tokens)
        if hit_tokens:
            self._hits.labels(**lbl).inc(hit_tokens)

    def kv_events(self, published: int, dropped: int = 0) -> None:
        """Block events published to Redis, and lost before reaching it (``services.kv_events``)."""
        lbl = self.labels()
        if published:
            self._kv_published.labels(**lbl).inc(published)
        if dropped:
            self._kv_dropped.labels(**lbl).inc(dropped)

    def local_prefill(self, computed_tokens: int) -> None:
        """One local prefill done on a decode instance and the prompt tokens it computed."""
        lbl = self.labels()
        self._local_prefills.labels(**lbl).inc()
        if computed_tokens:
            self._local_prefill_tokens.labels(**lbl).inc(computed_tokens)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            threading.Thread(target=server.shutdown, daemon=True).start()
            server.server_close()
