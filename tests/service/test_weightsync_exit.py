"""A process that exits while a retired weight-sync group is being destroyed exits cleanly.

`groups.retire` destroys an abandoned group in a daemon thread; the destructor runs with the GIL
released, and a daemon thread that takes the GIL back while the interpreter finalizes is ended
inside C++, which aborts the process ("terminate called without an active exception", exit 134):
seen once at the end of a pytest run of the weight-sync tests, and possible at any learner or
replica exit. The child below builds a real 2-rank gloo group on loopback (rank 1 in its own
process), leaves a broadcast in flight (rank 1 never joins it, so destroying rank 0's group waits
for it), retires the group and exits while its destruction is still blocked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.service

# Timeline of the child: the broadcast is in flight until IN_FLIGHT_S; retire(keep_s=0) starts
# destroying after 1 s, so the destructor is blocked from ~1 s to IN_FLIGHT_S; the main thread
# exits at EXIT_AT_S, inside that span even when the machine is loaded (the margins are seconds).
# Without the exit guard that ordering aborts the child; with it, exit waits for the destructor.
IN_FLIGHT_S, EXIT_AT_S = 8.0, 3.0

# Rank 1: joins the group, then never takes part in a collective; lives until its stdin closes
# (when the child exits), so the broadcast stays in flight rather than failing on a lost peer.
PEER = textwrap.dedent(
    """
    import sys
    from asyncopd.weightsync import groups

    store = groups.connect_store("127.0.0.1", int(sys.argv[1]), 60.0)
    group = groups.make_group(store, 1, rank=1, world=2, backend="gloo", timeout_s=60.0)
    sys.stdin.read()
    """
)

CHILD = textwrap.dedent(
    f"""
    import subprocess, sys, time
    from datetime import timedelta
    import torch
    from asyncopd.weightsync import groups

    store = groups.host_store("127.0.0.1", 0, 60.0)
    peer = subprocess.Popen([sys.executable, "-c", {PEER!r}, str(store.port)], stdin=subprocess.PIPE)
    group = groups.make_group(store, 1, rank=0, world=2, backend="gloo", timeout_s=60.0)
    work = group.broadcast(torch.zeros(8), 0, timedelta(seconds={IN_FLIGHT_S}))
    started = time.monotonic()
    groups.retire(group, keep_s=0.0)
    del group, work
    time.sleep(max(0.0, {EXIT_AT_S} - (time.monotonic() - started)))
    print("exiting", flush=True)
    """
)


def test_exit_while_a_retired_group_is_destroyed_does_not_abort() -> None:
    child = subprocess.run([sys.executable, "-c", CHILD], check=False, capture_output=True, text=True, timeout=120)
    assert "exiting" in child.stdout, child.stderr[-2000:]
    assert "terminate called" not in child.stderr, child.stderr[-2000:]
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
