"""The Helm chart, rendered with the real helm binary: security, probes, replicas, RBAC,
network isolation of Redis, and a ConfigMap that the project's own config loader accepts.

No live cluster exists here; `deploy/dev/chart-check.sh` (`make chart`) installs helm and also
validates every render against the Kubernetes OpenAPI schemas. This test is skipped only when
helm is missing outside CI (CI must have it: `make chart` runs first).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncopd.config import load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "asyncopd"
CI_SETS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
ALL_SETS = ["", *CI_SETS, "values-production.yaml"]
SERVE_COMPONENTS = {"cache", "rollout", "teacher", "learner", "autoscaler"}


def _helm() -> str:
    found = shutil.which("helm") or (str(ROOT / ".tools/helm/helm") if (ROOT / ".tools/helm/helm").exists() else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("helm is missing in CI: `make chart` (deploy/dev/chart-check.sh) installs it")
        pytest.skip("helm not installed (run deploy/dev/chart-check.sh)")
    return found


@functools.cache
def _render_cached(values: str, extra: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    args = [_helm(), "template", "rel", str(CHART), "--namespace", "ns"]
    if values:
        path = CHART / "ci" / values if (CHART / "ci" / values).exists() else CHART / values
        args += ["-f", str(path)]
    args += list(extra)
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def render(values: str = "", *extra: str) -> list[dict[str, Any]]:
    return list(_render_cached(values, extra))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind}/{name} in {[(d['kind'], d['metadata']['name']) for d in docs]}")


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("values", ALL_SETS)
def test_every_pod_runs_restricted(values: str) -> None:
    docs = render(values)
    assert {w["metadata"]["name"] for w in workloads(docs)} >= {"rel-asyncopd-rollout", "rel-asyncopd-learner"}
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        where = f"{values or 'defaults'}: {w['kind']}/{w['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert pod["securityContext"].get("runAsUser", 1) != 0, where
        # Pod Security Standard "restricted": only these volume types
        allowed = {"configMap", "emptyDir", "secret", "persistentVolumeClaim", "downwardAPI", "projected", "csi"}
        for v in pod.get("volumes", []):
            assert set(v) - {"name"} <= allowed, (where, v)
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["runAsNonRoot"] is True, where
            assert not sc.get("privileged"), where
            assert all("hostPort" not in p for p in c.get("ports", [])), where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            # a read-only root needs writable scratch space
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where


@pytest.mark.parametrize("values", ["", "replicas-8-values.yaml"])
def test_probes_ask_the_grpc_health_service_on_the_serving_port(values: str) -> None:
    docs = render(values, "--set", "tls.enabled=false")  # the kubelet's grpc probe speaks no TLS
    seen = set()
    for w in workloads(docs):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        if component not in SERVE_COMPONENTS:
            continue
        seen.add(component)
        (c,) = w["spec"]["template"]["spec"]["containers"]
        assert c["args"][:2] == ["serve", component]
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": grpc_port}, (component, probe)
    assert seen == (SERVE_COMPONENTS if values else SERVE_COMPONENTS - {"autoscaler"})


def test_with_tls_the_probes_check_grpc_health_over_mtls() -> None:
    docs = render("tls-values.yaml")
    cache = find(docs, "Deployment", "rel-asyncopd-cache")
    (c,) = cache["spec"]["template"]["spec"]["containers"]
    cmd = c["readinessProbe"]["exec"]["command"]
    assert cmd[:3] == ["python", "-m", "asyncopd.observability.health_probe"]
    assert cmd[cmd.index("--port") + 1] == "50051"
    assert cmd[cmd.index("--server-name") + 1] == "rel-asyncopd-cache"
    assert {"/etc/asyncopd-tls/ca.crt", "/etc/asyncopd-tls/tls.crt", "/etc/asyncopd-tls/tls.key"} <= set(cmd)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == "/etc/asyncopd-tls" and mounts["tls"]["readOnly"] is True
    vols = {v["name"]: v for v in cache["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "asyncopd-mtls-cache"


@pytest.mark.parametrize(
    ("values", "replicas"), [("replicas-1-values.yaml", 1), ("replicas-8-values.yaml", 8), ("", 2)]
)
def test_rollout_replicas_come_from_values(values: str, replicas: int) -> None:
    docs = render(values)
    rollout = find(docs, "Deployment", "rel-asyncopd-rollout")
    assert rollout["spec"]["replicas"] == replicas
    config = yaml.safe_load(find(docs, "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"])
    assert config["rollout"]["replicas"] == replicas
    assert (
        find(render(values, "--set", "rollout.replicas=5"), "Deployment", "rel-asyncopd-rollout")["spec"]["replicas"]
        == 5
    )


def test_autoscaler_keeps_its_replica_choice_across_upgrades() -> None:
    upgraded = find(render("replicas-8-values.yaml", "--is-upgrade"), "Deployment", "rel-asyncopd-rollout")
    assert "replicas" not in upgraded["spec"]
    # without the autoscaler, an upgrade applies rollout.replicas
    plain = find(render("replicas-1-values.yaml", "--is-upgrade"), "Deployment", "rel-asyncopd-rollout")
    assert plain["spec"]["replicas"] == 1


def test_gpu_requests_node_selector_and_tolerations_of_rollouts() -> None:
    pod = find(render("replicas-8-values.yaml"), "Deployment", "rel-asyncopd-rollout")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


@pytest.mark.parametrize("values", ALL_SETS)
def test_configmap_loads_with_the_project_config_loader(values: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ASYNCOPD_REDIS_PASSWORD", raising=False)
    docs = render(values)
    text = find(docs, "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"]
    assert "password" not in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = load_config(path)
    # the addresses in the config are the Services the chart creates
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    cache_host, cache_port = config.endpoints.cache.split(":")
    assert cache_host in services
    assert int(cache_port) == config.cache.server.port
    learner_host, learner_port = config.endpoints.learner.split(":")
    assert learner_host == "rel-asyncopd-learner-0.rel-asyncopd-learner.ns.svc"
    assert services["rel-asyncopd-learner"]["spec"]["clusterIP"] == "None"
    assert int(learner_port) == config.learner.server.port
    # the weight-broadcast rendezvous is advertised under the same stable name, on the Service's port
    assert config.weightsync.advertise_host == learner_host
    assert config.weightsync.store_port in {p["port"] for p in services["rel-asyncopd-learner"]["spec"]["ports"]}
    assert config.learner.resume is True
    assert config.cache.server.host == "0.0.0.0"
    assert config.autoscaler.deployment == "rel-asyncopd-rollout"
    assert config.autoscaler.namespace == "ns"
    # the learner checkpoints onto its own volume
    learner = find(docs, "StatefulSet", "rel-asyncopd-learner")["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in learner["containers"][0]["volumeMounts"]}
    assert any(config.learner.checkpoint_dir.startswith(m + "/") for m in mounts)
    # the password reaches the data plane only (the cache for metadata; rollout, teacher and
    # learner read and write payload frames), through the env var the loader reads
    monkeypatch.setenv("ASYNCOPD_REDIS_PASSWORD", "s3cret")
    assert load_config(path).redis.password is not None
    for w in workloads(docs):
        env = {e["name"] for c in w["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        assert ("ASYNCOPD_REDIS_PASSWORD" in env) == (component in DATA_PLANE), component


ROLE_CERTS = ["cache", "learner", "rollout", "teacher"]


@pytest.mark.parametrize("values", ["", "values-production.yaml"])
def test_tls_is_on_by_default_with_a_cert_manager_certificate_per_role(values: str) -> None:
    docs = render(values)
    config = yaml.safe_load(find(docs, "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"])
    assert config["tls"]["enabled"] is True and config["tls"]["require_client_cert"] is True
    roles = ROLE_CERTS + (["autoscaler"] if values else [])  # production runs the autoscaler
    for role in roles:
        cert = find(docs, "Certificate", f"rel-asyncopd-tls-{role}")["spec"]
        assert cert["uris"] == [f"spiffe://asyncopd/{role}"], role  # the role the servers authorise
        assert cert["secretName"] == f"rel-asyncopd-tls-{role}"
        assert f"rel-asyncopd-{role}" in cert["dnsNames"] and {"server auth", "client auth"} <= set(cert["usages"])
        assert cert["issuerRef"]["name"] == "rel-asyncopd-ca"
    learner = find(docs, "Certificate", "rel-asyncopd-tls-learner")["spec"]
    assert "rel-asyncopd-learner-0.rel-asyncopd-learner.ns.svc" in learner["dnsNames"]  # endpoints.learner
    assert find(docs, "Certificate", "rel-asyncopd-ca")["spec"]["isCA"] is True
    assert find(docs, "Issuer", "rel-asyncopd-ca")["spec"]["ca"]["secretName"] == "rel-asyncopd-ca"
    # Every pod mounts its own role's identity, never another's.
    for w in workloads(docs):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in SERVE_COMPONENTS:  # Redis speaks its own protocol (redis.*), not gRPC
            vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
            assert vols["tls"]["secret"]["secretName"] == f"rel-asyncopd-tls-{component}", component


def test_an_issuer_of_your_own_replaces_the_bootstrapped_ca() -> None:
    docs = render(
        "", "--set", "tls.certManager.issuerRef.name=corp-ca", "--set", "tls.certManager.issuerRef.kind=ClusterIssuer"
    )
    assert not [d for d in docs if d["kind"] == "Issuer"]
    cert = find(docs, "Certificate", "rel-asyncopd-tls-rollout")["spec"]
    assert cert["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_existing_secret_path_renders_no_certificate_and_mounts_one_secret_per_role() -> None:
    docs = render("tls-values.yaml")
    assert not [d for d in docs if d["kind"] in ("Certificate", "Issuer")]
    mounted = {}
    for w in workloads(docs):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in SERVE_COMPONENTS:
            vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
            mounted[component] = vols["tls"]["secret"]["secretName"]
    assert mounted == {role: f"asyncopd-mtls-{role}" for role in ROLE_CERTS}
    # An unnamed role falls back to <fullname>-tls-<role>.
    docs = render("", "--set", "tls.certManager.enabled=false", "--set", "autoscaler.enabled=true")
    auto = find(docs, "Deployment", "rel-asyncopd-autoscaler")["spec"]["template"]["spec"]["volumes"]
    assert {v["name"]: v for v in auto}["tls"]["secret"]["secretName"] == "rel-asyncopd-tls-autoscaler"


def test_tls_values_configure_mtls_and_external_redis_the_url() -> None:
    tls = yaml.safe_load(find(render("tls-values.yaml"), "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"])
    assert tls["tls"] == {
        "enabled": True,
        "cert_file": "/etc/asyncopd-tls/tls.crt",
        "key_file": "/etc/asyncopd-tls/tls.key",
        "ca_file": "/etc/asyncopd-tls/ca.crt",
        "require_client_cert": True,
    }
    prod = yaml.safe_load(
        find(render("values-production.yaml"), "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"]
    )
    assert prod["tls"]["enabled"] is True
    docs = render("external-redis-values.yaml")
    config = yaml.safe_load(find(docs, "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"])
    assert config["redis"]["url"] == "rediss://redis.example.internal:6380/0"
    assert not [d for d in docs if d["metadata"]["name"].startswith("rel-asyncopd-redis")]
    cache = find(docs, "Deployment", "rel-asyncopd-cache")["spec"]["template"]["spec"]["containers"][0]
    ref = next(e for e in cache["env"] if e["name"] == "ASYNCOPD_REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "managed-redis", "key": "password"}


# Who reaches Redis: the cache (metadata) and the services that move payload frames themselves.
DATA_PLANE = ("cache", "rollout", "teacher", "learner")


def test_only_the_data_plane_reaches_redis() -> None:
    docs = render()
    policy = find(docs, "NetworkPolicy", "rel-asyncopd-redis")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    peers = rule["from"]
    assert [p["podSelector"]["matchLabels"] for p in peers] == [
        {"app.kubernetes.io/name": "asyncopd", "app.kubernetes.io/instance": "rel", "app.kubernetes.io/component": c}
        for c in DATA_PLANE
    ]  # never the autoscaler
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    # the cache pods carry exactly the labels that rule selects
    cache_labels = find(docs, "Deployment", "rel-asyncopd-cache")["spec"]["template"]["metadata"]["labels"]
    assert peers[0]["podSelector"]["matchLabels"].items() <= cache_labels.items()
    assert not [d for d in render("monitoring-off-values.yaml") if d["kind"] == "NetworkPolicy"]


def test_autoscaler_rbac_is_get_and_patch_on_the_rollout_scale_only() -> None:
    docs = render("replicas-8-values.yaml")
    role = find(docs, "Role", "rel-asyncopd-autoscaler")
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": ["rel-asyncopd-rollout"],
            "verbs": ["get", "patch"],
        }
    ]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    binding = find(docs, "RoleBinding", "rel-asyncopd-autoscaler")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-asyncopd-autoscaler", "namespace": "ns"}]
    pods = {w["metadata"]["name"]: w["spec"]["template"]["spec"] for w in workloads(docs)}
    assert pods["rel-asyncopd-autoscaler"]["serviceAccountName"] == "rel-asyncopd-autoscaler"
    # nobody else gets an API token
    for name, pod in pods.items():
        assert pod.get("automountServiceAccountToken") is (name == "rel-asyncopd-autoscaler"), name
    assert not [d for d in render() if d["kind"] == "Role"]


def test_learner_is_a_single_statefulset_that_checkpoints_before_it_is_killed() -> None:
    docs = render()
    learner = find(docs, "StatefulSet", "rel-asyncopd-learner")
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["serviceName"] == "rel-asyncopd-learner"
    assert learner["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 300
    assert learner["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    headless = find(docs, "Service", "rel-asyncopd-learner")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"] for p in headless["spec"]["ports"]} == {"grpc", "weightsync", "metrics"}


def test_pod_disruption_budgets_cover_every_component() -> None:
    docs = render()
    pdbs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {f"rel-asyncopd-{c}" for c in ("rollout", "teacher", "cache", "learner", "redis")}
    assert pdbs["rel-asyncopd-learner"] == {
        "minAvailable": 1,
        "selector": {
            "matchLabels": find(docs, "StatefulSet", "rel-asyncopd-learner")["spec"]["selector"]["matchLabels"]
        },
    }


OPERATOR_GROUP = "monitoring.coreos.com/"


@pytest.mark.parametrize("values", [s for s in ALL_SETS if s != "monitoring-on-values.yaml"])
def test_without_monitoring_values_no_prometheus_operator_kind_is_rendered(values: str) -> None:
    # A cluster without the Prometheus Operator has no such CRDs: `helm install` would fail with
    # "no matches for kind ServiceMonitor". Defaults and production must install there.
    kinds = [(d["apiVersion"], d["kind"]) for d in render(values) if d["apiVersion"].startswith(OPERATOR_GROUP)]
    assert not kinds, (values or "defaults", kinds)


def test_monitoring_is_toggleable_and_scrapes_every_service_metrics_port() -> None:
    docs = render("monitoring-on-values.yaml")
    monitor = find(docs, "ServiceMonitor", "rel-asyncopd")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    # kube-prometheus-stack's Prometheus selects ServiceMonitors by its release label
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"], "targetLabel": "release"} in (
        monitor["spec"]["endpoints"][0]["relabelings"]
    )
    components = set(monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and d["metadata"]["labels"].get("app.kubernetes.io/component") in components
    ]
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in services} == components - {"autoscaler"}
    for s in services:
        assert "metrics" in {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]
    dashboard = find(docs, "ConfigMap", "rel-asyncopd-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["asyncopd.json"].strip() == (CHART / "dashboards/asyncopd.json").read_text().strip()
    off = render("monitoring-off-values.yaml")
    operator_kinds = ("ServiceMonitor", "PrometheusRule")
    assert not [d for d in off if d["kind"] in operator_kinds or d["metadata"]["name"].endswith("-dashboard")]


def test_prometheus_rule_ships_the_rules_of_deploy_prometheus() -> None:
    rule = find(render("monitoring-on-values.yaml"), "PrometheusRule", "rel-asyncopd")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    source = ROOT / "deploy" / "prometheus" / "rules"
    expected = [g for f in ("recording.yml", "alerts.yml") for g in yaml.safe_load((source / f).read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    names = {r.get("record") or r.get("alert") for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"asyncopd:learner_idle:ratio5m", "AsyncOPDServiceDown"} <= names
    for path in sorted(source.glob("*.yml")):
        assert (CHART / "rules" / path.name).read_bytes() == path.read_bytes(), (
            f"charts/asyncopd/rules/{path.name} is stale: run deploy/dev/chart-check.sh"
        )


def test_chart_dashboard_is_the_one_in_deploy_grafana() -> None:
    source = ROOT / "deploy" / "grafana" / "asyncopd.json"
    assert source.exists(), "deploy/grafana/asyncopd.json (the dashboard's home) is missing"
    assert (CHART / "dashboards" / "asyncopd.json").read_bytes() == source.read_bytes(), (
        "the chart's copy is stale: run deploy/dev/chart-check.sh"
    )


def test_schema_rejects_a_redis_password_in_the_configmap_and_unknown_keys() -> None:
    helm = _helm()
    for bad in ("config.redis.password=x", "rollout.replica=3", "redis.mode=external"):
        r = subprocess.run(
            [helm, "template", "rel", str(CHART), "--set", bad], check=False, capture_output=True, text=True
        )
        assert r.returncode != 0, bad
        assert "schema" in r.stderr, r.stderr


def test_cpu_value_set_requests_no_gpus() -> None:
    text = yaml.safe_dump_all(render("replicas-1-values.yaml"))
    assert "nvidia.com/gpu" not in text


def test_notes_tell_how_to_watch_the_run() -> None:
    args = [_helm(), "install", "exp1", str(CHART), "-n", "opd", "--dry-run=client"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    notes = out[out.index("NOTES:") :]
    assert "kubectl -n opd logs -f statefulset/exp1-asyncopd-learner" in notes
    assert "kubectl -n opd scale deployment/exp1-asyncopd-rollout" in notes
    assert "port-forward svc/exp1-asyncopd-cache 9400" in notes


def _pod(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    kind = "StatefulSet" if component == "learner" else "Deployment"
    return find(docs, kind, f"rel-asyncopd-{component}")["spec"]["template"]


def test_extension_points_reach_the_pods_of_their_role() -> None:
    docs = render("extensions-values.yaml")
    rollout = _pod(docs, "rollout")
    spec, (c,) = rollout["spec"], rollout["spec"]["containers"]
    assert rollout["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert rollout["metadata"]["labels"]["example.com/role"] == "generator"
    assert rollout["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
    assert rollout["metadata"]["annotations"]["example.com/scrape"] == "true"
    assert "checksum/config" in rollout["metadata"]["annotations"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert c["envFrom"] == [{"secretRef": {"name": "wandb"}}, {"configMapRef": {"name": "vllm-tuning"}}]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["datasets"] == {"name": "datasets", "mountPath": "/datasets", "readOnly": True}
    assert mounts["vllm-cache"]["mountPath"] == "/var/cache/vllm"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["datasets"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
    assert volumes["vllm-cache"]["emptyDir"] == {"sizeLimit": "10Gi"}
    assert spec["priorityClassName"] == "training-high"
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert "nodeAffinity" in spec["affinity"]
    # the chart-wide keys reach every pod; a role's keys only that role
    for component in ("cache", "teacher", "learner"):
        pod = _pod(docs, component)
        (container,) = pod["spec"]["containers"]
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a", component
        assert "datasets" in {m["name"] for m in container["volumeMounts"]}, component
        assert container["envFrom"] == [{"secretRef": {"name": "wandb"}}], component
        assert "HF_TOKEN" not in {e["name"] for e in container["env"]}, component
        assert "example.com/role" not in pod["metadata"]["labels"], component
    assert _pod(docs, "learner")["spec"]["priorityClassName"] == "training-critical"
    assert "runtimeClassName" not in _pod(docs, "cache")["spec"]
    assert {e["name"] for e in _pod(docs, "cache")["spec"]["containers"][0]["env"]} >= {"ASYNCOPD_LOG_LEVEL"}


def test_pod_labels_never_override_the_selector_labels() -> None:
    docs = render("extensions-values.yaml")
    learner = find(docs, "StatefulSet", "rel-asyncopd-learner")
    assert learner["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "learner"
    pod_labels = learner["spec"]["template"]["metadata"]["labels"]
    assert learner["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_defaults_add_no_extension_fields() -> None:
    for w in workloads(render()):
        spec = w["spec"]["template"]["spec"]
        assert not {"priorityClassName", "runtimeClassName", "topologySpreadConstraints"} & set(spec)
        assert all("envFrom" not in c for c in spec["containers"])


@pytest.mark.parametrize(
    "bad",
    [
        "rollout.priorityClassName=1",
        "teacher.podLabels.team=1",
        "cache.extraVolumes[0].emptyDir=x",
        "learner.topologySpreadConstraints[0].maxSkew=1",
        "rollout.podlabels.a=b",
    ],
)
def test_schema_rejects_malformed_extension_points(bad: str) -> None:
    r = subprocess.run(
        [_helm(), "template", "rel", str(CHART), "--set", bad], check=False, capture_output=True, text=True
    )
    assert r.returncode != 0, bad
    assert "schema" in r.stderr, r.stderr


def _schema_generator() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_config_schema", ROOT / "deploy/dev/chart_config_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_values_schema_embeds_the_run_config_schema_as_generated() -> None:
    gen = _schema_generator()
    committed = (CHART / "values.schema.json").read_text()
    assert committed == gen.render(gen.embedded(json.loads(committed))), (
        "values.schema.json is stale: run python deploy/dev/chart_config_schema.py (make chart)"
    )
    schema = json.loads(committed)
    from asyncopd.config import RunConfig

    assert set(schema["properties"]["config"]["properties"]) == set(RunConfig.model_fields)
    assert schema["properties"]["config"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "bad",
    [
        "config.learner.stepz=3",  # a typo
        "config.learner.steps=many",  # a wrong type
        "config.rollout.engine=sglang",  # not one of the engines
        "config.modelz.student=x",  # a misspelt section
    ],
)
@pytest.mark.parametrize("command", ["template", "lint"])
def test_a_typo_in_the_run_config_fails_helm_not_the_pods(bad: str, command: str) -> None:
    args = [_helm(), command, *(["rel"] if command == "template" else []), str(CHART), "--set", bad]
    r = subprocess.run(args, check=False, capture_output=True, text=True)
    assert r.returncode != 0, (command, bad, r.stdout)
    assert "schema" in (r.stderr + r.stdout), r.stderr + r.stdout
    # ... and the project's own loader rejects the same value: the two schemas agree
    section, _, rest = bad.removeprefix("config.").partition(".")
    key, _, value = rest.partition("=")
    from asyncopd.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError):
        config_from_dict({section: {key: value}})


def test_keda_scaled_object_scales_the_rollouts_on_the_learner_idle_fraction_of_this_release() -> None:
    docs = render("keda-values.yaml")
    scaled = find(docs, "ScaledObject", "rel-asyncopd-rollout")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rel-asyncopd-rollout",
    }
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 12)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert 'phase="data_wait"' in query and "asyncopd_learner_step_phase_seconds_sum" in query
    assert query.count('namespace="ns", release="rel"') == 2
    assert float(trigger["metadata"]["threshold"]) > 0
    # the same signal as the recording rule the built-in autoscaler's alert reads
    recording = (ROOT / "deploy/prometheus/rules/recording.yml").read_text()
    assert 'asyncopd_learner_step_phase_seconds_sum{phase="data_wait"}' in recording
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    upgraded = find(render("keda-values.yaml", "--is-upgrade"), "Deployment", "rel-asyncopd-rollout")
    assert "replicas" not in upgraded["spec"]


def test_hpa_example_targets_the_rollouts_with_an_external_metric() -> None:
    hpa = find(render("hpa-values.yaml"), "HorizontalPodAutoscaler", "rel-asyncopd-rollout")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rel-asyncopd-rollout"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"namespace": "ns", "release": "rel"}
    assert not [d for d in render() if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]


@pytest.mark.parametrize(
    "sets",
    [
        ["autoscaler.enabled=true", "hpa.enabled=true"],
        ["keda.enabled=true", "keda.prometheusAddress=http://p:9090", "hpa.enabled=true"],
        ["keda.enabled=true"],  # no Prometheus address
    ],
)
def test_rollout_scaling_owners_are_exclusive_and_complete(sets: list[str]) -> None:
    args = [_helm(), "template", "rel", str(CHART)] + [a for s in sets for a in ("--set", s)]
    r = subprocess.run(args, check=False, capture_output=True, text=True)
    assert r.returncode != 0, sets


def test_model_cache_job_downloads_once_into_a_shared_volume_the_roles_mount_read_only() -> None:
    docs = render("model-cache-values.yaml")
    pvc = find(docs, "PersistentVolumeClaim", "rel-asyncopd-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    job = find(docs, "Job", "rel-asyncopd-model-cache")
    assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    script, models, root = c["args"]
    compile(script, "model-cache", "exec")  # the download script is valid Python
    assert json.loads(models) == [
        {"repo": "Qwen/Qwen3-1.7B", "revision": "main"},
        {"repo": "Qwen/Qwen3-8B", "revision": "main"},
    ]
    assert root == "/models"
    token = next(e for e in c["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
    for component in ("rollout", "teacher", "learner", "cache"):
        spec = _pod(docs, component)["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        if component == "cache":
            assert "models" not in mounts
            continue
        assert env["HF_HUB_OFFLINE"] == "1", component
        assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}, component
        claim = next(v for v in spec["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
        assert claim == {"claimName": "rel-asyncopd-models", "readOnly": True}, component
    config = yaml.safe_load(find(docs, "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"])
    assert config["models"]["student"].startswith("/models/Qwen/")
    # off by default: no Job, no PVC, pods may download
    default = render()
    assert not [d for d in default if d["kind"] == "Job" or d["metadata"]["name"].endswith("-models")]
    rollout_env = {e["name"] for e in _pod(default, "rollout")["spec"]["containers"][0]["env"]}
    assert "HF_HUB_OFFLINE" not in rollout_env


def test_one_shared_image_by_default_and_the_role_targets_with_image_per_role() -> None:
    def images(docs: list[dict[str, Any]]) -> dict[str, str]:
        return {
            c["name"]: c["image"]
            for w in workloads(docs)
            for c in w["spec"]["template"]["spec"]["containers"]
            if c["name"] in ("cache", "rollout", "teacher", "learner", "autoscaler")
        }

    shared = images(render("", "--set", "autoscaler.enabled=true", "--set", "image.tag=1.2.3"))
    assert set(shared) == {"cache", "rollout", "teacher", "learner", "autoscaler"}
    assert set(shared.values()) == {"ghcr.io/asyncopd/asyncopd:1.2.3"}
    per_role = images(
        render("", "--set", "autoscaler.enabled=true", "--set", "image.tag=1.2.3", "--set", "image.perRole=true")
    )
    assert per_role == {role: f"ghcr.io/asyncopd/asyncopd:1.2.3-{role}" for role in shared}


def test_several_cache_replicas_are_reached_round_robin_through_a_headless_service() -> None:
    docs = render("", "--set", "cache.replicas=3")
    assert find(docs, "Deployment", "rel-asyncopd-cache")["spec"]["replicas"] == 3
    pods = find(docs, "Service", "rel-asyncopd-cache-pods")
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["ports"][0]["name"] == "grpc"
    config = yaml.safe_load(find(docs, "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"])
    assert config["endpoints"]["cache"] == "dns:///rel-asyncopd-cache-pods:50051"
    cert = find(docs, "Certificate", "rel-asyncopd-tls-cache")
    assert "rel-asyncopd-cache-pods" in cert["spec"]["dnsNames"], "TLS clients check the name they dial"
    one = render()
    assert not [d for d in one if d["metadata"]["name"] == "rel-asyncopd-cache-pods"]
    config = yaml.safe_load(find(one, "ConfigMap", "rel-asyncopd-config")["data"]["config.yaml"])
    assert config["endpoints"]["cache"] == "rel-asyncopd-cache:50051"
