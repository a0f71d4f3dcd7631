"""The Helm chart's instances that span nodes: a pool with nodesPerInstance > 1 is a LeaderWorkerSet.

Rendered offline like tests/deploy/test_helm.py (same helpers: tests/helm_chart.py). The LeaderWorkerSet is
validated strictly against the LWS CRD's published schema kept in tests/schemas/ (through
tests/crd_schema.py), every other manifest against Kubernetes 1.33 (kubernetes-validate). The
tests then read the contract the pods carry: the leader pod is rank 0 and the service; each
other pod runs its node's ranks and joins the leader's rendezvous through the variables LWS
injects; every pod asks for its node's share of the GPUs; the planner scales the
LeaderWorkerSet; values that cannot split an instance evenly over its nodes are refused.
"""
from __future__ import annotations

import argparse
import copy
import re

import pytest

from tests.crd_schema import SCHEMAS, crd_validator, elided, load_crd, problems
from tests.helm_chart import (CHART, KUBE_VERSION, MONITORED, MULTI_GPU, NAMESPACE, Release, chart,  # noqa: F401
                              flag, helm_python, kubernetes_validate, render)

LWS_CRD = SCHEMAS / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
LWS_ENV = {"LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX", "LWS_GROUP_SIZE"}  # injected by LWS into every container


def _with(base: dict, **pools) -> dict:
    """``base`` with some top-level keys merged one level deep (e.g. a pool's layout replaced)."""
    values = copy.deepcopy(base)
    for key, changes in pools.items():
        values[key] = {**values.get(key, {}), **changes}
    return values


# Both pools span nodes of 8 GPUs: prefill tp8 x cp2 over 2 nodes, decode tp8 x pp4 over 4.
SPAN = _with(MULTI_GPU, prefill={"layout": {"tp": 8, "cp": 2}, "nodesPerInstance": 2},
             decode={"layout": {"tp": 8, "pp": 4, "ep": 1}, "nodesPerInstance": 4})
# Only decode spans nodes (2 of them, 4 GPUs each from gpusPerInstance=8), with a ServiceMonitor.
MIXED = _with({**MULTI_GPU, **MONITORED}, decode={"nodesPerInstance": 2, "gpusPerInstance": 8,
                                                  "rendezvousPort": 29400, "extraArgs": ["--dtype=bfloat16"]})
# On CPU: the embedded model's 30 layers in two pipeline stages, one node each.
CPU_SPAN = {"decode": {"layout": {"tp": 1, "pp": 2, "ep": 1}, "nodesPerInstance": 2}}


@pytest.fixture(scope="module")
def span(chart) -> Release:
    return Release(render(chart, SPAN))


@pytest.fixture(scope="module")
def mixed(chart) -> Release:
    return Release(render(chart, MIXED))


@pytest.fixture(scope="module")
def cpu_span(chart) -> Release:
    return Release(render(chart, CPU_SPAN))


@pytest.fixture(scope="module")
def lws_validator():
    return crd_validator(LWS_CRD)


def templates(release: Release, pool: str) -> tuple[dict, dict]:
    """The (leader, worker) pod templates of a pool's LeaderWorkerSet."""
    lwt = release.get("LeaderWorkerSet", pool)["spec"]["leaderWorkerTemplate"]
    return lwt["leaderTemplate"], lwt["workerTemplate"]


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


# ---------------------------------------------------------------- the stored CRD and strict validation

