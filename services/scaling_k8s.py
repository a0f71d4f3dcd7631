"""Kubernetes scaling backend: each pool is a Deployment, StatefulSet or LeaderWorkerSet sized
through its scale subresource.

The planner chooses it with ``backend_class("kubernetes")`` (``services.scaling``) and, in its
one process and from its one loop thread:

1. builds ``KubernetesBackend(KubernetesConfig(...))`` once; this loads credentials (in-cluster
   service account, else kubeconfig) but makes no API call;
2. every tick and for each pool calls ``replicas(pool)`` — one GET of
   ``/apis/apps/v1/namespaces/NS/{deployments|statefulsets}/NAME/scale`` (or, for a pool whose
   instances span nodes, ``/apis/leaderworkerset.x-k8s.io/v1/namespaces/NS/leaderworkersets/NAME/scale``,
   where one replica is one group of pods) → ``spec.replicas``;
3. calls ``scale(pool, n)`` when its decision differs — one PATCH of that same path with
   ``{"spec": {"replicas": n}}`` (a strategic merge patch; a JSON merge patch for the
   LeaderWorkerSet, a custom resource); nothing else of the workload, and no other workload, is
   touched. Kubernetes then starts pods, or sends SIGTERM to the ones it
   removes, which drain before they exit; the call returns without waiting for them;
4. calls ``close()`` once when it stops, which closes the API client (connection pool).

Every failed API call raises :class:`ScalingError` with what to fix (missing workload, RBAC,
unreachable API server). RBAC the planner's service account needs, in the namespace:
``get`` and ``patch`` on ``deployments/scale`` (or ``statefulsets/scale``) in apiGroup ``apps``,
or on ``leaderworkersets/scale`` in apiGroup ``leaderworkerset.x-k8s.io``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import kubernetes
import urllib3

from common.config import POOLS
from services.scaling import ScalingError

log = logging.getLogger(__name__)

# Where Kubernetes mounts the pod's namespace; read when the config leaves ``namespace`` empty.
SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
KINDS = {"deployment": "deployments", "statefulset": "statefulsets",   # kind → resource plural
         "leaderworkerset": "leaderworkersets"}
API_GROUPS = {"deployment": "apps", "statefulset": "apps", "leaderworkerset": "leaderworkerset.x-k8s.io"}
LWS_VERSION = "v1"  # leaderworkerset.x-k8s.io/v1
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class KubernetesConfig:
    """Where each pool's workload lives and how to reach the API server."""

    namespace: str = ""           # "" = the pod's own namespace in a cluster, else "default"
    workloads: Mapping[str, str] = field(default_factory=dict)  # pool → "KIND/NAME", KIND one of KINDS
    kubeconfig: str = ""          # "" (and no context) = in-cluster config if available, else ~/.kube/config
    context: str = ""             # kubeconfig context; "" = its current-context
    request_timeout_s: float = 10.0  # per API call, so a dead API server cannot stall the planner

    def __post_init__(self):
        if self.namespace and not _DNS_LABEL.fullmatch(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a valid Kubernetes namespace name")
        if not isinstance(self.workloads, Mapping):
            raise ValueError(f"workloads must map pools to 'kind/name', got {self.workloads!r}")
        missing = [p for p in POOLS if p not in self.workloads]
        unknown = sorted(set(self.workloads) - set(POOLS))
        if missing or unknown:
            raise ValueError(f"workloads must name exactly the pools {list(POOLS)}: missing {missing}, "
                             f"unknown {unknown} (got {dict(self.workloads)!r})")
        for pool in POOLS:
            parse_workload(self.workloads[pool], pool)
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        # Frozen means frozen: keep a read-only copy, not the caller's dict.
        object.__setattr__(self, "workloads", MappingProxyType({p: self.workloads[p] for p in POOLS}))


def parse_workload(spec: str, pool: str = "?") -> tuple[str, str]:
    """``"deployment/NAME"`` → ``("deployment", "NAME")``; ValueError quoting ``spec`` otherwise."""
    kind, sep, name = spec.partition("/") if isinstance(spec, str) else ("", "", "")
    if not sep or kind not in KINDS or not _DNS_SUBDOMAIN.fullmatch(name):
        raise ValueError(f"workload for pool {pool!r} must be 'deployment/NAME', 'statefulset/NAME' "
                         f"or 'leaderworkerset/NAME' with NAME a Kubernetes object name, got {spec!r}")
    return kind, name


def resolve_namespace(namespace: str) -> str:
    """The configured namespace, else the pod's own (service account mount), else ``default``."""
    if namespace:
        return namespace
    try:
        return SERVICEACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _load_api_client(cfg: KubernetesConfig) -> kubernetes.client.ApiClient:
    try:
        if not cfg.kubeconfig and not cfg.context:
            try:
                conf = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(client_configuration=conf)
                return kubernetes.client.ApiClient(conf)
            except kubernetes.config.ConfigException:
                pass  # not in a pod: fall back to the default kubeconfig
        return kubernetes.config.new_client_from_config(config_file=cfg.kubeconfig or None,
                                                        context=cfg.context or None)
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise ScalingError(f"cannot load Kubernetes credentials (kubeconfig={cfg.kubeconfig!r}, "
                           f"context={cfg.context!r}; no in-cluster service account): {exc}") from exc


class KubernetesBackend:
    """Sizes each pool by patching its workload's scale subresource. See the module docstring."""

    def __init__(self, cfg: KubernetesConfig, api_client: kubernetes.client.ApiClient | None = None):
        self.cfg = cfg
        self.namespace = resolve_namespace(cfg.namespace)
        self._workloads = {pool: parse_workload(cfg.workloads[pool], pool) for pool in POOLS}
        self._client = api_client if api_client is not None else _load_api_client(cfg)
        self._apps = kubernetes.client.AppsV1Api(self._client)
        self._custom = kubernetes.client.CustomObjectsApi(self._client)

    def replicas(self, pool: str) -> int:
        kind, name = self._workload(pool)
        if kind == "leaderworkerset":  # a custom resource: its Scale comes back as a plain dict
            scale = self._call("get", pool, self._custom.get_namespaced_custom_object_scale,
                               *self._lws_path(name))
            return int((scale.get("spec") or {}).get("replicas") or 0)
        read = (self._apps.read_namespaced_deployment_scale if kind == "deployment"
                else self._apps.read_namespaced_stateful_set_scale)
        scale = self._call("get", pool, read, name, self.namespace)
        return int((scale.spec.replicas if scale.spec else None) or 0)

    def scale(self, pool: str, replicas: int) -> None:
        kind, name = self._workload(pool)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas for pool {pool!r} must be an int >= 0, got {replicas!r}")
        body = {"spec": {"replicas": replicas}}
        if kind == "leaderworkerset":
            self._call("patch", pool, self._custom.patch_namespaced_custom_object_scale,
                       *self._lws_path(name), body)
        else:
            patch = (self._apps.patch_namespaced_deployment_scale if kind == "deployment"
                     else self._apps.patch_namespaced_stateful_set_scale)
            self._call("patch", pool, patch, name, self.namespace, body)
        log.info("scaled pool %s (%s/%s in namespace %s) to %d replicas",
                 pool, kind, name, self.namespace, replicas)

    def close(self) -> None:
        self._client.close()

    def _workload(self, pool: str) -> tuple[str, str]:
        if pool not in self._workloads:
            raise ValueError(f"unknown pool {pool!r}; pools are {list(POOLS)}")
        return self._workloads[pool]

    def _lws_path(self, name: str) -> tuple[str, str, str, str, str]:
        """(group, version, namespace, plural, name): CustomObjectsApi's address of a LeaderWorkerSet."""
        return API_GROUPS["leaderworkerset"], LWS_VERSION, self.namespace, KINDS["leaderworkerset"], name

    def _call(self, verb: str, pool: str, fn, *args):
        kind, name = self._workloads[pool]
        what = f"{kind} {name!r} (pool {pool!r}) in namespace {self.namespace!r}"
        try:
            return fn(*args, _request_timeout=self.cfg.request_timeout_s)
        except kubernetes.client.ApiException as exc:
            detail = _api_message(exc)
            if exc.status == 404:
                msg = (f"{what} not found: create it, or fix the workloads/namespace settings"
                       f" ({detail})")
            elif exc.status == 403:
                msg = (f"forbidden to {verb} the scale of {what}: RBAC must grant the planner's "
                       f"service account get and patch on {KINDS[kind]}/scale (apiGroup {API_GROUPS[kind]}) "
                       f"in that namespace ({detail})")
            elif exc.status == 401:
                msg = f"the API server rejected the credentials to {verb} {what} ({detail})"
            else:
                msg = f"cannot {verb} the scale of {what}: HTTP {exc.status} {exc.reason} ({detail})"
            raise ScalingError(msg) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            host = self._client.configuration.host
            raise ScalingError(f"cannot reach the Kubernetes API at {host} to {verb} {what}: "
                               f"{exc}") from exc


def _api_message(exc: kubernetes.client.ApiException) -> str:
    """The ``message`` of the API server's Status body, else the raw body (shortened)."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.body or exc.reason or "no details")[:300]
