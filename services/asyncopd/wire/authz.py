"""Who may call what: the role of a peer, read from its client certificate, and the one table
of gRPC method -> roles every server enforces.

Each component runs with its own certificate whose subject alternative name carries its role:
the URI SAN `spiffe://asyncopd/<role>` (what the chart's cert-manager `Certificate`s issue) or
the DNS SAN `<role>.asyncopd`. Mutual TLS proves the peer holds a key the CA signed; this module
turns that into "only the learner publishes versions, pulls and acks batches and pushes
weights; only rollouts acquire prompts and put rollouts; only teachers claim rollouts and put
scores", so a compromised or misconfigured pod in the mesh cannot steer the run.

`caller_of(context)` names who is calling (host and certificate identities), for servicers that
bind state to the caller (the learner binds a weight-sync registration to whoever made it).

It knows the fully qualified method names of the services (`METHOD_ROLES`); it knows nothing of
what the methods do. With TLS off there is no peer identity and `rpc.start_server` does not
install the interceptor (local toy runs; it logs that authorisation is off).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import grpc

log = logging.getLogger(__name__)

# The component roles; a certificate names one (an operator's tools get `operator`).
ROLES = frozenset({"cache", "learner", "rollout", "teacher", "autoscaler", "operator"})
SPIFFE_PREFIX = "spiffe://asyncopd/"
DNS_SUFFIX = ".asyncopd"

# Any peer that presented a certificate the CA signed, whatever its role (or none).
AUTHENTICATED = frozenset({"*"})

_CACHE = "/asyncopd.v1.CacheService/"
_LEARNER = "/asyncopd.v1.LearnerService/"
_ROLLOUT = "/asyncopd.v1.RolloutService/"
_TEACHER = "/asyncopd.v1.TeacherService/"
_HEALTH = "/grpc.health.v1.Health/"

# The whole policy. A method missing here is refused to everyone (default deny): a new RPC
# needs a decision here before anyone can call it (tests/unit/test_authz_table.py checks every
# method of every service has one).
METHOD_ROLES: Mapping[str, frozenset[str]] = {
    # The prompt feed and rollouts: only rollout replicas.
    _CACHE + "AcquirePrompts": frozenset({"rollout"}),
    _CACHE + "ReleasePrompts": frozenset({"rollout"}),
    _CACHE + "PutRollouts": frozenset({"rollout"}),
    # Scoring: only teachers.
    _CACHE + "ClaimRollouts": frozenset({"teacher"}),
    _CACHE + "PutScores": frozenset({"teacher"}),
    # The training side, which moves the policy version: only the learner.
    _CACHE + "PullBatch": frozenset({"learner"}),
    _CACHE + "AckBatch": frozenset({"learner"}),
    _CACHE + "PublishVersion": frozenset({"learner"}),
    _CACHE + "BeginLearner": frozenset({"learner"}),
    _CACHE + "PromptCursor": frozenset({"learner"}),
    # Read-only views (the autoscaler, probes, dashboards' tools).
    _CACHE + "Stats": AUTHENTICATED,
    _LEARNER + "Status": AUTHENTICATED,
    _ROLLOUT + "Status": AUTHENTICATED,
    _HEALTH + "Check": AUTHENTICATED,
    _HEALTH + "Watch": AUTHENTICATED,
    _HEALTH + "List": AUTHENTICATED,
    # Weight sync: replicas join and leave; only the learner writes weights into a replica.
    _LEARNER + "RegisterReplica": frozenset({"rollout"}),
    _LEARNER + "UnregisterReplica": frozenset({"rollout"}),
    _ROLLOUT + "PushWeights": frozenset({"learner"}),
    # On-demand generation and scoring (evaluation and benchmarks), not part of a run.
    _ROLLOUT + "Generate": frozenset({"operator"}),
    _TEACHER + "Score": frozenset({"operator"}),
}


def roles_of(auth_context: Mapping[str, Iterable[bytes]]) -> frozenset[str]:
    """The roles a verified peer certificate names (URI `spiffe://asyncopd/<role>` or DNS
    `<role>.asyncopd` SANs); names that are not a known role are ignored."""
    found = set()
    for raw in auth_context.get("peer_uri", ()):
        name = raw.decode(errors="replace")
        if name.startswith(SPIFFE_PREFIX):
            found.add(name[len(SPIFFE_PREFIX) :])
    for raw in auth_context.get("peer_dns", ()):
        name = raw.decode(errors="replace")
        if name.endswith(DNS_SUFFIX):
            found.add(name[: -len(DNS_SUFFIX)])
    return frozenset(found & ROLES)


def refusal(method: str, roles: frozenset[str], authenticated: bool) -> str | None:
    """Why a peer with `roles` may not call `method`, or None when it may."""
    allowed = METHOD_ROLES.get(method)
    if not authenticated:
        return f"{method} needs a client certificate (mutual TLS); the caller presented none"
    if allowed is None:
        return f"{method} is not in the authorisation table (wire/authz.py); refused to every role"
    if allowed is AUTHENTICATED or roles & allowed:
        return None
    who = "role " + ",".join(sorted(roles)) if roles else "a certificate without a role"
    return f"{who} may not call {method} (allowed: {', '.join(sorted(allowed))})"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the peer's host, and the identities (subject alternative names) of its
    verified client certificate — empty without mutual TLS, when nothing proves who it is."""

    host: str
    identities: tuple[str, ...] = ()

    @property
    def authenticated(self) -> bool:
        return bool(self.identities)

    @property
    def owner(self) -> str:
        """One string per caller, to bind state to: its certificate's names at its host. The host
        tells apart pods sharing their role's certificate (the chart issues one per role)."""
        return f"{','.join(self.identities)}@{self.host}"


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: `ipv4:10.0.0.5:5555` -> `10.0.0.5`, `ipv6:[::1]:5555` -> `::1`."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)  # newer gRPC percent-encodes the brackets of an IPv6 peer
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") if "]" in rest else rest
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer  # unix sockets and the like: the whole string


