"""Host disruptors: threads that mutate a race region's backing while vCPUs fault on it.

Each disruptor's `step(off, length)` does one host operation on [off, off+length) of the region,
bracketed (when the operation can change what the guest may read) by the region's seqlock:
`self.begin(off, length)` (the range's pages odd in the per-page seqlock) ... syscall ...
`self.end(off, length)` (the next generation's tag in every page of the range, then published).
Disruptors with a `fast_op()` (remap, the madvise family, punch, mprotect, slot-readd, slot-move) run the
whole loop in C (harness.race._cfast, GIL released): the same ops, publications and counters as step(), which stays
the path for the others, for planted-fault subclasses and with HARNESS_RACE_FAST=0
(docs/races.md, "The fast path"); so the host side keeps pace with a C loop (bench/race.py).

A disruptor sees the race only through its HostContext (base.py): the region, the backing, the VM,
its seeded generators; the engine builds that context and never the other way round.

Which (disruptor, backing) pairs make sense is decided by `unsupported()` (static: the kind cannot
do it, or this kernel lacks the capability) and by a preflight of one operation before the vCPUs
start (the kernel refuses it: e.g. MADV_PAGEOUT on hugetlb), both turned into skips with the reason.

    base.py  HostContext, Disruptor (schedule, seqlock brackets, counters)
    host.py  the host mapping and backing: remap, dontneed, partial-thp, pageout, cold, punch, mprotect
    kvm.py   KVM's side: slot-readd, slot-move, prefault
    private.py  convertible memory (SW-protected VMs): convert, punch-private
    uffd.py  faults held open on purpose (userfaultfd): uffd, uffd-wp
"""

from __future__ import annotations

from harness.race.disruptors.base import Disruptor, HostContext
from harness.race.disruptors.host import Cold, Madvise, Mprotect, Pageout, PartialThp, Punch, Remap
from harness.race.disruptors.kvm import Prefault, SlotMove, SlotReadd
from harness.race.disruptors.private import Convert, PunchPrivate
from harness.race.disruptors.uffd import UffdMissing, UffdWp

DISRUPTORS: dict[str, type[Disruptor]] = {
    d.name: d for d in (Remap, Madvise, PartialThp, Pageout, Cold, Punch, Mprotect, SlotReadd, SlotMove,
                        Prefault, Convert, PunchPrivate, UffdMissing, UffdWp)
}

__all__ = ["DISRUPTORS", "Cold", "Convert", "Disruptor", "HostContext", "Madvise", "Mprotect", "Pageout", "PartialThp",
           "Prefault", "Punch", "PunchPrivate", "Remap", "SlotMove", "SlotReadd", "UffdMissing", "UffdWp"]
