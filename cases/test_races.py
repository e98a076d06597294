"""Races between host memory operations and faulting vCPUs (harness/race, docs/races.md).

vCPUs run guests/payloads/race_toucher.c over one memslot of a backing while a host thread mutates
the backing (munmap+mmap, madvise, fallocate punch, mprotect, memslot delete/re-add/move,
KVM_PRE_FAULT_MEMORY, private <-> shared conversions of a SW-protected VM's memory). Each case
names the oracles it checks:

  stale     no guest read returns an older generation than it had seen published (per-page seqlock)
  ro-write  no guest write lands in a page after mprotect(PROT_READ) returned
  progress  every vCPU completes a sweep within the bound (else: counters, kernel stack, guest RIP)
  released  after the race the disruptor's own release empties the object and frees the memory
  kernel    no new WARN/BUG/Oops/KASAN/lockdep record or taint during the case
  overlap   host operations really ran while vCPUs were inside KVM_RUN (measured per op)
  memory-fault  (private memory) every KVM_EXIT_MEMORY_FAULT names whole pages of the region
  kvmclock  (cases marked -kvmclock) every KVM_SET_CLOCK's pvclock update reaches the page the host
            maps where the vCPUs' kvmclocks live, while that page is punched/zapped: KVM writes it
            through its gfn_to_pfn_cache, which every invalidation must refresh

By default a case races to its goal (RaceGoal: 6 sweeps per vCPU, 32 overlapped ops per disruptor,
at most 1 s); `--race-seconds N` races N s each (soaks), `--race-seed S` for exact reruns
(every report prints its rerun command). `test_race_soak` covers every disruptor on every backing
that supports it and runs only when --race-seconds is given:

    .venv/bin/python -m pytest cases/test_races.py -k soak --race-seconds 60
"""

from __future__ import annotations

import pytest

from harness import memory
from harness.memory import PAGE_1G, PAGE_2M, PAGE_4K
from harness.race.disruptors import DISRUPTORS

BASE = ("stale", "progress", "kernel", "overlap")
EXTRA = {"mprotect": ("ro-write",), "punch": ("released",), "dontneed": ("released",),
         "partial-thp": ("released",), "convert": ("memory-fault",), "punch-private": ("memory-fault",),
         "uffd": ("uffd",), "uffd-wp": ("uffd",)}
PRIVATE_DISRUPTORS = ("convert", "punch-private")  # only on convertible memory (a SW-protected VM)


def oracles(disruptor: str, clock: bool = False) -> tuple[str, ...]:
    out = BASE
    for d in disruptor.split("+"):
        out += EXTRA.get(d, ())
    return out + (("kvmclock",) if clock else ())


def _page_name(p: int) -> str:
    return "2m" if p == PAGE_2M else "4k"


def case(disruptor: str, kind: str, vcpus: int, page: int = PAGE_4K, clock: bool = False) -> object:
    cid = f"{disruptor}-{kind}-{vcpus}vcpu-{_page_name(page)}" + ("-kvmclock" if clock else "")
    return pytest.param(disruptor, kind, vcpus, page, clock, id=cid)


M4, M2 = PAGE_4K, PAGE_2M

