"""The autoscaler's Kubernetes adapter against a local stand-in for the API server.

No kube-apiserver can run here (none is installable, there is no container engine), so this
is the one faked edge: a small HTTP server on loopback that serves the real Kubernetes API
paths of the Deployment scale subresource,
`GET/PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`, with the real object
shapes (autoscaling/v1 Scale, meta/v1 Status errors), and enforces the chart's Role (get/patch
on `deployments/scale` of one resource name) the way RBAC would: 403 for anything else. The
`kubernetes` client, the adapter, the controller and the policy under test are the real ones.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from asyncopd.autoscaler.controller import Controller
from asyncopd.autoscaler.kube import MERGE_PATCH, DeploymentScale
from asyncopd.autoscaler.policy import PolicyParams, ScalingPolicy
from asyncopd.autoscaler.signals import SignalWindow
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.service

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([a-z0-9-]+)/deployments/([a-z0-9.-]+)/scale$")
TOKEN = "test-service-account-token"


@dataclass
class ApiServerStandIn:
    """State and request log of the stand-in; `allowed` is the Role: {(verb, namespace, name)}."""

    replicas: dict[tuple[str, str], int]
    allowed: set[tuple[str, str, str]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _handle(self, verb: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                standin.requests.append(
                    {
                        "method": self.command,
                        "path": self.path.split("?")[0],
                        "content_type": self.headers.get("Content-Type"),
                        "auth": self.headers.get("Authorization"),
                        "body": body,
                    }
                )
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._status(401, "Unauthorized", "Unauthorized")
                m = SCALE_PATH.match(self.path.split("?")[0])
                if m is None:
                    return self._status(
                        404, "NotFound", f"the server could not find the requested resource ({self.path})"
                    )
                ns, name = m.groups()
                if (verb, ns, name) not in standin.allowed:
                    return self._status(
                        403,
                        "Forbidden",
                        f'deployments.apps "{name}" is forbidden: cannot {verb} resource "deployments/scale" in "{ns}"',
                    )
                if (ns, name) not in standin.replicas:
                    return self._status(404, "NotFound", f'deployments.apps "{name}" not found')
                if verb == "patch":
                    if self.headers.get("Content-Type") not in (MERGE_PATCH, "application/strategic-merge-patch+json"):
                        return self._status(415, "UnsupportedMediaType", "unsupported patch type")
                    patch = json.loads(body)
                    replicas = patch.get("spec", {}).get("replicas")
                    if not isinstance(replicas, int) or replicas < 0:
                        return self._status(422, "Invalid", "spec.replicas: Invalid value: must be >= 0")
                    standin.replicas[(ns, name)] = replicas
                n = standin.replicas[(ns, name)]
                self._send(
                    200,
                    {
                        "kind": "Scale",
                        "apiVersion": "autoscaling/v1",
                        "metadata": {"name": name, "namespace": ns, "resourceVersion": str(len(standin.requests))},
                        "spec": {"replicas": n},
                        "status": {"replicas": n, "selector": f"app.kubernetes.io/component=rollout,name={name}"},
                    },
                )

            def do_GET(self) -> None:
                self._handle("get")

            def do_PATCH(self) -> None:
                self._handle("patch")

            def do_PUT(self) -> None:
                self._handle("update")

            def do_POST(self) -> None:
                self._handle("create")

            def do_DELETE(self) -> None:
                self._handle("delete")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def apiserver() -> Iterator[ApiServerStandIn]:
    s = ApiServerStandIn(
        replicas={("ns", "rel-asyncopd-rollout"): 2, ("ns", "other"): 5},
        allowed={("get", "ns", "rel-asyncopd-rollout"), ("patch", "ns", "rel-asyncopd-rollout")},
    )
    s.start()
    yield s
    s.stop()


def api_client(host: str) -> client.ApiClient:
    cfg = client.Configuration(host=host)
    cfg.api_key = {"BearerToken": TOKEN}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(cfg)


def test_reads_and_patches_the_rollout_scale(apiserver: ApiServerStandIn) -> None:
    scale = DeploymentScale(api_client(apiserver.host), "ns", "rel-asyncopd-rollout")
    assert scale.get() == 2
    assert scale.set(5) == 5
    assert apiserver.replicas[("ns", "rel-asyncopd-rollout")] == 5
    assert scale.get() == 5
    patch = apiserver.requests[1]
    assert patch["method"] == "PATCH"
    assert patch["content_type"] == MERGE_PATCH
    assert json.loads(patch["body"]) == {"spec": {"replicas": 5}}
    assert {r["auth"] for r in apiserver.requests} == {f"Bearer {TOKEN}"}


def test_uses_only_what_the_chart_role_grants(apiserver: ApiServerStandIn) -> None:
    scale = DeploymentScale(api_client(apiserver.host), "ns", "rel-asyncopd-rollout")
    scale.get()
    scale.set(3)
    scale.set(1)
    path = "/apis/apps/v1/namespaces/ns/deployments/rel-asyncopd-rollout/scale"
    # exactly the Role's verbs (get, patch) on exactly its resource (deployments/scale, one name)
    assert {(r["method"], r["path"]) for r in apiserver.requests} == {("GET", path), ("PATCH", path)}


def test_rbac_refusal_and_missing_deployment_are_loud(apiserver: ApiServerStandIn) -> None:
    other = DeploymentScale(api_client(apiserver.host), "ns", "other")
    with pytest.raises(ApiException) as err:
        other.get()
    assert err.value.status == 403
    assert apiserver.replicas[("ns", "other")] == 5
    apiserver.allowed.add(("get", "ns", "gone"))
    with pytest.raises(ApiException) as err:
        DeploymentScale(api_client(apiserver.host), "ns", "gone").get()
    assert err.value.status == 404
    with pytest.raises(ValueError, match="replicas"):
        DeploymentScale(api_client(apiserver.host), "ns", "rel-asyncopd-rollout").set(-1)


def _stats(scored: int) -> dict[str, Any]:
    # max_staleness 1, batch 8: the cache's Stats report the window (1 + 1) * 8
    return {
        "queue_depth": {"scored": scored},
        "max_staleness": 1,
        "staleness_window": 16,
        "bytes_held": 0,
        "byte_budget": 10**9,
    }


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def test_controller_scales_the_deployment_from_pipeline_signals(apiserver: ApiServerStandIn) -> None:
    """Learner starved for `sustain` ticks -> +1 replica; admission blocked -> -1; bounds held."""
    scale = DeploymentScale(api_client(apiserver.host), "ns", "rel-asyncopd-rollout")
    feed = {"stats": _stats(0)}
    clock = Clock()
    params = PolicyParams(
        min_replicas=1,
        max_replicas=3,
        scale_up_threshold=0.5,
        scale_down_threshold=0.5,
        sustain=2,
        cooldown_up_s=10,
        cooldown_down_s=10,
    )
    ctl = Controller(
        ScalingPolicy(params),
        SignalWindow(batch_size=8, window=2),
        scale,
        read_stats=lambda: feed["stats"],
        read_status=lambda: {"finished": False},
        clock=clock,
    )
    assert ctl.tick().replicas == 2  # starved 1/2
    clock.now = 1
    assert ctl.tick().replicas == 3  # starved 2/2: patched
    assert apiserver.replicas[("ns", "rel-asyncopd-rollout")] == 3
    for t in (20, 21):  # at max: holds
        clock.now = t
        assert ctl.tick().replicas == 3
    feed["stats"] = _stats(16)  # (max_staleness + 1) batches ready: admission blocks
    for t in (30, 31, 32):
        clock.now = t
        ctl.tick()
    assert apiserver.replicas[("ns", "rel-asyncopd-rollout")] == 2
    patches = [r for r in apiserver.requests if r["method"] == "PATCH"]
    assert [json.loads(r["body"])["spec"]["replicas"] for r in patches] == [3, 2]


def test_manual_scaling_is_respected_within_bounds_and_dry_run_never_patches(apiserver: ApiServerStandIn) -> None:
    scale = DeploymentScale(api_client(apiserver.host), "ns", "rel-asyncopd-rollout")
    params = PolicyParams(min_replicas=1, max_replicas=4, scale_up_threshold=0.5, scale_down_threshold=0.5)
    ctl = Controller(
        ScalingPolicy(params),
        SignalWindow(batch_size=8, window=1),
        scale,
        read_stats=lambda: _stats(8),  # one batch ready: neither starved nor blocked
        read_status=lambda: {"finished": False},
        dry_run=True,
    )
    apiserver.replicas[("ns", "rel-asyncopd-rollout")] = 3  # `kubectl scale --replicas 3`
    assert ctl.tick().replicas == 3
    apiserver.replicas[("ns", "rel-asyncopd-rollout")] = 9  # beyond max: would be brought back...
    assert ctl.tick().replicas == 4
    assert apiserver.replicas[("ns", "rel-asyncopd-rollout")] == 9  # ...but dry run only logs
    assert not [r for r in apiserver.requests if r["method"] == "PATCH"]


def test_signals_from_a_real_cache_drive_the_scale(apiserver: ApiServerStandIn) -> None:
    """The real cache service (real Redis): an empty pipeline starves the learner (scale up);
    once admission has handed out all (max_staleness + 1) batches and refuses more, scale down."""
    from test_cache_harness import make_config, make_rollout, make_scores, running_cache, unique_prefix

    config = make_config(unique_prefix("autoscale"), max_staleness=1, **{"learner.batch_size": 4})
    scale = DeploymentScale(api_client(apiserver.host), "ns", "rel-asyncopd-rollout")
    params = PolicyParams(min_replicas=1, max_replicas=4, scale_up_threshold=1.0, scale_down_threshold=1.0)
    with running_cache(config) as (_, cache):
        ctl = Controller(
            ScalingPolicy(params),
            SignalWindow(batch_size=config.learner.batch_size, window=1),
            scale,
            read_stats=cache.stats,
            read_status=lambda: {"finished": False},
        )
        up = ctl.tick()
        assert (up.replicas, up.kind) == (3, "learner_starved")
        prompts, _, _ = cache.acquire_prompts("r0", 100)
        assert len(prompts) == 8  # (max_staleness + 1) * batch_size
        rollouts = [make_rollout(p, 0, seed=i) for i, p in enumerate(prompts)]
        cache.put_rollouts(rollouts)
        cache.put_scores([make_scores(r) for r in cache.claim_rollouts("t0", len(rollouts))])
        assert cache.acquire_prompts("r0", 100)[0] == []  # the cache really blocks admission now
        down = ctl.tick()
        assert (down.replicas, down.kind) == (2, "admission_blocked")
    assert apiserver.replicas[("ns", "rel-asyncopd-rollout")] == 2


def test_the_autoscaler_process_loop_against_real_cache_and_learner_services(apiserver: ApiServerStandIn) -> None:
    """`asyncopd serve autoscaler` minus signal handling and in-cluster credentials: the real
    cache and learner services on loopback, the stand-in API server, its own health server."""
    from asyncopd.autoscaler.main import run
    from asyncopd.config import config_from_dict
    from asyncopd.config.endpoints import ServerConfig
    from asyncopd.config.weightsync import WeightSyncConfig
    from asyncopd.learner.servicer import LearnerServicer, Progress, add_to_server
    from asyncopd.observability import metrics
    from asyncopd.observability.health_probe import check
    from asyncopd.weightsync.collective import CollectiveBroadcast
    from asyncopd.wire import rpc
    from test_cache_harness import make_config, running_cache, unique_prefix

    publisher = CollectiveBroadcast(WeightSyncConfig())
    learner = rpc.start_server(
        ServerConfig(port=0), [add_to_server(LearnerServicer(publisher, lambda: Progress(version=3)))], ["learner"]
    )
    cache_config = make_config(unique_prefix("autoscale-run"), max_staleness=1, **{"learner.batch_size": 4})
    try:
        with running_cache(cache_config) as (cache, _):
            health_port = free_port()
            data = cache_config.model_dump(mode="json")
            data["endpoints"] = {"cache": cache.address, "learner": learner.address}
            data["autoscaler"] = {
                "server": {"port": health_port},
                "namespace": "ns",
                "deployment": "rel-asyncopd-rollout",
                "interval_s": 0.05,
                "min_replicas": 1,
                "max_replicas": 4,
                "sustain": 1,
                "cooldown_up_s": 0,
            }
            config = config_from_dict(data)
            registry = metrics.ServiceRegistry(service="autoscaler", replica="a0", process_metrics=False)
            stop = threading.Event()
            thread = threading.Thread(
                target=run, args=(config, "a0", api_client(apiserver.host), stop, registry), daemon=True
            )
            thread.start()
            try:
                # nothing is ever scored: the learner starves, replicas climb to max and stay there
                deadline = time.monotonic() + 30
                while apiserver.replicas[("ns", "rel-asyncopd-rollout")] < 4 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert apiserver.replicas[("ns", "rel-asyncopd-rollout")] == 4
                assert check(health_port, server_name=None, ca=None, cert=None, key=None) is True
                time.sleep(0.3)
                assert apiserver.replicas[("ns", "rel-asyncopd-rollout")] == 4
                values = {(s.name, s.labels.get("reason")): s.value for fam in registry.collect() for s in fam.samples}
                assert values[("asyncopd_autoscaler_desired_replicas", None)] == 4
                assert values[("asyncopd_autoscaler_decisions_total", "learner_starved")] == 2
            finally:
                stop.set()
                thread.join(timeout=10)
            assert not thread.is_alive()
            assert check(health_port, server_name=None, ca=None, cert=None, key=None, timeout_s=0.5) is False
    finally:
        learner.stop(grace=None)
        publisher.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
