"""KubernetesBackend against kmock, an in-memory Kubernetes API emulator served over real HTTP.

kmock runs in a thread with its own event loop (it is asyncio; the official client is sync) on a
port the OS picks. Its ``KubernetesEmulator`` stores objects and records every request; it
ignores subresources (GET .../scale returns the whole object, PATCH .../scale merges the body
into the object), so a reaction here answers scale requests with a real ``autoscaling/v1``
Scale built from the stored object. The tests then assert on the exact requests the official
client made (method, path, content type, body) and on the stored objects.
"""
from __future__ import annotations

import asyncio
import json
import threading

import kmock
import kubernetes
import pytest

from engine.parallel import free_port
from services.scaling import ScalingError, backend_class
from services.scaling_k8s import KubernetesBackend, KubernetesConfig, resolve_namespace
import services.scaling_k8s as scaling_k8s

NS = "serving"
DEPLOY = "apps/v1/deployments"
STS = "apps/v1/statefulsets"
LWS = "leaderworkerset.x-k8s.io/v1/leaderworkersets"
KIND_OF = {DEPLOY: ("apps/v1", "Deployment"), STS: ("apps/v1", "StatefulSet"),
           LWS: ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")}
WORKLOADS = {"prefill": "deployment/cleave-prefill", "decode": "deployment/cleave-decode"}


class KMockThread:
    """A KubernetesEmulator + HTTP server on a free port, run by a background event loop."""

    def __init__(self):
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "kmock did not start"
        self.url = self.url.rstrip("/")

    async def _main(self):
        async with kmock.KubernetesEmulator() as self.km, kmock.Server(self.km) as server:
            self.url, self._loop, self._stop = str(server.url), asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def seed(self, resource: str, name: str, replicas: int, namespace: str = NS):
        api_version, kind = KIND_OF[resource]
        self.km.objects[resource, namespace, name] = {
            "apiVersion": api_version, "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}},
            "status": {"replicas": replicas},
        }

    def stored_replicas(self, resource: str, name: str, namespace: str = NS) -> int:
        return self.km.objects[resource, namespace, name]["spec"]["replicas"]

    def requests(self) -> list:
        return list(self.km)

    def scale_reply(self, request):
        """What the real API server answers on .../scale: an autoscaling/v1 Scale of the object."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.km.objects or self.km.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        obj = self.km.objects[key].raw
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": request.name, "namespace": request.namespace},
                "spec": {"replicas": obj["spec"]["replicas"]},
                "status": {"replicas": obj["status"]["replicas"], "selector": f"app={request.name}"}}


@pytest.fixture
def k8s():
    server = KMockThread()
    server.km[kmock.subresource("scale")] << server.scale_reply
    server.seed(DEPLOY, "cleave-prefill", 2)
    server.seed(DEPLOY, "cleave-decode", 4)
    server.seed(DEPLOY, "unrelated", 7)
    server.seed(STS, "cleave-prefill-sts", 1)
    server.seed(LWS, "cleave-decode-lws", 2)
    yield server
    server.stop()


def _backend(server: KMockThread, workloads=WORKLOADS, namespace=NS) -> KubernetesBackend:
    conf = kubernetes.client.Configuration()
    conf.host = server.url
    return KubernetesBackend(KubernetesConfig(namespace=namespace, workloads=workloads),
                             api_client=kubernetes.client.ApiClient(conf))


@pytest.mark.integration
def test_replicas_reads_each_pools_scale_subresource(k8s):
    backend = _backend(k8s)
    assert (backend.replicas("prefill"), backend.replicas("decode")) == (2, 4)
    assert [(r.method.value, r.url.path) for r in k8s.requests()] == [
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/cleave-prefill/scale"),
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/cleave-decode/scale"),
    ]
    backend.close()


@pytest.mark.integration
def test_scale_patches_only_the_pools_scale_subresource(k8s):
    backend = _backend(k8s)
    backend.scale("prefill", 3)
    (patch,) = k8s.requests()  # one request, nothing else (no GET-then-PUT, no other workload)
    assert patch.method.value == "PATCH"
    assert patch.url.path == f"/apis/apps/v1/namespaces/{NS}/deployments/cleave-prefill/scale"
    assert patch.headers["Content-Type"] == "application/strategic-merge-patch+json"
    assert json.loads(patch.body) == {"spec": {"replicas": 3}}
    assert k8s.stored_replicas(DEPLOY, "cleave-prefill") == 3
    assert k8s.stored_replicas(DEPLOY, "cleave-decode") == 4
    assert k8s.stored_replicas(DEPLOY, "unrelated") == 7
    assert k8s.stored_replicas(STS, "cleave-prefill-sts") == 1
    for resource, name in ((DEPLOY, "cleave-decode"), (DEPLOY, "unrelated"), (STS, "cleave-prefill-sts")):
        assert len(k8s.km.objects[resource, NS, name].history) == 1  # never written
    assert backend.replicas("prefill") == 3  # read back through the scale subresource
    assert [r.method.value for r in k8s.requests()] == ["PATCH", "GET"]
    backend.close()


@pytest.mark.integration
def test_statefulset_workloads_use_the_statefulset_scale_path(k8s):
    backend = _backend(k8s, {"prefill": "statefulset/cleave-prefill-sts",
                             "decode": "deployment/cleave-decode"})
    assert backend.replicas("prefill") == 1
    backend.scale("prefill", 0)
    path = f"/apis/apps/v1/namespaces/{NS}/statefulsets/cleave-prefill-sts/scale"
    assert [(r.method.value, r.url.path) for r in k8s.requests()] == [("GET", path), ("PATCH", path)]
    assert json.loads(k8s.requests()[-1].body) == {"spec": {"replicas": 0}}
    assert k8s.stored_replicas(STS, "cleave-prefill-sts") == 0
    assert k8s.stored_replicas(DEPLOY, "cleave-prefill") == 2
    backend.close()


@pytest.mark.integration
def test_leaderworkerset_workloads_use_the_custom_resource_scale_path(k8s):
    """A pool whose instances span nodes is a LeaderWorkerSet (the chart's nodesPerInstance > 1):
    its scale subresource lives under the CRD's group, and a custom resource takes a JSON merge
    patch (the API server refuses strategic merge patches on custom resources)."""
    backend = _backend(k8s, {"prefill": "deployment/cleave-prefill", "decode": "leaderworkerset/cleave-decode-lws"})
    assert backend.replicas("decode") == 2
    backend.scale("decode", 3)
    path = f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{NS}/leaderworkersets/cleave-decode-lws/scale"
    assert [(r.method.value, r.url.path) for r in k8s.requests()] == [("GET", path), ("PATCH", path)]
    patch = k8s.requests()[-1]
    assert patch.headers["Content-Type"] == "application/merge-patch+json"
    assert json.loads(patch.body) == {"spec": {"replicas": 3}}
    assert k8s.stored_replicas(LWS, "cleave-decode-lws") == 3
    assert backend.replicas("decode") == 3
    assert k8s.stored_replicas(DEPLOY, "cleave-decode") == 4  # the Deployment of the same pool name: untouched
    k8s.km[kmock.name("cleave-decode-lws")].override << kmock.KubernetesError(
        status=403, reason="Forbidden", message="cannot patch resource leaderworkersets/scale")
    with pytest.raises(ScalingError, match=r"leaderworkerset 'cleave-decode-lws'.*get and patch on "
                                           r"leaderworkersets/scale \(apiGroup leaderworkerset.x-k8s.io\)"):
        backend.scale("decode", 1)
    backend.close()


@pytest.mark.integration
def test_missing_workload_names_it_and_the_namespace(k8s):
    backend = _backend(k8s, {"prefill": "deployment/ghost", "decode": "deployment/cleave-decode"})
    with pytest.raises(ScalingError, match=rf"deployment 'ghost'.*namespace '{NS}'.*not found"):
        backend.replicas("prefill")
    with pytest.raises(ScalingError, match="'ghost'.*not found"):
        backend.scale("prefill", 2)
    other_ns = _backend(k8s, namespace="elsewhere")
    with pytest.raises(ScalingError, match="'cleave-decode'.*namespace 'elsewhere'"):
        other_ns.replicas("decode")
    backend.close()
    other_ns.close()


@pytest.mark.integration
def test_forbidden_explains_the_rbac_needed(k8s):
    forbidden = kmock.KubernetesError(status=403, reason="Forbidden", message=(
        'deployments.apps "cleave-decode" is forbidden: User "system:serviceaccount:serving:planner"'
        ' cannot patch resource "deployments/scale" in API group "apps"'))
    # Reactions declared later rank lower at equal priority: put this one above the Scale reply.
    # (The emulator still applies a PATCH to its stored object before any reaction answers, so
    # the stored state is not asserted here.)
    k8s.km[kmock.name("cleave-decode")].override << forbidden
    backend = _backend(k8s)
    with pytest.raises(ScalingError, match=r"RBAC.*get and patch on deployments/scale.*cannot patch"):
        backend.scale("decode", 5)
    with pytest.raises(ScalingError, match=r"forbidden to get .*RBAC"):
        backend.replicas("decode")
    assert backend.replicas("prefill") == 2
    backend.close()


@pytest.mark.integration
def test_other_api_errors_and_unreachable_server(k8s):
    k8s.km[kmock.name("cleave-decode")].override << kmock.KubernetesError(
        status=409, reason="Conflict", message="the object has been modified")
    backend = _backend(k8s)
    with pytest.raises(ScalingError, match="HTTP 409 Conflict.*has been modified"):
        backend.scale("decode", 1)
    backend.close()
    conf = kubernetes.client.Configuration()
    conf.host, conf.retries = f"http://127.0.0.1:{free_port()}", False
    dead = KubernetesBackend(KubernetesConfig(namespace=NS, workloads=WORKLOADS),
                             api_client=kubernetes.client.ApiClient(conf))
    with pytest.raises(ScalingError, match="cannot reach the Kubernetes API at http://127.0.0.1"):
        dead.replicas("prefill")
    dead.close()


@pytest.mark.integration
def test_kubeconfig_is_loaded_when_no_client_is_given(k8s, tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "kmock", "cluster": {"server": k8s.url}}],
        "users": [{"name": "planner", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "planner"}},
                     {"name": "other", "context": {"cluster": "nowhere", "user": "planner"}}],
    }))
    backend = backend_class("kubernetes")(KubernetesConfig(
        namespace=NS, workloads=WORKLOADS, kubeconfig=str(kubeconfig), context="kmock"))
    assert backend.replicas("decode") == 4
    assert k8s.requests()[-1].headers["Authorization"] == "Bearer t0ken"
    backend.close()
    with pytest.raises(ScalingError, match="cannot load Kubernetes credentials"):
        KubernetesBackend(KubernetesConfig(namespace=NS, workloads=WORKLOADS,
                                           kubeconfig=str(tmp_path / "missing")))


@pytest.mark.unit
def test_config_validation_quotes_the_bad_values():
    assert KubernetesConfig(workloads={"prefill": "leaderworkerset/p", "decode": "deployment/d"}).workloads[
        "prefill"] == "leaderworkerset/p"
    with pytest.raises(ValueError, match="'replicaset/x'"):
        KubernetesConfig(workloads={"prefill": "replicaset/x", "decode": "deployment/d"})
    with pytest.raises(ValueError, match="'deployment'"):
        KubernetesConfig(workloads={"prefill": "deployment", "decode": "deployment/d"})
    with pytest.raises(ValueError, match="'deployment/Bad_Name'"):
        KubernetesConfig(workloads={"prefill": "deployment/Bad_Name", "decode": "deployment/d"})
    with pytest.raises(ValueError, match=r"missing \['decode'\]"):
        KubernetesConfig(workloads={"prefill": "deployment/p"})
    with pytest.raises(ValueError, match=r"unknown \['router'\]"):
        KubernetesConfig(workloads={**WORKLOADS, "router": "deployment/r"})
    with pytest.raises(ValueError, match="'Not_A_Namespace'"):
        KubernetesConfig(namespace="Not_A_Namespace", workloads=WORKLOADS)
    with pytest.raises(ValueError, match="request_timeout_s"):
        KubernetesConfig(workloads=WORKLOADS, request_timeout_s=0)
    cfg = KubernetesConfig(workloads=dict(WORKLOADS))
    with pytest.raises(TypeError):
        cfg.workloads["prefill"] = "deployment/other"  # read-only copy


@pytest.mark.unit
def test_unknown_pool_and_bad_replicas_are_caller_errors():
    backend = KubernetesBackend(KubernetesConfig(namespace=NS, workloads=WORKLOADS),
                                api_client=kubernetes.client.ApiClient())
    with pytest.raises(ValueError, match="'router'"):
        backend.replicas("router")
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=repr(bad)):
            backend.scale("prefill", bad)
    backend.close()


@pytest.mark.unit
def test_empty_namespace_is_the_pods_own_else_default(tmp_path, monkeypatch):
    mounted = tmp_path / "namespace"
    monkeypatch.setattr(scaling_k8s, "SERVICEACCOUNT_NAMESPACE", mounted)
    assert resolve_namespace("") == "default"
    mounted.write_text("cleave-prod\n")
    assert resolve_namespace("") == "cleave-prod"
    assert resolve_namespace("explicit") == "explicit"
