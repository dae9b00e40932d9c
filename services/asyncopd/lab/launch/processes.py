"""Child processes of a local run, held and stopped by handle, each logging to its own file.

A `Supervisor` starts children (each in its own session, so a Ctrl-C at the terminal reaches
only the launcher, which then stops them in order), notices when one dies that was not asked
to stop (`ChildDied`, with the tail of its log), and stops them all — newest first — with
SIGTERM, a grace period, then SIGKILL to the child's own process group (which catches
grandchildren such as engine workers). Nothing is ever looked up or signalled by name.

It knows processes and log files; it knows nothing about what the children are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType


class ChildDied(RuntimeError):
    """A child exited while it was supposed to be running; carries the tail of its log."""

    def __init__(self, name: str, returncode: int | None, log_path: Path, tail: str) -> None:
        self.name = name
        self.returncode = returncode
        self.log_path = log_path
        self.tail = tail
        super().__init__(f"{name} exited unexpectedly with code {returncode} (log: {log_path}); last lines:\n{tail}")


def tail_lines(path: Path, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class ChildProcess:
    """One started child: its name, its Popen handle and its log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        stdin_data: bytes | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._stdin_data = stdin_data  # kept (in memory only) so `Supervisor.restart` can resend it
        self.stopping = False
        self._reaped_group = False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                # Own session: terminal signals reach the launcher only, and the child's group
                # id is its pid, so its whole group can be killed by handle at the end.
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise
        if stdin_data is not None and self.popen.stdin is not None:
            # Secrets (e.g. a Redis password) go through stdin, never argv (visible in `ps`).
            self.popen.stdin.write(stdin_data)
            self.popen.stdin.close()

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        return tail_lines(self.log_path, lines)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL the child's process group; returns its code."""
        self.stopping = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10.0)
        self._kill_group()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the child's process group at once (a crash, as fault injection); returns its code."""
        self.stopping = True
        self._kill_group()
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait(timeout=30.0)
        self._log.close()
        return self.popen.returncode

    def freeze(self) -> None:
        """SIGSTOP the child's process group: it stops answering anything until `thaw`."""
        os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def respawn(self) -> ChildProcess:
        """A new child with the same name, argv, environment and stdin, logging to the same file."""
        if self.alive():
            raise RuntimeError(f"{self.name} (pid {self.pid}) is still running; stop or kill it first")
        return ChildProcess(
            self.name, self.argv, self.log_path, env=self.env, cwd=self.cwd, stdin_data=self._stdin_data
        )

    def _kill_group(self) -> None:
        # The group was created for this child (start_new_session), so its id is the child's
        # pid; leftovers in it are the child's own descendants. Done once: after that the id
        # is not ours any more.
        if self._reaped_group:
            return
        self._reaped_group = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class Supervisor:
    """The children of one run, started in dependency order and stopped in reverse."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.log_dir = log_dir
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.children: list[ChildProcess] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        extra_env: Mapping[str, str] | None = None,
        stdin_data: bytes | None = None,
    ) -> ChildProcess:
        if any(c.name == name for c in self.children):
            raise ValueError(f"a child named {name!r} was already started")
        env = {**self.env, **(extra_env or {})}
        child = ChildProcess(name, argv, self.log_dir / f"{name}.log", env=env, cwd=self.cwd, stdin_data=stdin_data)
        self.children.append(child)
        return child

    def child(self, name: str) -> ChildProcess:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(f"no child named {name!r} (children: {[c.name for c in self.children]})")

    def restart(self, name: str) -> ChildProcess:
        """Start again a child that exited (or was killed): same argv, env and log file."""
        index = self.children.index(self.child(name))
        fresh = self.children[index].respawn()
        self.children[index] = fresh
        return fresh

    def check(self) -> None:
        """Raise ChildDied for the first child that exited without being asked to stop."""
        for child in self.children:
            if not child.stopping and not child.alive():
                raise ChildDied(child.name, child.returncode, child.log_path, child.tail())

    def stop_all(self, grace_s: float = 10.0) -> dict[str, int | None]:
        """Stop every child, newest first; returns each one's exit code."""
        codes: dict[str, int | None] = {}
        for child in reversed(self.children):
            codes[child.name] = child.stop(grace_s)
        return codes

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