@pytest.mark.unit
def test_stored_crd_is_the_leaderworkerset_api_with_only_core_types_elided(lws_validator):
    crd = load_crd(LWS_CRD)
    assert crd["metadata"]["name"] == "leaderworkersets.leaderworkerset.x-k8s.io"
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"], crd["spec"]["names"]["plural"]) == \
        ("leaderworkerset.x-k8s.io", "LeaderWorkerSet", "leaderworkersets")
    (v1,) = crd["spec"]["versions"]
    assert v1["name"] == "v1" and v1["served"] and v1["storage"]
    assert v1["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"  # what the planner PATCHes
    assert elided(crd) == ["io.k8s.api.core.v1.PodSpec", "io.k8s.api.core.v1.PersistentVolumeClaimSpec",
                           "io.k8s.api.core.v1.PersistentVolumeClaimStatus", "io.k8s.api.core.v1.PodSpec"]
    assert "Source" in (SCHEMAS / "README.md").read_text() and "83ba21e9" in (SCHEMAS / "README.md").read_text()


@pytest.mark.unit
def test_the_validator_refuses_what_the_api_server_would(span, lws_validator):
    good = span.get("LeaderWorkerSet", "decode")
    assert problems(lws_validator, good) == []
    cases = {
        "spec/leaderWorkerTemplate: Additional properties are not allowed ('sze'": ("spec.leaderWorkerTemplate.sze", 2),
        "spec/leaderWorkerTemplate/restartPolicy: 'Always' is not one of": ("spec.leaderWorkerTemplate.restartPolicy",
                                                                            "Always"),
        "spec/startupPolicy: 'Eager' is not one of": ("spec.startupPolicy", "Eager"),
        "spec/leaderWorkerTemplate/size: '2' is not of type 'integer'": ("spec.leaderWorkerTemplate.size", "2"),
        "workerTemplate/metadata: Additional properties are not allowed ('uid'":
            ("spec.leaderWorkerTemplate.workerTemplate.metadata.uid", "x"),
        "workerTemplate/spec/containers/0: Additional properties are not allowed ('argz'":
            ("spec.leaderWorkerTemplate.workerTemplate.spec.containers.0.argz", []),
        "leaderTemplate/spec: Additional properties are not allowed ('hostNetworking'":
            ("spec.leaderWorkerTemplate.leaderTemplate.spec.hostNetworking", True),
        "metadata: Additional properties are not allowed ('label'": ("metadata.label", {}),
        "apiVersion: 'leaderworkerset.x-k8s.io/v2' is not one of": ("apiVersion", "leaderworkerset.x-k8s.io/v2"),
    }
    for expected, (path, value) in cases.items():
        bad = copy.deepcopy(good)
        *parents, leaf = path.split(".")
        node = bad
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
        found = problems(lws_validator, bad)
        assert any(expected in p for p in found), (path, found)
    missing = copy.deepcopy(good)
    del missing["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    assert any("'workerTemplate' is a required property" in p for p in problems(lws_validator, missing))


@pytest.mark.unit
@pytest.mark.parametrize("name", ["span", "mixed", "cpu_span"])
def test_every_manifest_validates_strictly(request, name, lws_validator):
    release = request.getfixturevalue(name)
    custom = [d for d in release.docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    lws = [d for d in release.docs if d["kind"] == "LeaderWorkerSet"]
    assert lws
    for doc in lws:
        assert problems(lws_validator, doc) == [], doc["metadata"]["name"]
    for doc in release.docs:
        if doc not in lws and doc not in custom:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.unit
@pytest.mark.parametrize("values", [SPAN, MIXED, CPU_SPAN], ids=["span", "mixed", "cpu_span"])
def test_lints_clean(values):
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# ---------------------------------------------------------------- which workload each pool is

@pytest.mark.unit
def test_one_node_instances_stay_deployments(chart, mixed):
    def without_token(release: Release) -> list[dict]:  # the chart's internal token is random per render
        return [d for d in release.docs if d["kind"] != "Secret"]

    explicit = Release(render(chart, _with(MULTI_GPU, prefill={"nodesPerInstance": 1},
                                           decode={"nodesPerInstance": 1})))
    assert without_token(explicit) == without_token(Release(render(chart, MULTI_GPU)))
    assert not [d for d in explicit.docs if d["kind"] == "LeaderWorkerSet"]
    kinds = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["kind"] for d in mixed.docs
             if d["kind"] in ("Deployment", "LeaderWorkerSet")}
    assert kinds == {"router": "Deployment", "prefill": "Deployment", "decode": "LeaderWorkerSet",
                     "planner": "Deployment"}
    assert "cleave/role" not in mixed.get("Deployment", "prefill")["spec"]["template"]["metadata"]["labels"]


@pytest.mark.unit
def test_one_instance_is_one_group_of_nodes_restarted_as_a_whole(span):
    for pool, replicas, nodes, ranks in (("prefill", 2, 2, 16), ("decode", 3, 4, 32)):
        lws = span.get("LeaderWorkerSet", pool)
        assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        assert lws["metadata"]["name"] == f"demo-cleave-{pool}"
        spec = lws["spec"]
        assert spec["replicas"] == replicas                       # instances: what the planner scales
        assert spec["leaderWorkerTemplate"]["size"] == nodes       # pods (nodes) per instance
        assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
        assert spec["startupPolicy"] == "LeaderCreated"            # the leader is ready only once all ranks joined
        assert lws["metadata"]["annotations"] == {"cleave/ranks-per-instance": str(ranks),
                                                  "cleave/nodes-per-instance": str(nodes)}


# ---------------------------------------------------------------- the processes of the pods

@pytest.mark.unit
def test_leader_is_rank_0_and_the_service_of_a_one_node_pod(chart, mixed):
    """The leader runs exactly what a one-node pod runs, plus its share of the ranks and the
    rendezvous: same flags, probes, ports, secrets and scrape annotations."""
    leader, _ = templates(mixed, "decode")
    one_node = Release(render(chart, _with(MIXED, decode={"nodesPerInstance": 1})))
    single = one_node.get("Deployment", "decode")["spec"]["template"]
    c, s = leader["spec"]["containers"][0], single["spec"]["containers"][0]
    assert c["args"][:2] == ["worker", "decode"]
    extra = ["--device=cuda", "--nproc-per-node=2", "--master-port=29400"]
    assert c["args"] == s["args"][:-1] + extra + s["args"][-1:]   # before extraArgs (--dtype=bfloat16)
    assert flag(c["args"], "host") == "$(POD_IP)" and flag(c["args"], "master-addr") is None
    for key in ("env", "startupProbe", "livenessProbe", "readinessProbe", "volumeMounts", "securityContext"):
        assert c[key] == s[key], key
    assert c["ports"] == s["ports"] + [{"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"}]
    assert leader["metadata"]["annotations"] == single["metadata"]["annotations"]
    assert leader["metadata"]["labels"] == {**single["metadata"]["labels"], "cleave/role": "leader"}
    assert {k: v for k, v in leader["spec"].items() if k != "containers"} == \
        {k: v for k, v in single["spec"].items() if k != "containers"}


@pytest.mark.unit
def test_worker_pods_run_their_nodes_ranks_and_join_the_leader(span):
    for pool, per_node in (("prefill", "8"), ("decode", "8")):
        leader, worker = templates(span, pool)
        lc, wc = leader["spec"]["containers"][0], worker["spec"]["containers"][0]
        args = wc["args"]
        assert args[:2] == ["rank", pool]
        assert flag(args, "node-rank") == "$(LWS_WORKER_INDEX)"      # node k runs ranks k*G .. k*G+G-1
        assert flag(args, "nproc-per-node") == flag(lc["args"], "nproc-per-node") == per_node
        assert flag(args, "master-addr") == "$(LWS_LEADER_ADDRESS)"
        assert flag(args, "master-port") == flag(lc["args"], "master-port") == "29500"
        assert flag(args, "host") == "$(POD_IP)" and flag(args, "device") == "cuda"
        for same in ("model", "transport", "kv-cache-mb", "tp", "pp", "cp", "ep", "max-batch"):
            assert flag(args, same) == flag(lc["args"], same), same
        for serving_only in ("port", "metrics-port", "redis-url", "key-prefix", "worker-id", "drain-timeout"):
            assert flag(args, serving_only) is None, serving_only
        # no gRPC, no Redis: no probes, no ports, no secrets; the same grace period as the leader
        assert not {"ports", "startupProbe", "livenessProbe", "readinessProbe"} & set(wc)
        assert env_names(wc) == {"POD_IP", "CLEAVE_REDIS_URL", "CLEAVE_KEY_PREFIX", "CLEAVE_MODEL",
                                 "CLEAVE_TRANSPORT", "CLEAVE_LOG_LEVEL"}
        assert worker["metadata"]["labels"]["cleave/role"] == "rank"
        assert not any(k.startswith("prometheus.io/") for k in worker["metadata"]["annotations"])
        # the same pod settings as the leader: grace period, scheduling, volumes, security
        assert {k: v for k, v in worker["spec"].items() if k != "containers"} == \
            {k: v for k, v in leader["spec"].items() if k != "containers"}


@pytest.mark.unit
def test_every_variable_in_the_args_is_defined_for_the_kubelet(span, mixed):
    """$(VAR) in args expands only from the container's env (LWS adds its variables there)."""
    for release in (span, mixed):
        for pod in templates(release, "decode"):
            c = pod["spec"]["containers"][0]
            used = {m for a in c["args"] for m in re.findall(r"\$\(([A-Z_]+)\)", a)}
            assert used <= env_names(c) | LWS_ENV, used - env_names(c) - LWS_ENV


@pytest.mark.unit
def test_the_cli_accepts_the_pods_commands(span, mixed):
    """Both commands parse with the real `cleave` parser, the LWS variables filled in as the kubelet would."""
    cli = pytest.importorskip("services.cli")
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "rank" not in commands:
        pytest.skip("this checkout's `cleave` has no `rank` command yet (issue 11)")
    values = {"POD_IP": "10.4.0.7", "POD_NAME": "demo-cleave-decode-1", "LWS_WORKER_INDEX": "3",
              "LWS_LEADER_ADDRESS": "demo-cleave-decode-1.demo-cleave-decode.serving", "CLEAVE_MODEL": "/m",
              "CLEAVE_TRANSPORT": "ucx", "CLEAVE_REDIS_URL": "redis://r:6379/0", "CLEAVE_KEY_PREFIX": "cleave:"}
    for release in (span, mixed):
        leader, worker = templates(release, "decode")
        parsed = []
        for pod in (leader, worker):
            args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: values[m.group(1)], a)
                    for a in pod["spec"]["containers"][0]["args"]]
            parsed.append(parser.parse_args(args))
        lead, rank = parsed
        assert (lead.command, rank.command) == ("worker", "rank")
        assert rank.node_rank == 3 and rank.master_addr == values["LWS_LEADER_ADDRESS"]
        assert lead.master_addr is None and lead.host == "10.4.0.7" == rank.host  # the store binds --host
        assert lead.master_port == rank.master_port and lead.nproc_per_node == rank.nproc_per_node
        assert (lead.tp, lead.pp, lead.ep) == (rank.tp, rank.pp, rank.ep)
        assert lead.nproc_per_node * release.get("LeaderWorkerSet", "decode")["spec"]["leaderWorkerTemplate"][
            "size"] == lead.pp * max(lead.tp, lead.ep)   # the nodes hold the world size exactly


