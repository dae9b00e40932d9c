"""Liveness from heartbeat counters, on a fake clock: a member is dead once its counter stood
still for dead_after_s; one that never beat is not judged; a beat revives the timer."""

from __future__ import annotations

from asyncopd.weightsync.liveness import Liveness, MemberKey


def test_dead_after_its_counter_stands_still() -> None:
    now = [0.0]
    counters: dict[MemberKey, int] = {("a", 1): 1, ("b", 2): 1}
    live = Liveness(counters.get, dead_after_s=2.0, clock=lambda: now[0])
    keys = [("a", 1), ("b", 2), ("never", 3)]
    assert live.dead(keys) == []
    now[0] = 1.5
    counters[("a", 1)] = 5  # a beats, b does not
    assert live.dead(keys) == []
    now[0] = 2.0
    assert live.dead(keys) == [("b", 2)], "b stood still for 2 s; 'never' has not beaten and is not judged"
    now[0] = 3.4
    assert live.dead(keys) == [("b", 2)]
    now[0] = 3.5
    assert live.dead(keys) == [("a", 1), ("b", 2)]
    counters[("b", 2)] = 2  # b wakes up and beats again
    assert live.dead(keys) == [("a", 1)]
    live.forget(("a", 1))
    assert live.dead(keys) == [], "a forgotten member starts over"


def test_a_member_expected_at_registration_that_never_beats_is_dead_after_dead_after_s() -> None:
    now = [10.0]
    counters: dict[MemberKey, int] = {}
    live = Liveness(counters.get, dead_after_s=2.0, clock=lambda: now[0])
    live.expect(("silent", 1))
    live.expect(("slow-start", 2))
    now[0] = 11.9
    assert live.dead([("silent", 1), ("slow-start", 2)]) == []
    counters[("slow-start", 2)] = 1  # its first beat, late but in time
    now[0] = 12.0
    assert live.dead([("silent", 1), ("slow-start", 2)]) == [("silent", 1)]
    live.expect(("slow-start", 2))  # expecting again does not reset a member already judged
    now[0] = 13.9
    assert live.dead([("slow-start", 2)]) == []
    now[0] = 14.0
    assert live.dead([("slow-start", 2)]) == [("slow-start", 2)]