# The cross product that makes sense, trimmed to what the suite budget affords (~1 s each): every
# disruptor on the backings it is about, 1/2/4 vCPUs, 4 KiB and 2 MiB guest pages, hugetlb-1g once.
CASES = [
    case("remap", "anon", 1), case("remap", "anon", 4), case("remap", "anon-shared", 2),
    case("remap", "shmem", 2), case("remap", "tmpfs", 1), case("remap", "hugetlb-2m", 2, M2),
    case("remap", "anon-thp", 2, M2), case("remap", "guest_memfd", 2), case("remap", "file", 1),
    case("dontneed", "anon", 1), case("dontneed", "anon", 2, M2), case("dontneed", "anon-shared", 2),
    case("dontneed", "anon-thp", 2, M2), case("dontneed", "shmem", 2), case("dontneed", "hugetlb-2m", 1, M2),
    case("dontneed", "guest_memfd", 1),
    case("partial-thp", "anon-thp", 1, M2), case("partial-thp", "anon-thp", 4, M2),
    case("partial-thp", "anon-thp", 2, M4),
    case("pageout", "anon", 2), case("pageout", "shmem", 2), case("cold", "anon", 1), case("cold", "shmem", 1),
    case("punch", "shmem", 1), case("punch", "shmem", 4), case("punch", "tmpfs", 2),
    case("punch", "hugetlb-2m", 2, M2), case("punch", "hugetlbfs-2m", 2, M2), case("punch", "hugetlb-1g", 1, M2),
    case("punch", "guest_memfd", 2), case("punch", "guest_memfd", 4), case("punch", "anon-shared", 2),
    case("punch", "file", 1),
    case("mprotect", "anon", 1), case("mprotect", "anon", 4), case("mprotect", "shmem", 2),
    case("mprotect", "hugetlb-2m", 2, M2), case("mprotect", "anon-thp", 2, M2), case("mprotect", "guest_memfd", 2),
    case("slot-readd", "anon", 1), case("slot-readd", "anon", 2), case("slot-readd", "shmem", 2),
    case("slot-readd", "hugetlb-2m", 2, M2), case("slot-readd", "guest_memfd", 2),
    case("slot-readd", "anon-thp", 1, M2),
    case("slot-move", "anon", 1), case("slot-move", "anon", 4), case("slot-move", "shmem", 2),
    case("slot-move", "hugetlb-2m", 2, M2),
    case("prefault", "anon", 2), case("prefault", "guest_memfd", 2),
    case("punch+prefault", "guest_memfd", 2),
    # KVM's own writes (pvclock through the gfn_to_pfn_cache) racing the same invalidations
    case("punch", "shmem", 2, clock=True), case("punch", "guest_memfd", 2, clock=True),
    case("punch", "hugetlb-2m", 1, M2, clock=True), case("dontneed", "anon", 2, clock=True),
    case("partial-thp", "anon-thp", 2, M2, clock=True),
    # private memory (SW-protected VMs, seeds 001/003): conversions and private-side punches under the
    # vCPUs; skips with the reason on kernels without KVM_X86_SW_PROTECTED_VM
    case("convert", "private", 1), case("convert", "private", 2), case("convert", "private", 2, M2),
    case("convert+punch-private", "private", 2), case("convert+slot-readd", "private", 2),
]


@pytest.mark.parametrize(("disruptor", "kind", "vcpus", "page", "clock"), CASES)
def test_race(race, disruptor, kind, vcpus, page, clock):
    """The disruptor mutates the backing for the case's duration while the vCPUs sweep it; every
    named oracle must hold (the failure message carries the report and the rerun command)."""
    rep = race(kind, tuple(disruptor.split("+")), vcpus=vcpus, page=page, oracles=oracles(disruptor, clock),
               kvmclock=clock)
    assert sum(rep.sweeps) >= vcpus and rep.total_ops > 0
    if clock:
        assert rep.clock_seen > 0, "no kvmclock update was ever seen: the oracle checked nothing"


def _soak_params() -> list:
    out = []
    for d in DISRUPTORS:
        private = d in PRIVATE_DISRUPTORS
        for kind in memory.names(require=memory.Feature.PRIVATE) if private else memory.names():
            kp = memory.kind(kind).page_size
            page = M2 if kp in (PAGE_2M, PAGE_1G) else M4
            out.append(pytest.param(d, kind, page, id=f"{d}-{kind}"))
    return out


@pytest.mark.race_soak
@pytest.mark.parametrize(("disruptor", "kind", "page"), _soak_params())
def test_race_soak(race, disruptor, kind, page):
    """Every disruptor on every backing (2 vCPUs), for --race-seconds; deselected without it.
    Pairs that make no sense skip with the reason."""
    rep = race(kind, (disruptor,), vcpus=2, page=page, oracles=oracles(disruptor), progress_bound=10.0)
    uffd = rep.extra_verdicts.get("uffd")
    if uffd is not None and uffd.facts.get("not_through_gup"):
        # as cases/test_uffd.py: held faults that never went through GUP did not test the retry path
        pytest.skip(f"{disruptor} on {kind}: oracles held, but {uffd.facts['not_through_gup']}")
