"""Who is in the collective weight broadcast: registrations, membership epochs, liveness, rebuilds.

The collective backend (`asyncopd.weightsync.collective`) owns one `Membership` over the
learner's rendezvous store (keys in `asyncopd.weightsync.groups`; the other half of the
protocol is `asyncopd.weightsync.subscriber`):

1. A replica registers (`join`) and gets a registration id, bound to its owner (the rule is
   `asyncopd.weightsync.transport.may_take`: a live name of another owner is refused; the same
   owner replaces its own registration, and the replaced one is told `dropped` at the next
   rebuild instead of waiting for an assignment forever), at most `max_members` at once. Joins
   and leaves only mark the membership dirty.
2. At the next sync point the owner calls `rebuild`: it tells the old group to `rebuild`
   (members still inside a broadcast of it abandon it), writes each member's next assignment
   (epoch, rank, world), waits up to `timeout_s` for every member's ready key, drops those that
   never came (writing them a `dropped` assignment so a slow one re-registers), says `go`, and
   connects a fresh group (learner = rank 0).
3. Every replica bumps a heartbeat counter in the store (`asyncopd.weightsync.liveness`); a
   member whose heartbeat stood still for `dead_after_s` is judged dead (`dead`) as soon as the
   learner looks while waiting — for ready keys here, for acks in the broadcast — and dropped.
   A registration that never beats is dead `dead_after_s` after it joined, so it holds a
   rebuild for that long, not for `timeout_s`.

One group per membership epoch (not one per replica): a broadcast to R replicas is one
collective; the price is a rebuild of the whole group on every membership change, which is rare.

It knows the store protocol and how a group is formed; it knows nothing of snapshots, buckets,
acks or gRPC.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch.distributed as dist

from asyncopd.weightsync import groups
from asyncopd.weightsync.liveness import Liveness, MemberKey
from asyncopd.weightsync.transport import NotTheOwner, check_room, may_take

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One registration of a collective replica."""

    replica: str
    registration: int
    device: str
    owner: str = ""  # who registered it (asyncopd.wire.authz.Caller.owner; "" = in-process)
    next_assignment: int = 0
    version: int = -1  # last version this registration acked (a member that holds the latest gets no catch-up)

    @property
    def key(self) -> MemberKey:
        return (self.replica, self.registration)


@dataclass
class Group:
    """The group of one membership epoch (`group` None: no members, or torn down)."""

    epoch: int
    group: groups.Group | None
    members: list[Member]
    seq: int = 0  # last command key written for this group
    sent_version: int = -1  # last version every member acked
    broken: bool = False  # a broadcast or an ack failed: rebuild before the next send