def caller_of(context: grpc.ServicerContext) -> Caller:
    """The caller of the RPC `context` belongs to (identities only from a verified certificate)."""
    raw = context.peer_identities()
    identities = tuple(sorted({bytes(x).decode(errors="replace") for x in raw})) if raw is not None else ()
    return Caller(host=peer_host(context.peer()), identities=identities)


class Authorizer(grpc.ServerInterceptor):
    """Server interceptor: every call is checked against `METHOD_ROLES` before its handler runs;
    a refused call ends with PERMISSION_DENIED and a message naming the role and the method.

    A refusal is logged as a warning once per (roles, method), then at debug level, so a client
    hammering a method it may not call does not flood the log.
    """

    def __init__(self) -> None:
        self._warned: set[tuple[frozenset[str], str]] = set()
        self._lock = threading.Lock()
        self.denied = 0  # refused calls since start

    def _check(self, method: str, context: grpc.ServicerContext) -> None:
        authenticated = context.peer_identities() is not None
        # grpc's type stubs say Mapping[str, bytes]; each value is in fact a list of bytes.
        auth = cast(Mapping[str, Iterable[bytes]], context.auth_context())
        roles = roles_of(auth) if authenticated else frozenset()
        why = refusal(method, roles, authenticated)
        if why is None:
            return
        with self._lock:
            self.denied += 1
            first = (roles, method) not in self._warned
            self._warned.add((roles, method))
        log.log(logging.WARNING if first else logging.DEBUG, "refused %s from %s: %s", method, context.peer(), why)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method  # type: ignore[attr-defined]
        replaced: dict[str, Any] = {}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                replaced[kind] = self._guard(method, behaviour)
        return handler._replace(**replaced)  # type: ignore[attr-defined, no-any-return]

    def _guard(self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            self._check(method, context)
            return behaviour(request, context)

        return guarded