# ---------------------------------------------------------------- GPUs, CPU

@pytest.mark.unit
def test_every_pod_asks_for_its_nodes_share_of_the_gpus(span, mixed):
    for release, pool, gpus in ((span, "prefill", 8), (span, "decode", 8), (mixed, "decode", 4)):
        for pod in templates(release, pool):
            assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus, (pool, gpus)
    # the one-node pool of the same release keeps its whole-instance request
    assert mixed.container("prefill")["resources"]["limits"]["nvidia.com/gpu"] == 8


@pytest.mark.unit
def test_instances_span_nodes_on_cpu_too(cpu_span):
    for pod in templates(cpu_span, "decode"):
        c = pod["spec"]["containers"][0]
        assert flag(c["args"], "device") == "cpu" and flag(c["args"], "nproc-per-node") == "1"
        assert not any("gpu" in k for part in c["resources"].values() for k in part)
    assert cpu_span.get("Deployment", "prefill")


# ---------------------------------------------------------------- planner, Services, budgets

@pytest.mark.unit
def test_planner_scales_the_leaderworkerset_through_its_scale_subresource(span, mixed):
    from services.scaling_k8s import KubernetesConfig, parse_workload

    for release, kinds in ((span, {"prefill": "leaderworkerset", "decode": "leaderworkerset"}),
                           (mixed, {"prefill": "deployment", "decode": "leaderworkerset"})):
        args = release.container("planner")["args"]
        workloads = {pool: flag(args, f"{pool}-workload") for pool in ("prefill", "decode")}
        assert workloads == {pool: f"{kind}/demo-cleave-{pool}" for pool, kind in kinds.items()}
        KubernetesConfig(namespace=NAMESPACE, workloads=workloads)  # the backend accepts what the chart passes
        rules = release.get("Role", "planner")["rules"]
        granted = {(g, r, n) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
                   for n in rule["resourceNames"]}
        expected = {("apps" if kind == "deployment" else "leaderworkerset.x-k8s.io", f"{kind}s/scale",
                     parse_workload(workloads[pool])[1]) for pool, kind in kinds.items()}
        assert granted == expected
        assert all(sorted(rule["verbs"]) == ["get", "patch"] for rule in rules)
    assert "get deployments,leaderworkersets" in span.notes and "over 4 nodes" in span.notes


