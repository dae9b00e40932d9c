"""The autoscaler's only contact with Kubernetes: read and patch one Deployment's scale.

Uses exactly two API calls, GET and PATCH on
`/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale`, which is all the chart's Role
grants (verbs get/patch on `deployments/scale`, for that one Deployment name). It knows
nothing of the policy or the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from kubernetes import client, config

# Where a pod finds its own namespace (mounted with the service account token).
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# A merge patch of spec.replicas: the client's default for PATCH is JSON-patch, which takes a
# list of operations, not an object.
MERGE_PATCH = "application/merge-patch+json"


def in_cluster_api() -> client.ApiClient:
    """An API client from the pod's service account (token, CA and host from the environment)."""
    try:
        config.load_incluster_config()
    except config.ConfigException as exc:
        raise RuntimeError(
            f"no in-cluster Kubernetes config ({exc}): `asyncopd serve autoscaler` runs inside a pod of the Helm chart"
        ) from None
    return client.ApiClient()


def own_namespace() -> str:
    """The namespace of the pod this runs in."""
    try:
        return NAMESPACE_FILE.read_text().strip()
    except OSError as exc:
        raise RuntimeError(
            f"cannot read {NAMESPACE_FILE} ({exc.strerror}); set autoscaler.namespace when not running in a pod"
        ) from None


class DeploymentScale:
    """The replica count of one Deployment, through its scale subresource."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, timeout_s: float = 10.0) -> None:
        self._apps = client.AppsV1Api(api)
        self.namespace = namespace
        self.name = name
        self._timeout = timeout_s

    def get(self) -> int:
        """The Deployment's desired replicas (spec.replicas of its Scale)."""
        scale = self._apps.read_namespaced_deployment_scale(self.name, self.namespace, _request_timeout=self._timeout)
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    def set(self, replicas: int) -> int:
        """Patch spec.replicas; returns the count the API server accepted."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        scale = self._apps.patch_namespaced_deployment_scale(
            self.name,
            self.namespace,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
            _request_timeout=self._timeout,
        )
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0
