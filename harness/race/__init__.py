"""Race engine: vCPU toucher threads against host disruptor threads, with data oracles.

    plan.py        RaceSpec (what one race is asked to do), RaceGoal (when it may end early), ORACLES,
                   RaceUnsupported
    protocol.py    the generation protocol shared with guests/payloads/race_toucher.c (pure)
    region.py      the raced region in guest and host memory; the protocol's host-side writers
    disruptors/    host operations on the region (HostContext is all they see of the race)
    vcpu.py        the guest side: one thread per vCPU running race_toucher
    clock.py       the kvmclock oracle's KVM_SET_CLOCK thread
    engine.py      Race: sets a race up, starts the threads, monitors and stops them
    oracles.py     each oracle's Verdict; released-memory measurement; stall descriptions
    report.py      RaceReport: what a race recorded, its verdicts and its text

Imports run one way: engine -> disruptors, vcpu, clock, report -> oracles -> protocol; disruptors,
vcpu and clock -> region -> protocol; nothing in the package imports the engine.
"""

from __future__ import annotations

from harness.race.disruptors import DISRUPTORS
from harness.race.engine import Race
from harness.race.plan import ORACLES, RaceGoal, RaceSpec, RaceUnsupported
from harness.race.report import RaceReport

__all__ = ["DISRUPTORS", "ORACLES", "Race", "RaceGoal", "RaceReport", "RaceSpec", "RaceUnsupported"]