@pytest.mark.unit
def test_metrics_service_selects_the_leaders_and_the_budget_every_pod(mixed):
    leader, worker = templates(mixed, "decode")
    selector = mixed.get("Service", "decode")["spec"]["selector"]   # demo-cleave-decode-metrics
    assert selector.items() <= leader["metadata"]["labels"].items()
    assert not selector.items() <= worker["metadata"]["labels"].items()   # rank pods serve no metrics
    budget = mixed.get("PodDisruptionBudget", "decode")["spec"]["selector"]["matchLabels"]
    for pod in (leader, worker):  # evicting any pod of a group takes its instance down
        assert budget.items() <= pod["metadata"]["labels"].items()


# ---------------------------------------------------------------- values that must be refused

REFUSED = {
    "world_size_indivisible": (
        {"model": {"path": "/m"}, "decode": {"layout": {"tp": 2, "pp": 2, "ep": 1}, "nodesPerInstance": 3}},
        "decode.nodesPerInstance=3 does not divide the decode layout's world size of 4 ranks "
        "(pp=2 x max(tp=2, ep=1)): every node runs the same number of ranks on as many GPUs. "
        "Set decode.nodesPerInstance to one of 1, 2, 4, or change decode.layout"),
    "more_nodes_than_ranks": (
        {"prefill": {"layout": {"tp": 3, "cp": 1}, "nodesPerInstance": 6}},
        "prefill.nodesPerInstance=6 does not divide the prefill layout's world size of 3 ranks (tp=3 x cp=1)"),
    "gpus_indivisible": (
        {"gpu": {"enabled": True}, "model": {"path": "/m"},
         "decode": {"layout": {"tp": 2, "pp": 2, "ep": 1}, "nodesPerInstance": 2, "gpusPerInstance": 5}},
        "decode.gpusPerInstance=5 cannot be split evenly over decode.nodesPerInstance=2 pods"),
    "rendezvous_port_clash": (
        {"decode": {"layout": {"tp": 1, "pp": 2, "ep": 1}, "nodesPerInstance": 2, "rendezvousPort": 50060}},
        "decode.rendezvousPort=50060 is also decode.port or decode.metricsPort"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_instances_that_cannot_split_evenly_are_refused(chart, case):
    values, message = REFUSED[case]
    with pytest.raises(helm_python.HelmRenderError) as err:
        render(chart, values)
    assert message in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("value,where", [(0, "/prefill/nodesPerInstance"), (1.5, "/prefill/nodesPerInstance"),
                                         ("2", "/prefill/nodesPerInstance"), (65, "/prefill/nodesPerInstance")])
def test_schema_refuses_a_bad_node_count(chart, value, where):
    with pytest.raises(helm_python.HelmValuesError) as err:
        render(chart, {"prefill": {"nodesPerInstance": value}})
    assert where in str(err.value)


@pytest.mark.unit
def test_the_rendezvous_port_is_checked_only_where_it_is_used(chart):
    # one-node pools bind no rendezvous port: a clash there is harmless and not reported
    Release(render(chart, {"decode": {"rendezvousPort": 50060}}))
