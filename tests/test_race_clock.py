"""The kvmclock oracle's judgement (harness/race/clock.py), with a fake VM and region: a pvclock that
never shows the update is a loss only once the vCPU has entered its guest since the KVM_SET_CLOCK
(where KVM's exits counter says so); a vCPU that never entered is no evidence either way."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest

from harness.race import clock
from harness.race import protocol as P
from harness.race.region import GPA_A


class FakeVm:
    def __init__(self) -> None:
        self.sets: list[int] = []

    def get_clock(self) -> int:
        return 0

    def set_clock(self, ns: int) -> None:
        self.sets.append(ns)


class FakeMem:
    hva = 0x7F00_0000_0000
    page0_changes = 0

    def __init__(self, fresh_after_reads: int | None = None) -> None:
        self.reads = 0
        self.fresh_after = fresh_after_reads
        self.vm: FakeVm | None = None

    def pvclock_gpa(self, i: int) -> int:
        return GPA_A + P.PVCLOCK_OFFSET + 32 * i

    def read_pvclock(self, i: int) -> tuple[int, int]:
        self.reads += 1
        if self.fresh_after is not None and self.reads > self.fresh_after:
            return 2, self.vm.sets[-1] + 1  # type: ignore[union-attr]
        return 0, 0  # a punched page: zeros


def _report() -> SimpleNamespace:
    return SimpleNamespace(clock_sets=0, clock_seen=0, clock_inconclusive=0, clock_not_entered=0,
                           clock_misses=[], errors=[])


@pytest.fixture(autouse=True)
def _short_waits(monkeypatch):
    monkeypatch.setattr(clock, "CLOCK_WAIT", 0.05)
    monkeypatch.setattr(P, "CLOCK_ENTRY_WAIT", 0.3)


def _once(mem: FakeMem, exits, nvcpus: int = 1) -> SimpleNamespace:
    vm, rep = FakeVm(), _report()
    mem.vm = vm
    clock.ClockSetter(vm, mem, rep, nvcpus, lambda: False, exits).once()  # type: ignore[arg-type]
    assert rep.clock_sets == 1
    return rep


def test_lost_update_of_a_vcpu_that_entered_its_guest_is_a_miss_with_the_evidence():
    n = itertools.count(100)
    rep = _once(FakeMem(), lambda i: next(n))  # every read: one more exit
    (m,) = rep.clock_misses
    assert m.entries and m.entries >= 1 and rep.clock_not_entered == 0
    assert "entered its guest at least" in m.describe() and "version 0" in m.describe()


def test_a_vcpu_that_never_entered_its_guest_is_no_evidence():
    rep = _once(FakeMem(), lambda i: 100)  # exits stand still: the vCPU never re-entered
    assert rep.clock_misses == [] and rep.clock_not_entered == 1


def test_a_starved_vcpu_does_not_hide_the_others_loss():
    n = itertools.count(100)
    rep = _once(FakeMem(), lambda i: next(n) if i == 0 else 100, nvcpus=2)  # vCPU 1 never re-enters
    assert [m.vcpu for m in rep.clock_misses] == [0] and rep.clock_not_entered == 1


def test_an_update_that_shows_once_the_vcpu_entered_is_seen_not_lost():
    """The vCPU gets back into its guest only after CLOCK_WAIT (a starved thread), and KVM writes the
    update then: waiting for its entry sees it."""
    t0 = time.monotonic()

    def exits(i: int) -> int:
        return 100 if time.monotonic() - t0 < 0.15 else 103

    class LateMem(FakeMem):
        def read_pvclock(self, i: int) -> tuple[int, int]:
            if exits(i) >= 102:
                return 2, self.vm.sets[-1] + 1  # type: ignore[union-attr]
            return 0, 0

    rep = _once(LateMem(), exits)
    assert rep.clock_seen == 1 and rep.clock_misses == [] and rep.clock_not_entered == 0


def test_without_an_exits_counter_the_wait_alone_judges():
    for exits in (None, lambda i: 0):  # no counter; kvm_pvm's stats stay zero
        rep = _once(FakeMem(), exits)
        (m,) = rep.clock_misses
        assert m.entries is None and "not observable" in m.describe()
