"""The Helm chart (helm/cleave) rendered offline for the deploy tests (tests/deploy/): the chart's
path, values sets more than one test file uses, a rendered ``Release`` to read manifests from, the
module-scoped ``chart`` fixture and ``render``/``flag``. Importing it skips the importing module
when helm-python-sdk or kubernetes-validate is missing."""
from __future__ import annotations

import pathlib

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "cleave"
RELEASE, NAMESPACE = "demo", "serving"
KUBE_VERSION = "1.33.0"

# A GPU deployment: big layouts need a model that splits that way (the embedded one has 9 heads).
MULTI_GPU = {
    "gpu": {"enabled": True},
    "model": {"path": "/models/Llama-3.1-8B-Instruct",
              "volume": {"persistentVolumeClaim": {"claimName": "models"}}},
    "prefill": {"replicaCount": 2, "layout": {"tp": 4, "cp": 2},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
    "decode": {"replicaCount": 3, "layout": {"tp": 2, "pp": 2, "ep": 1}, "maxBatch": 128},
    "redis": {"mode": "external", "external": {"url": "redis://redis.cache.svc:6379/0"},
              "auth": {"enabled": True, "existingSecret": "redis-creds", "existingSecretKey": "password"}},
    "planner": {"prefill": {"minReplicas": 1, "maxReplicas": 8}, "decode": {"minReplicas": 2, "maxReplicas": 6}},
}
MONITORED = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                         "grafanaDashboard": {"enabled": True}}}


class Release:
    """One rendered values set: the manifests by kind/name, and NOTES.txt."""

    def __init__(self, rendered: dict[str, str]):
        self.notes = next((t for p, t in rendered.items() if p.endswith("NOTES.txt")), "")
        self.docs = [d for p, t in rendered.items() if p.endswith(".yaml")
                     for d in yaml.safe_load_all(t) if d]

    def get(self, kind: str, component: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind
                 and d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert len(found) == 1, f"expected one {kind} of {component}, found {len(found)}"
        return found[0]

    def kinds(self) -> list[tuple[str, str]]:
        return sorted((d["kind"], d["metadata"]["name"]) for d in self.docs)

    def container(self, component: str) -> dict:
        return self.get("Deployment", component)["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` in a container's args (None when absent)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, f"--{name} given {len(values)} times"
    return values[0] if values else None
