"""Scaling backends: how the planner changes the number of instances in a pool.

The planner (``services.planner``, one process) calls, every tick and for each pool
(``"prefill"``, ``"decode"``):

1. ``backend.replicas(pool)`` — the replica count the backend currently targets;
2. ``backend.scale(pool, n)`` — only when its decision differs from that count;
3. ``backend.close()`` once, when the planner stops.

Backends are chosen by name through :func:`make_backend`, which imports them on demand, so a
missing optional dependency (the ``kubernetes`` client) is a clear error only when that backend
is chosen:

- ``local`` (``services.scaling_local.LocalBackend``): starts and stops ``cleave worker``
  processes of the local stack; a removed instance drains before it exits.
- ``kubernetes`` (``services.scaling_k8s.KubernetesBackend``): patches the scale subresource
  of each pool's Deployment or StatefulSet; Kubernetes then starts pods, or sends SIGTERM to
  the ones it removes, which drain the same way.
"""
from __future__ import annotations

import importlib
from typing import Protocol

from common.config import POOLS


class ScalingError(RuntimeError):
    """A backend could not read or change a pool's size (API refused, workload missing, ...)."""


class ScalingBackend(Protocol):
    """One way of changing pool sizes. Called only by the planner's loop, from one thread."""

    def replicas(self, pool: str) -> int:
        """The replica count this backend currently targets for ``pool`` (its desired size)."""
        ...

    def scale(self, pool: str, replicas: int) -> None:
        """Make ``pool`` converge to ``replicas`` instances; returns without waiting for them."""
        ...

    def close(self) -> None:
        """Release what the backend holds (clients; the local backend leaves instances running)."""
        ...


_BACKENDS = {
    "local": ("services.scaling_local", "LocalBackend"),
    "kubernetes": ("services.scaling_k8s", "KubernetesBackend"),
}


def backend_class(name: str):
    """The backend class registered under ``name``, imported now."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown scaling backend {name!r}; choose one of {sorted(_BACKENDS)}")
    module, attr = _BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ValueError(f"scaling backend {name!r} needs a package that is missing: {exc}") from exc
