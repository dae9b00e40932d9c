"""Process supervision of the local launcher: children started, watched and stopped by handle."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from asyncopd.lab.launch.ports import free_port, free_ports, is_listening
from asyncopd.lab.launch.processes import ChildDied, Supervisor, tail_lines

pytestmark = pytest.mark.unit

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sleeping_child_is_stopped_by_sigterm(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.start("sleeper", SLEEPER)
    assert child.alive()
    sup.check()  # running children are fine
    start = time.monotonic()
    code = child.stop(grace_s=5.0)
    assert code == -signal.SIGTERM
    assert time.monotonic() - start < 5.0
    assert not _pid_alive(child.pid)


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)",
    ]
    sup = Supervisor(tmp_path)
    child = sup.start("stubborn", stubborn)
    assert _wait_for(lambda: "ready" in child.tail())
    start = time.monotonic()
    code = child.stop(grace_s=0.5)
    assert code == -signal.SIGKILL
    assert 0.4 < time.monotonic() - start < 8.0


def test_grandchildren_are_stopped_with_their_parent(tmp_path: Path) -> None:
    # The child starts a grandchild that ignores SIGTERM, prints its pid, and waits.
    script = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print('grandchild', g.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    sup = Supervisor(tmp_path)
    child = sup.start("parent", [sys.executable, "-c", script])
    assert _wait_for(lambda: "grandchild" in child.tail())
    grandchild = int(child.tail().split("grandchild")[1].split()[0])
    assert _pid_alive(grandchild)
    sup.stop_all(grace_s=2.0)
    assert _wait_for(lambda: not _pid_alive(grandchild), 5.0)


def test_unexpected_exit_is_reported_with_log_tail(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    sup.start("sleeper", SLEEPER)
    crasher = sup.start("crasher", [sys.executable, "-c", "import sys; print('boom: out of cheese'); sys.exit(3)"])
    assert _wait_for(lambda: not crasher.alive())
    with pytest.raises(ChildDied) as info:
        sup.check()
    assert info.value.name == "crasher"
    assert info.value.returncode == 3
    assert "boom: out of cheese" in info.value.tail
    assert info.value.log_path == tmp_path / "crasher.log"
    sup.stop_all(grace_s=2.0)


def test_stopped_child_is_not_reported_and_stop_all_is_idempotent(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    a = sup.start("a", SLEEPER)
    b = sup.start("b", SLEEPER)
    a.stop(grace_s=2.0)
    sup.check()  # a was asked to stop: not a failure
    codes = sup.stop_all(grace_s=2.0)
    assert list(codes) == ["b", "a"]  # newest first
    assert sup.stop_all(grace_s=2.0) == codes
    assert not a.alive() and not b.alive()


def test_duplicate_child_name_is_rejected(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        sup.start("x", SLEEPER)
        with pytest.raises(ValueError, match="already started"):
            sup.start("x", SLEEPER)


def test_stdin_data_reaches_the_child_and_env_is_passed(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, env={**os.environ, "LAUNCH_TEST": "from-env"})
    child = sup.start(
        "echo",
        [sys.executable, "-c", "import os, sys; print(sys.stdin.read().strip(), os.environ['LAUNCH_TEST'])"],
        stdin_data=b"from-stdin\n",
    )
    assert _wait_for(lambda: not child.alive())
    assert child.tail().strip() == "from-stdin from-env"
    sup.stop_all()


def test_tail_lines_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail_lines(path, 3) == "line 97\nline 98\nline 99"
    assert tail_lines(tmp_path / "missing") == ""


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in [*ports, free_port()]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert is_listening("127.0.0.1", server.getsockname()[1])
    assert not is_listening("127.0.0.1", free_port())
    with pytest.raises(ValueError):
        free_ports(-1)
