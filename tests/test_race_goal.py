"""A race with a goal ends once the goal is reached, and not before; without one (a soak, a bench) it
races its whole duration. Real /dev/kvm: the counts are the engine's own."""

from __future__ import annotations

import time

from harness.race.disruptors import DISRUPTORS, Remap
from harness.race.engine import Race
from harness.race.plan import RaceGoal, RaceSpec


def _run(kvm, backings, spec):
    race = Race(kvm, spec, lambda k, size, vm: backings(k, size, vm=vm))
    try:
        return race, race.run()
    finally:
        race.close()


def test_a_race_ends_at_its_goal_with_the_goal_met(kvm, backings):
    goal = RaceGoal(sweeps=3, ops=16, min_seconds=0.05)
    spec = RaceSpec("anon", ("remap",), vcpus=2, seconds=20.0, goal=goal, label="goal")
    race, rep = _run(kvm, backings, spec)
    assert not rep.failures(), rep.summary()
    assert rep.ended == "goal" and rep.duration < 20.0, rep.summary()
    assert rep.duration >= goal.min_seconds
    assert all(d.overlapped >= goal.ops for d in race.disruptors), rep.summary()
    # every vCPU swept its region at least `sweeps` times while the host operated
    assert rep.sweeps_in_race >= goal.sweeps * spec.vcpus, rep.summary()
    assert "ended at its goal" in rep.summary() and ("race_ended", "goal") in rep.properties()


def test_an_unreachable_goal_races_the_whole_duration(kvm, backings):
    spec = RaceSpec("anon", ("dontneed",), seconds=0.4, goal=RaceGoal(sweeps=10**9), label="cap")
    _, rep = _run(kvm, backings, spec)
    assert not rep.failures(), rep.summary()
    assert rep.ended == "time" and rep.duration >= 0.4, rep.summary()


def test_without_a_goal_a_race_takes_its_duration(kvm, backings):
    spec = RaceSpec("anon", ("remap",), seconds=0.5, label="soak")
    _, rep = _run(kvm, backings, spec)
    assert rep.ended == "time" and rep.duration >= 0.5, rep.summary()
    assert "ended at its goal" not in rep.summary()


class LateRemap(Remap):
    """A remap disruptor whose thread gets going only after `delay`: what a one-CPU TCG guest did
    to a race once (the thread had no CPU for the whole 1 s cap, 0 ops)."""

    name = "late-remap"
    delay = 0.0

    def run(self, stop, limit=None, cpu=None):
        time.sleep(self.delay)
        super().run(stop, limit, cpu)


def test_a_race_goes_past_its_cap_until_the_host_has_raced(kvm, backings, monkeypatch):
    monkeypatch.setitem(DISRUPTORS, LateRemap.name, LateRemap)
    monkeypatch.setattr(LateRemap, "delay", 0.6)
    spec = RaceSpec("anon", (LateRemap.name,), seconds=0.2, goal=RaceGoal(), label="late")
    race, rep = _run(kvm, backings, spec)
    assert not rep.failures(), rep.summary()
    assert rep.duration > 0.6 and race.disruptors[0].overlapped > 0, rep.summary()
    assert rep.duration < spec.progress_bound, rep.summary()


def test_a_host_that_never_races_still_fails_overlap_at_the_bound(kvm, backings, monkeypatch):
    monkeypatch.setitem(DISRUPTORS, LateRemap.name, LateRemap)
    monkeypatch.setattr(LateRemap, "delay", 3.0)
    spec = RaceSpec("anon", (LateRemap.name,), seconds=0.2, goal=RaceGoal(), label="never", progress_bound=1.0)
    _, rep = _run(kvm, backings, spec)
    assert 1.0 <= rep.duration < 3.0, rep.summary()
    assert "overlap: the host made no operation at all" in rep.failures(("overlap",)), rep.summary()
