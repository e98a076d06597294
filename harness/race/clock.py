"""The kvmclock oracle's host side: each vCPU's kvmclock lives in the region's first page; a thread
issues KVM_SET_CLOCK over and over while the disruptors work, and after each one every vCPU's
pvclock in the page the host maps must show it (KVM writes it through its gfn_to_pfn_cache, which
every invalidation of that page must refresh), unless a host op touched that page first."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from harness.race import protocol as P
from harness.race.region import GPA_A
from harness.x86 import kvmclock

if TYPE_CHECKING:
    from harness.lib.guestvm import GuestVm
    from harness.race.region import Region
    from harness.race.report import RaceReport

CLOCK_STEP = 1_000_000_000  # each KVM_SET_CLOCK jumps 1 s ahead: an old update never looks new
CLOCK_WAIT = 0.5  # seconds for an update to show before it is a miss
CLOCK_DISRUPTORS = {"punch", "dontneed", "partial-thp", "pageout", "cold"}  # keep the page mapped


def enable(vm: GuestVm, mem: Region) -> None:
    """Point every vCPU's kvmclock into the region's first page."""
    for v in vm.vcpus:
        v.set_msrs({kvmclock.MSR_KVM_SYSTEM_TIME_NEW: kvmclock.enable_value(mem.pvclock_gpa(v.id))})


class ClockSetter:
    """KVM_SET_CLOCK, then the pvclock check; results go to the report (clock_* fields)."""

    def __init__(self, vm: GuestVm, mem: Region, report: RaceReport, nvcpus: int,
                 vcpus_gone: Callable[[], bool], exits: Callable[[int], int] | None = None) -> None:
        self.vm = vm
        self.mem = mem
        self.report = report
        self.nvcpus = nvcpus
        self.vcpus_gone = vcpus_gone  # a vCPU finished or failed: its pvclock no longer updates
        self.exits = exits  # vCPU i's VM exits so far (KVM's "exits" stat); 0 throughout: not observable
        self._base: int | None = None

    def _entries_since(self, i: int, exits0: list[int] | None) -> int | None:
        """How many times vCPU i surely entered its guest since the set (None: not observable)."""
        if exits0 is None or self.exits is None:
            return None
        now = self.exits(i)
        if not now:
            return None  # kvm_pvm keeps its binary stats at zero
        return max(0, now - exits0[i] - 1)

    def main(self, stop: threading.Event) -> None:
        """KVM_SET_CLOCK over and over until `stop` (see once)."""
        try:
            while not stop.is_set():
                self.once()
        except BaseException as e:
            self.report.errors.append(f"kvmclock thread: {e!r}")

    def once(self) -> None:
        """One KVM_SET_CLOCK; then every vCPU's pvclock must show it in the page the host maps,
        unless a host op touched that page first (then: inconclusive)."""
        rep = self.report
        mem = self.mem
        if self._base is None:
            self._base = self.vm.get_clock() + CLOCK_STEP
        self._base += CLOCK_STEP
        set_ns = self._base
        before = mem.page0_changes
        self.vm.set_clock(set_ns)
        exits0 = [self.exits(i) for i in range(self.nvcpus)] if self.exits is not None else None
        rep.clock_sets += 1
        t0 = time.monotonic()
        pending = set(range(self.nvcpus))
        while pending:
            for i in list(pending):
                ver, st = mem.read_pvclock(i)
                if P.pvclock_fresh(ver, st, set_ns, CLOCK_STEP):
                    pending.discard(i)
                    rep.clock_seen += 1
            if not pending:
                return
            if mem.page0_changes != before or self.vcpus_gone():
                rep.clock_inconclusive += 1
                return
            waited = time.monotonic() - t0
            if waited > CLOCK_WAIT:
                entered = {i: self._entries_since(i, exits0) for i in pending}
                if waited <= P.CLOCK_ENTRY_WAIT and any(n == 0 for n in entered.values()):
                    time.sleep(0.001)  # a vCPU has not entered its guest since the set: KVM had no chance yet
                    continue
                for i in sorted(pending):
                    if entered[i] == 0:  # no evidence either way; the others still judge
                        rep.clock_not_entered += 1
                        continue
                    ver, st = mem.read_pvclock(i)
                    gpa = mem.pvclock_gpa(i)
                    rep.clock_misses.append(P.ClockMiss(i, set_ns, gpa, mem.hva + gpa - GPA_A, ver, st, waited,
                                                        entered[i]))
                return
            time.sleep(0)  # let the vCPU threads take the GIL for their exits
