"""Faults held open on purpose (issue 15 item 3, seed 000: the mmu_notifier retry racing
get_user_pages). harness/race/disruptors/uffd.py, docs/races.md "Faults held open on purpose".

A userfaultfd holds a vCPU's fault on a page the host released (KVM's hva_to_pfn -> GUP ->
handle_userfault), the host invalidates the range while it is held (MADV_DONTNEED or an mprotect
toggle: invalidate_range_start/end, so mmu_invalidate_seq moves and KVM's fault must retry), then
lets it go with the new generation's data (UFFDIO_COPY, UFFDIO_ZEROPAGE + the host's write, or a
WAKE after the host wrote it). Every operation holds a fault, not one by chance. Oracles:

  stale, progress, kernel, overlap   as in cases/test_races.py
  uffd      faults were held and saw an invalidation while held, every held fault came from a racing
            vCPU inside KVM_RUN, no message named a page outside the op, none left held at the end

Where the held vCPUs never wait inside KVM's get_user_pages (their kernel stacks are read while held:
kvm_pvm emulates the access and reads guest memory with copy_from_user instead) the case skips with
that evidence after its oracles passed: the race ran, but not the race this file is about.
Each case races to its goal (harness.race.plan.RaceGoal, at most 1 s); --race-seconds N soaks, --race-seed S reruns.
"""

from __future__ import annotations

import pytest

from harness.memory import PAGE_2M, PAGE_4K
from harness.race.uffd import ORACLE, retries_upper_bound

ORACLES = ("stale", "progress", "kernel", "overlap", ORACLE)


def case(disruptor: str, kind: str, vcpus: int, page: int = PAGE_4K) -> object:
    cid = f"{disruptor}-{kind}-{vcpus}vcpu-{'2m' if page == PAGE_2M else '4k'}"
    return pytest.param(disruptor, kind, vcpus, page, id=cid)


CASES = [
    case("uffd", "anon", 1), case("uffd", "anon", 2), case("uffd", "shmem", 1), case("uffd", "shmem", 2),
    case("uffd", "anon-shared", 2), case("uffd", "anon", 2, PAGE_2M), case("uffd", "hugetlb-2m", 1, PAGE_2M),
    case("uffd-wp", "anon", 1), case("uffd-wp", "anon", 2), case("uffd-wp", "shmem", 2),
]


@pytest.mark.parametrize(("disruptor", "kind", "vcpus", "page"), CASES)
def test_uffd_hold(race, case_property, disruptor, kind, vcpus, page):
    """Faults held in GUP while the host invalidates their range, then let go with the new
    generation: every named oracle must hold, and the held faults must be KVM's own GUP."""
    rep = race(kind, (disruptor,), vcpus=vcpus, page=page, oracles=ORACLES)
    retries = retries_upper_bound(rep.stats)
    case_property("uffd_kvm_unfinished_faults", "not observable" if retries is None else retries)
    held = rep.extra["uffd_faults_held"]
    assert held and rep.extra["uffd_held_invalidated"], rep.summary()  # the uffd oracle says so first
    why = rep.extra_verdicts[ORACLE].facts["not_through_gup"]
    if why:
        pytest.skip(f"{disruptor} on {kind}: the race passed its oracles ({', '.join(ORACLES)}) with {held} "
                    f"faults held, but {why}")
