"""Carrying out a fault schedule on a running `LocalRun`, one fault at a time.

The launcher calls the injector once per progress tick (`LaunchOptions.on_tick`). A fault
fires when the learner has reached its version (and, for kills "mid-work", when the target
has work in hand: leased prompts for a rollout kill, rollouts being scored for a teacher
kill — or after a few seconds of waiting for that); its recovery (restart, SIGCONT) runs on its
own thread after its delay (the launcher's poll may block on the service the fault took down),
and the next fault waits until it is done; the launcher keeps polling, checking the other
children and showing progress in between. A fault counts as *survived* when its recovery
finished and the learner then made progress; how long it cost training is measured afterwards from the step log
(`asyncopd.lab.chaos.checks.longest_gap`). Versions polled from the learner on every tick are kept
for the monotonicity check.

Recoveries take wall time (a restarted replica loads its model for seconds) while the learner
goes on training, so the schedule slips by a machine-dependent number of versions. The run is
therefore given room (`learner.steps` raised by the harness) and the injector ends it, through
the tick's return value, once every fault has been survived, the learner has trained
`tail_steps` past the last recovery and `finish_at` (the steps asked for) has been reached.

It knows the launcher's handles (children, ports, the private Redis); the checks are in
`asyncopd.lab.chaos.checks`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncopd.cache.connection import connect
from asyncopd.cache.store import ExperienceStore, StorePolicy
from asyncopd.lab.chaos.faults import TARGET_PREFIX, FaultSpec
from asyncopd.lab.launch.processes import ChildProcess
from asyncopd.lab.launch.progress import Snapshot
from asyncopd.lab.launch.redis_server import wait_redis
from asyncopd.lab.launch.runner import LocalRun

log = logging.getLogger(__name__)

# How long a "mid-work" kill waits for its target to hold work before firing anyway.
_WORK_WAIT_S = 5.0


@dataclass
class FaultOutcome:
    """What happened to one scheduled fault."""

    label: str
    kind: str
    at_version: int
    target: str | None = None
    fired_version: int | None = None
    fired_s: float | None = None
    recovered_s: float | None = None
    recovered_version: int | None = None
    fired_unix: float | None = None
    recovered_unix: float | None = None
    # Longest gap between two learner steps from the fault to shortly after its recovery.
    stall_s: float | None = None
    survived: bool = False
    detail: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Active:
    spec: FaultSpec
    outcome: FaultOutcome
    recovery: threading.Thread | None = None  # runs the recovery after its delay


@dataclass
class Injector:
    """The `on_tick` callback that injects `schedule` into a run."""

    schedule: list[FaultSpec]
    redis_dir: Path | None = None
    # End the run (return True) from this version on, once the schedule is done (0: never).
    finish_at: int = 0
    # ... and once the learner has made this many steps past the last recovery.
    tail_steps: int = 10
    outcomes: list[FaultOutcome] = field(default_factory=list)
    versions: list[tuple[float, int]] = field(default_factory=list)
    redis_epochs: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[FaultSpec] = field(default_factory=list)
    _active: _Active | None = None
    _waiting_since: float | None = None
    _started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._pending = sorted(self.schedule, key=lambda f: f.at_version)

    # -- the tick ----------------------------------------------------------------------------

    def __call__(self, run: LocalRun, snap: Snapshot) -> bool:
        """One tick: fire or settle a fault; True when the run may end now (see `done`)."""
        now = time.monotonic() - self._started
        if snap.learner is not None:
            self.versions.append((round(now, 2), int(snap.learner["version"])))
        for outcome in self.outcomes:
            recovered = outcome.recovered_version
            if recovered is not None and not outcome.survived and snap.version > recovered:
                outcome.survived = True
        if snap.version >= snap.steps_total:
            self._run_ended(snap)
            return True
        if self._active is not None:
            recovery = self._active.recovery
            if recovery is None or not recovery.is_alive():
                self._settle(snap)
            return False
        if not self._pending:
            return self.done(snap.version)
        if snap.version < self._pending[0].at_version:
            return False
        spec = self._pending[0]
        if not self._target_busy(run, spec, snap):
            if self._waiting_since is None:
                self._waiting_since = now
            if now - self._waiting_since < _WORK_WAIT_S:
                return False
        self._waiting_since = None
        self._pending.pop(0)
        self._fire(run, spec, snap, now)
        return False

    def done(self, version: int) -> bool:
        """Every fault fired and settled, each survived or failed for good, the learner
        `tail_steps` past the last recovery and at `finish_at` or beyond."""
        if self.finish_at <= 0 or self._pending or self._active is not None or version < self.finish_at:
            return False
        if any(o.error is None and not o.survived for o in self.outcomes):
            return False
        recovered = [o.recovered_version for o in self.outcomes if o.recovered_version is not None]
        return not recovered or version >= max(recovered) + self.tail_steps

    def _run_ended(self, snap: Snapshot) -> None:
        """The learner finished while a fault was still in effect (e.g. a replica frozen): undo
        it now; the run going on to its last step during the fault is what surviving it means."""
        active = self._active
        if active is None:
            return
        if active.recovery is not None:
            active.recovery.join(timeout=300.0)
        self._settle(snap)
        outcome = active.outcome
        if outcome.error is None and outcome.fired_version is not None and snap.version > outcome.fired_version:
            outcome.survived = True
            outcome.detail += "; the run reached its last step while the fault was in effect"

    # -- firing and recovering ---------------------------------------------------------------

    def _fire(self, run: LocalRun, spec: FaultSpec, snap: Snapshot, now: float) -> None:
        outcome = FaultOutcome(spec.label, spec.kind, spec.at_version, spec.target, snap.version, round(now, 2))
        outcome.fired_unix = time.time()
        self.outcomes.append(outcome)
        log.warning("chaos: %s fires at version %d", spec.label, snap.version)
        try:
            recover, delay = self._inject(run, spec, outcome)
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            log.exception("chaos: %s could not be injected", spec.label)
            outcome.error = f"{type(exc).__name__}: {exc}"
            return
        active = _Active(spec, outcome)
        if recover is not None:
            # On its own thread, so the recovery runs on time even while the launcher's poll is
            # blocked on the very service the fault took down.
            active.recovery = threading.Thread(
                target=self._recover, args=(outcome, recover, delay), name=f"chaos-{spec.kind}", daemon=True
            )
            active.recovery.start()
        else:
            outcome.recovered_s = round(time.monotonic() - self._started, 2)
            outcome.recovered_unix = time.time()
        self._active = active

    def _recover(self, outcome: FaultOutcome, recover: Callable[[], None], delay: float) -> None:
        time.sleep(delay)
        try:
            recover()
        except Exception as exc:
            log.exception("chaos: recovery from %s failed", outcome.label)
            outcome.error = f"recovery failed: {type(exc).__name__}: {exc}"
            return
        outcome.recovered_s = round(time.monotonic() - self._started, 2)
        outcome.recovered_unix = time.time()

    def _settle(self, snap: Snapshot) -> None:
        """The active fault's recovery is done: note the version it was back at, go to the next."""
        assert self._active is not None
        active, self._active = self._active, None
        if active.outcome.error is None:
            active.outcome.recovered_version = snap.version

    def _inject(self, run: LocalRun, spec: FaultSpec, outcome: FaultOutcome) -> tuple[Callable[[], None] | None, float]:
        """Do the fault; return (recovery action or None, seconds until it runs)."""
        kind = spec.kind
        if kind in ("kill-rollout", "kill-teacher"):
            child = self._target(run, spec)
            outcome.target = child.name
            child.kill()
            outcome.detail = f"SIGKILL {child.name} (pid {child.pid})"
            if spec.restart_after_s <= 0:
                return None, 0.0
            return (lambda: self._restart(run, child.name, outcome)), spec.restart_after_s
        if kind == "start-rollout":
            child = run.add_replica("rollout")
            outcome.target = child.name
            outcome.detail = f"started {child.name} (pid {child.pid})"
            return None, 0.0
        if kind in ("kill-cache", "kill-learner"):
            name = kind.removeprefix("kill-")
            child = run.supervisor.child(name)
            outcome.target = name
            child.kill()
            outcome.detail = f"SIGKILL {name} (pid {child.pid})"
            return (lambda: self._restart(run, name, outcome)), spec.restart_after_s
        if kind in ("restart-redis", "wipe-redis"):
            return self._redis_fault(run, spec, outcome)
        if kind == "redis-rollback":
            return self._redis_rollback(run, spec, outcome)
        if kind == "rogue-client":
            self._rogue(run, outcome)
            return None, 0.0
        if kind == "disk-full":
            return self._disk_full(run, spec, outcome)
        if kind == "learner-oom":
            return self._learner_oom(run, spec, outcome), 0.0
        if kind == "poison-sample":
            return self._poison(run, outcome), 0.0
        if kind == "partition-replica":
            return self._partition(run, spec, outcome), 0.0
        if kind == "freeze-rollout":
            child = self._target(run, spec)
            outcome.target = child.name
            hold = spec.hold_s if spec.hold_s is not None else 2 * run.config.weightsync.timeout_s + 2.0
            child.freeze()
            timeout = run.config.weightsync.timeout_s
            outcome.detail = f"SIGSTOP {child.name} for {hold:.0f}s (weight-sync timeout {timeout:.0f}s)"
            return child.thaw, hold
        raise ValueError(f"unknown fault kind {kind!r}")

    def _restart(self, run: LocalRun, name: str, outcome: FaultOutcome) -> None:
        started = time.monotonic()
        child = run.restart_child(name)
        outcome.detail += f"; restarted as pid {child.pid}, serving after {time.monotonic() - started:.1f}s"

    def _redis_fault(
        self, run: LocalRun, spec: FaultSpec, outcome: FaultOutcome
    ) -> tuple[Callable[[], None] | None, float]:
        if run.redis is None or not run.redis.private or self.redis_dir is None:
            raise RuntimeError(f"{spec.kind} needs the run's own Redis with a persistence dir (private_redis)")
        redis_cfg = run.config.redis.model_copy(update={"url": run.redis.url})
        child = run.supervisor.child("redis")
        outcome.target = "redis"
        if spec.kind == "restart-redis":
            child.kill()
            outcome.detail = "SIGKILL redis (append-only file, fsync always)"
        else:
            client = connect(redis_cfg, socket_timeout_s=10.0)
            policy = StorePolicy(
                max_staleness=run.config.max_staleness,
                batch_size=run.config.learner.batch_size,
                byte_budget=0,
            )
            store = ExperienceStore(client, run.key_prefix, policy)
            client.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
            stats = store.stats()
            epoch = {
                "produced": stats.produced,
                "trained": stats.trained,
                "admitted": stats.admitted,
                "dropped": dict(stats.dropped),
                "in_flight": stats.in_flight,
                "staleness_served": {str(k): v for k, v in stats.staleness_served.items()},
                "learner_version": stats.learner_version,
            }
            child.kill()
            client.close()
            self.redis_epochs.append(epoch)
            for entry in self.redis_dir.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            outcome.detail = f"Redis wiped holding {stats.in_flight} samples in flight (counted dropped: redis_wiped)"

        def restart() -> None:
            started = time.monotonic()
            fresh = run.restart_child("redis")
            wait_redis(fresh, redis_cfg, redis_cfg.url)
            outcome.detail += f"; restarted, answering after {time.monotonic() - started:.1f}s"

        return restart, spec.restart_after_s

    def _redis_rollback(
        self, run: LocalRun, spec: FaultSpec, outcome: FaultOutcome
    ) -> tuple[Callable[[], None] | None, float]:
        if run.redis is None or not run.redis.private or self.redis_dir is None:
            raise RuntimeError("redis-rollback needs the run's own Redis with a persistence dir (private_redis)")
        redis_cfg = run.config.redis.model_copy(update={"url": run.redis.url})
        files = sorted((self.redis_dir / "appendonlydir").glob("*.incr.aof"))
        if not files:
            raise RuntimeError(f"no incremental append-only file under {self.redis_dir / 'appendonlydir'}")
        aof = files[-1]
        cut_at = aof.stat().st_size
        outcome.target = "redis"
        outcome.detail = f"{aof.name} noted at {cut_at} bytes"

        def rollback() -> None:
            run.supervisor.child("redis").kill()
            if not aof.exists():
                raise RuntimeError(f"{aof.name} was rewritten during the window; nothing cut")
            size = aof.stat().st_size
            with aof.open("r+b") as f:
                f.truncate(cut_at)
            started = time.monotonic()
            fresh = run.restart_child("redis")
            wait_redis(fresh, redis_cfg, redis_cfg.url)
            outcome.detail += (
                f"; {spec.restart_after_s:.1f}s later SIGKILL redis, AOF cut from {size} to {cut_at} bytes "
                f"({size - cut_at} bytes of writes lost), answering after {time.monotonic() - started:.1f}s"
            )

        return rollback, spec.restart_after_s

    def _rogue(self, run: LocalRun, outcome: FaultOutcome) -> None:
        from safetensors import safe_open

        from asyncopd.lab.chaos.rogue import attack

        if run.ports is None:
            raise RuntimeError("rogue-client: the run has no ports yet")
        student = Path(run.config.models.student)
        params: list[tuple[str, tuple[int, ...]]] = []
        for path in sorted(student.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                params += [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]  # noqa: SIM118
        if not params:
            raise RuntimeError(f"rogue-client: no safetensors weights under {student}")
        host = "127.0.0.1"
        results = attack(
            f"{host}:{run.ports.cache}",
            f"{host}:{run.ports.learner}",
            f"{host}:{run.ports.rollouts[0]}",
            params,
            int(outcome.fired_version or 0),
            identities=run.config.tls.enabled,
        )
        outcome.target = "cache, learner, rollout-0"
        outcome.detail = ", ".join(f"{r.attack}: {r.code}" for r in results)
        accepted = [f"{r.attack} ({r.message})" for r in results if not r.refused]
        if accepted:
            outcome.error = "accepted: " + "; ".join(accepted)

    def _disk_full(
        self, run: LocalRun, spec: FaultSpec, outcome: FaultOutcome
    ) -> tuple[Callable[[], None] | None, float]:
        directory = run.out_dir / "checkpoints"
        hold = spec.hold_s if spec.hold_s is not None else 10.0
        outcome.target = "learner"
        if os.geteuid() == 0:  # root writes through file modes
            subprocess.run(["chattr", "+i", str(directory)], check=True, capture_output=True)
            how, undo = "chattr +i", ["chattr", "-i", str(directory)]
        else:
            mode = directory.stat().st_mode
            directory.chmod(0o555)
            how, undo = "mode 0555", []
        outcome.detail = f"{directory.name}/ refuses writes ({how}) for {hold:.0f}s"

        def restore() -> None:
            if undo:
                subprocess.run(undo, check=True, capture_output=True)
            else:
                directory.chmod(mode)

        return restore, hold

    def _learner_oom(self, run: LocalRun, spec: FaultSpec, outcome: FaultOutcome) -> Callable[[], None]:
        latest = run.out_dir / "checkpoints" / "LATEST"
        before = latest.read_text() if latest.exists() else ""
        outcome.target = "learner"
        outcome.detail = f"waiting for the checkpoint after {before.strip() or 'none'}"

        def kill_then_restart() -> None:
            deadline = time.monotonic() + 120.0
            while (latest.read_text() if latest.exists() else "") == before:
                if time.monotonic() > deadline:
                    raise RuntimeError("no new checkpoint within 120 s")
                time.sleep(0.005)
            published = time.monotonic()
            child = run.supervisor.child("learner")
            child.kill()
            now = latest.read_text().strip()
            outcome.detail = (
                f"SIGKILL learner (pid {child.pid}) {1000 * (time.monotonic() - published):.0f} ms after {now}"
            )
            time.sleep(spec.restart_after_s)
            self._restart(run, "learner", outcome)

        return kill_then_restart

    def _poison(self, run: LocalRun, outcome: FaultOutcome) -> Callable[[], None]:
        """A rollout that crashes its teacher on every delivery, until `cache.max_deliveries`.

        A toy teacher scores a claim within milliseconds, faster than anything outside it can
        kill it in between, so each delivery is taken in teacher-0's name by the injector (a
        real ClaimRollouts: the cache counts it as teacher-0's) while teacher-0 is frozen, and
        teacher-0 is then killed and restarted as the crash. The rollouts come back when their
        lease expires and are claimed again the same way; after the last delivery's lease they
        are dropped as `poison`. The learner may train on its backlog meanwhile, so the rollouts
        can turn stale and be dropped (correctly) before their last delivery: then it starts
        again on fresh ones (at most `attempts`)."""
        import grpc

        from asyncopd.v1 import cache_pb2, cache_pb2_grpc
        from asyncopd.wire.rpc import channel

        if run.ports is None:
            raise RuntimeError("poison-sample: the run has no ports yet")
        cache = run.config.cache
        outcome.target = "teacher-0"
        attempts = 4

        def kill_each_delivery() -> None:
            chan = channel(f"127.0.0.1:{run.ports.cache}")  # type: ignore[union-attr]
            stub = cache_pb2_grpc.CacheServiceStub(chan)

            def deliver(n: int, wait_ms: int) -> set[str]:
                req = cache_pb2.ClaimRolloutsRequest(
                    teacher="teacher-0", max_rollouts=n, wait_ms=wait_ms, by_reference=True
                )
                resp = stub.ClaimRollouts(req, timeout=wait_ms / 1000.0 + 30.0)
                return {m.sample_id for m in resp.metas}

            def poison_drops() -> int:
                return int(stub.Stats(cache_pb2.StatsRequest(), timeout=30.0).dropped.get("poison", 0))

            notes: list[str] = []
            try:
                before = poison_drops()
                for attempt in range(1, attempts + 1):
                    run.supervisor.child("teacher-0").freeze()
                    poisoned = deliver(run.config.teacher.claim_batch, 10_000)
                    if not poisoned:
                        run.supervisor.child("teacher-0").thaw()
                        raise RuntimeError("no unscored rollout to deliver for 10 s")
                    deliveries = 1
                    while True:
                        run.supervisor.child("teacher-0").kill()  # the crash the delivery causes
                        run.restart_child("teacher-0")
                        if deliveries >= cache.max_deliveries:
                            outcome.detail = "; ".join(
                                [
                                    *notes,
                                    f"{deliveries} deliveries of the same {len(poisoned)} rollout(s), each "
                                    f"followed by a kill of teacher-0 (cache.max_deliveries "
                                    f"{cache.max_deliveries}): dropped as poison at their next lease expiry",
                                ]
                            )
                            return
                        run.supervisor.child("teacher-0").freeze()  # the redelivery is the injector's
                        time.sleep(cache.teacher_lease_s + 0.2)
                        again = deliver(len(poisoned), 10_000) & poisoned
                        if not again:
                            run.supervisor.child("teacher-0").thaw()
                            # teacher-0's own claims between its restart and its freeze count as
                            # deliveries too: the cap may have been reached before ours
                            if (dropped := poison_drops() - before) > 0:
                                outcome.detail = "; ".join(
                                    [
                                        *notes,
                                        f"{len(poisoned)} rollout(s) delivered until the cap (cache.max_deliveries "
                                        f"{cache.max_deliveries}; {deliveries} by the injector, each followed by a "
                                        f"kill of teacher-0): {dropped} dropped as poison",
                                    ]
                                )
                                return
                            notes.append(f"attempt {attempt}: not delivered again after {deliveries} (stale)")
                            break
                        poisoned, deliveries = again, deliveries + 1
                raise RuntimeError(f"no rollouts reached {cache.max_deliveries} deliveries: {'; '.join(notes)}")
            except grpc.RpcError as err:
                raise RuntimeError(f"poison-sample: ClaimRollouts failed: {err.code()}: {err.details()}") from err
            finally:
                chan.close()

        return kill_each_delivery

    def _partition(self, run: LocalRun, spec: FaultSpec, outcome: FaultOutcome) -> Callable[[], None]:
        import urllib.request

        from asyncopd.wire.learner_client import LearnerClient
        from asyncopd.wire.rpc import channel

        child = self._target(run, spec)
        if run.ports is None:
            raise RuntimeError("partition-replica: the run has no ports yet")
        hold = spec.hold_s if spec.hold_s is not None else 10.0
        metrics_url = f"http://127.0.0.1:{run.ports.metrics[child.name]}/metrics"
        learner_address = f"127.0.0.1:{run.ports.learner}"
        outcome.target = child.name

        def gauge(name: str) -> float | None:
            try:
                with urllib.request.urlopen(metrics_url, timeout=2.0) as resp:
                    text = resp.read().decode()
            except OSError:
                return None
            for line in text.splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
            return None

        def cut_then_heal() -> None:
            ch = channel(learner_address)
            learner = LearnerClient(ch)
            drops, gated, lag = 0, 0.0, 0.0
            try:
                deadline = time.monotonic() + hold
                while time.monotonic() < deadline:
                    try:
                        learner.unregister(child.name)
                        drops += 1
                    except Exception as exc:  # refused (an identity check) is the finding, reported
                        outcome.error = f"the learner refused to drop {child.name}: {exc}"
                        return
                    gated = max(gated, gauge("asyncopd_rollout_lag_gated") or 0.0)
                    lag = max(lag, gauge("asyncopd_rollout_version_lag") or 0.0)
                    time.sleep(0.3)
            finally:
                ch.close()
            outcome.detail = (
                f"{child.name} dropped from weight sync {drops} times over {hold:.0f}s while generating; "
                f"version lag up to {lag:.0f} (bound {run.config.max_staleness}), "
                f"{'stopped acquiring (lag gate)' if gated else 'never gated'}"
            )
            if lag > run.config.max_staleness and not gated:
                outcome.error = f"{child.name} lagged {lag:.0f} versions and kept acquiring"

        return cut_then_heal

    # -- targets -----------------------------------------------------------------------------

    @staticmethod
    def _target(run: LocalRun, spec: FaultSpec) -> ChildProcess:
        if spec.target is not None:
            child = run.supervisor.child(spec.target)
            if not child.alive():
                raise RuntimeError(f"{spec.target} is not running")
            return child
        prefix = TARGET_PREFIX[spec.kind]
        for child in run.supervisor.children:
            if child.name.startswith(prefix) and child.alive():
                return child
        raise RuntimeError(f"no live {prefix}N child to target")

    @staticmethod
    def _target_busy(run: LocalRun, spec: FaultSpec, snap: Snapshot) -> bool:
        """Has the target work in hand (leased prompts / rollouts being scored)? True if unknown."""
        depth = (snap.cache or {}).get("queue_depth") or {}
        if spec.kind == "kill-rollout":
            return int(depth.get("prompts_leased", 1)) > 0
        if spec.kind == "kill-teacher":
            return int(depth.get("scoring", 1)) > 0
        return True