class Membership:
    """The registered collective replicas and the group of the current membership epoch."""

    def __init__(
        self,
        store: dist.Store,
        *,
        backend: groups.Backend,
        timeout_s: float,
        dead_after_s: float,
        closed: threading.Event,
        ids: Iterator[int] | None = None,
        max_members: int = 256,
        signer: groups.Signer | None = None,
    ) -> None:
        """`closed` ends a wait for ready keys early; `ids` hands out registration ids (shared
        with another registry of the same learner, so an id names one registration);
        `max_members`: the most registrations at once; `signer` authenticates the store values
        (default: the key in the environment, `groups.Signer.from_env`)."""
        self._store = store
        self.signer = signer if signer is not None else groups.Signer.from_env()
        self.backend = backend
        self.timeout_s = timeout_s
        self._closed = closed
        self._ids = ids if ids is not None else itertools.count(1)
        self.max_members = max_members
        self._members: dict[str, Member] = {}
        self._replaced: list[Member] = []  # still to be told `dropped` (at the next rebuild)
        self._lock = threading.Lock()  # registration never waits behind a rebuild or a broadcast
        self.dirty = False
        self.epoch = 0
        self.group: Group | None = None
        self.rebuilds = 0
        self._liveness = Liveness(self._read_heartbeat, dead_after_s)

    # ---- registrations (gRPC handler threads) ---------------------------------------------------

    def join(self, replica: str, device: str, owner: str = "") -> Member:
        """Register `replica` for the next epoch (see `may_take` for a name already held)."""
        with self._lock:
            held = self._members.get(replica)
            if held is not None:
                may_take(replica, held.owner, owner, live=not self._dead(held))
            else:
                check_room(len(self._members), self.max_members, replica)
            member = Member(replica, next(self._ids), device, owner)
            self._members[replica] = member
            self._liveness.expect(member.key)
            if held is not None:
                self._replaced.append(held)
            self.dirty = True
        if held is not None:
            log.info(
                "replica %s re-registered (registration %d replaces %d)",
                replica,
                member.registration,
                held.registration,
            )
        return member

    def release(self, replica: str, owner: str = "") -> bool:
        """Give up `replica`'s registration for one of the other kind by `owner` (`may_take`
        decides); False when it holds none here."""
        with self._lock:
            held = self._members.get(replica)
            if held is None:
                return False
            may_take(replica, held.owner, owner, live=not self._dead(held))
            del self._members[replica]
            self._replaced.append(held)
            self.dirty = True
        return True

    def leave(self, replica: str, registration: int = 0, owner: str = "") -> bool:
        with self._lock:
            member = self._members.get(replica)
            if member is None or (registration and member.registration != registration):
                return False
            if member.owner != owner:
                raise NotTheOwner(f"replica {replica!r} was registered by another caller; only it may unregister")
            del self._members[replica]
            self._liveness.forget(member.key)
            self.dirty = True
        return True

    def __contains__(self, replica: str) -> bool:
        with self._lock:
            return replica in self._members

    @property
    def registered(self) -> int:
        with self._lock:
            return len(self._members)

    @property
    def in_group(self) -> list[str]:
        """Replicas in the live group."""
        group = self.group
        return [m.replica for m in (group.members if group else [])]

    # ---- liveness -------------------------------------------------------------------------------

    def _read_heartbeat(self, key: MemberKey) -> int | None:
        name = groups.heartbeat_key(*key)
        if not self._store.check([name]):
            return None
        return int(self._store.add(name, 0))

    def dead(self, members: Sequence[Member]) -> list[Member]:
        """Members whose heartbeat stood still (or never began) for dead_after_s (see asyncopd.weightsync.liveness)."""
        dead = set(self._liveness.dead([m.key for m in members]))
        return [m for m in members if m.key in dead]

    def _dead(self, member: Member) -> bool:
        return bool(self._liveness.dead([member.key]))

    def drop(self, members: Sequence[Member], reason: str) -> None:
        """Unregister `members` and tell each (a `dropped` assignment) so a live one registers again."""
        with self._lock:
            for member in members:
                self._liveness.forget(member.key)
                if self._members.get(member.replica) is member:
                    del self._members[member.replica]
                self.signer.put_json(
                    self._store,
                    groups.assign_key(member.replica, member.registration, member.next_assignment),
                    {"dropped": True, "reason": reason},
                )
                member.next_assignment += 1
        for member in members:
            log.warning("replica %s dropped from weight sync: %s", member.replica, reason)

    # ---- epochs (the owner's sync lock held) ------------------------------------------------------

    def disband(self) -> None:
        """Tell the current group to rebuild and let go of it (it may hold an abandoned broadcast)."""
        group = self.group
        if group is not None and group.group is not None:
            group.seq += 1
            self.signer.put_json(self._store, groups.command_key(group.epoch, group.seq), {"op": "rebuild"})
            # Members still inside a broadcast of it see the rebuild command and abandon it; the
            # group itself may hold an abandoned broadcast until its timeout, so it is retired, not
            # destroyed here (destroying waits for that broadcast).
            pg, group.group = group.group, None
            groups.retire(pg, self.timeout_s)

    def rebuild(self) -> Group:
        """Form the next membership epoch's group from every registered member that becomes ready."""
        self.rebuilds += 1
        # Members of a failed group may sit in its broadcast until their own timeout before
        # they look for the next assignment: give them that long on top before dropping them.
        ready_s = self.timeout_s
        if self.group is not None:
            if self.group.broken:
                ready_s = 2 * self.timeout_s + 1.0
            self.disband()
        while True:
            with self._lock:
                self.dirty = False
                members = list(self._members.values())
                replaced, self._replaced = self._replaced, []
            if replaced:
                self.drop(replaced, "replaced by a newer registration of the same name")
            self.epoch += 1
            epoch = self.epoch
            world = len(members) + 1
            if not members:
                self.group = Group(epoch=epoch, group=None, members=[])
                return self.group
            for rank, member in enumerate(members, start=1):
                self.signer.put_json(
                    self._store,
                    groups.assign_key(member.replica, member.registration, member.next_assignment),
                    {"epoch": epoch, "rank": rank, "world": world, "backend": self.backend},
                )
                member.next_assignment += 1
            missing, dead = self._wait_ready(epoch, members, ready_s)
            if self._changed(members):
                # A member left or was replaced while it was awaited: this epoch cannot form
                # (its rank would never connect). Start over with who is registered now.
                self.signer.put(self._store, groups.go_key(epoch), "abort")
                continue
            if missing:
                self.signer.put(self._store, groups.go_key(epoch), "abort")
                reason = (
                    f"heartbeat stood still for {self._liveness.dead_after_s:.1f}s"
                    if dead
                    else f"not ready for membership epoch {epoch} within {ready_s:.1f}s"
                )
                self.drop(missing, reason)
                ready_s = self.timeout_s
                continue
            self.signer.put(self._store, groups.go_key(epoch), "build")
            try:
                pg = groups.make_group(
                    self._store, epoch, rank=0, world=world, backend=self.backend, timeout_s=self.timeout_s
                )
            except (dist.DistError, RuntimeError) as exc:
                log.warning("membership epoch %d: group did not form (%s); retrying", epoch, exc)
                continue
            self.group = Group(epoch=epoch, group=pg, members=members)
            log.info(
                "weight sync: membership epoch %d formed with %d replica(s): %s",
                epoch,
                len(members),
                ", ".join(m.replica for m in members),
            )
            return self.group

    def _changed(self, members: Sequence[Member]) -> bool:
        """Whether any of `members` is no longer the current registration of its name."""
        with self._lock:
            return any(self._members.get(m.replica) is not m for m in members)

    def _wait_ready(self, epoch: int, members: Sequence[Member], timeout_s: float) -> tuple[list[Member], bool]:
        """(members not ready within `timeout_s`, whether the wait ended early because all of them are dead)."""
        deadline = time.monotonic() + timeout_s
        pending = {rank: m for rank, m in enumerate(members, start=1)}
        next_liveness = 0.0
        while pending and time.monotonic() < deadline and not self._closed.is_set():
            for rank in [r for r in pending if self.signer.present(self._store, groups.ready_key(epoch, r))]:
                del pending[rank]
            if pending and time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + 0.1
                if len(self.dead(list(pending.values()))) == len(pending):
                    return list(pending.values()), True
                if self._changed(list(pending.values())):
                    return list(pending.values()), False
            if pending:
                time.sleep(0.01)
        return list(pending.values()), False
