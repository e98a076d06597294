"""The race's oracles: each turns what one race recorded into a Verdict (harness.oracles.verdict)
named after the oracle a case names (plan.ORACLES), whose problems are the lines a failing case
prints. Pure functions of plain values, so tests/test_race_oracles.py can feed them broken inputs;
the two that must look at the machine are split in a measurement and a judgement (the released
memory: measure_release() then released(); a stall: thread_state() then describe_stall()).
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.memory import Feature, usage
from harness.memory.hugepages import HugepagePool
from harness.oracles.verdict import Verdict
from harness.race import protocol as P

if TYPE_CHECKING:
    from harness.health.case import CaseHealth

MAX_DETAILS = 20  # violations kept with full detail (all are counted)


# ---- what the vCPUs and the host recorded during the race ----------------------------------------
def stale(count: int, violations: Sequence[P.Violation]) -> Verdict:
    """No guest read returned other than the generation it had seen published (the guest judges
    every read, protocol.judge; `violations` are the first few, located)."""
    problems = []
    if count:
        problems.append(f"stale data: {count} guest read(s) broke the generation protocol:\n"
                        + "\n".join("    " + v.describe() for v in violations))
    return Verdict.of("stale", problems, stale_reads=count)


def ro_write(count: int, landed: Sequence[P.LandedWrite]) -> Verdict:
    """No guest write landed in a page after mprotect(PROT_READ) returned."""
    problems = []
    if count:
        problems.append(f"write through read-only: {count} guest write(s) landed in PROT_READ "
                        "pages:\n" + "\n".join("    " + w.describe() for w in landed))
    return Verdict.of("ro-write", problems, landed_ro_writes=count)


def stray_fault(gpa: int, size: int, windows: Sequence[tuple[int, int]]) -> str | None:
    """Why a KVM_EXIT_MEMORY_FAULT is not one the race can cause (None: it is): it must name
    whole pages (4 KiB, 2 MiB or 1 GiB, aligned) inside the region, where the guest accesses."""
    if size not in (1 << 12, 1 << 21, 1 << 30):
        return f"size {size:#x} is not a page size"
    if gpa % size:
        return f"gpa {gpa:#x} is not aligned to the exit's size"
    if not any(lo <= gpa and gpa + size <= hi for lo, hi in windows):
        return "outside the raced region (" + ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in windows) + ")"
    return None


def memory_faults(count: int, stray: Sequence[str]) -> Verdict:
    """Every memory-fault exit names exactly a page of the region (stray_fault())."""
    problems = []
    if stray:
        problems.append(f"memory-fault: {len(stray)} of {count} KVM_EXIT_MEMORY_FAULT exits named no page of "
                        "the region:\n" + "\n".join("    " + s for s in stray[:MAX_DETAILS]))
    return Verdict.of("memory-fault", problems, memory_fault_exits=count, stray_memory_faults=len(stray))


def progress(stalls: Sequence[str]) -> Verdict:
    """Every vCPU completed its sweeps within the bound (`stalls`: describe_stall() texts)."""
    return Verdict.of("progress", [f"progress: {s}" for s in stalls])


def kvmclock(misses: Sequence[P.ClockMiss]) -> Verdict:
    """Every KVM_SET_CLOCK's pvclock update reached the page the host maps there."""
    problems = []
    if misses:
        problems.append(f"kvmclock: {len(misses)} update(s) lost:\n"
                        + "\n".join("    " + m.describe() for m in misses[:MAX_DETAILS]))
    return Verdict.of("kvmclock", problems, kvmclock_misses=len(misses))


def overlap(total_ops: int, overlapped_ops: int, *, judged: bool = True) -> Verdict:
    """Host operations ran while a vCPU was inside KVM_RUN. Not judged (ok) when the race stalled
    or broke: then the race says why it did not race."""
    problems = []
    if judged:
        if total_ops == 0:
            problems.append("overlap: the host made no operation at all")
        elif overlapped_ops == 0:
            problems.append(f"overlap: none of {total_ops} host operations ran while a vCPU was in "
                            "KVM_RUN: the race did not race")
    return Verdict.of("overlap", problems, host_ops=total_ops, overlapped_ops=overlapped_ops)


def kernel(health: CaseHealth) -> Verdict:
    """The case's kernel-health check, judged by the same rules as every other case (known issues,
    --kmsg mode); what it reports here is not reported again after the test body. Fact `note`:
    why it was not checked."""
    if not health.active:
        return Verdict.of("kernel", (), note=f"not checked: {health.reason}")
    failure = health.check("the race")
    return Verdict.of("kernel", [failure] if failure else (), note="")


# ---- memory released after the race --------------------------------------------------------------
@dataclass(frozen=True)
class Release:
    """What one release of the whole region moved (bytes unless named otherwise)."""

    method: str  # how the disruptor released it
    footprint_method: str  # how the backing's footprint is measured
    footprint: tuple[int, int]  # the backing's footprint before, after
    rss_anon: tuple[int, int] | None = None  # the process's RssAnon before, after (private kinds)
    meminfo: tuple[str, int] | None = None  # a system-wide figure and its drop (recorded only)
    hugepages: tuple[int, int, int] | None = None  # pool pages in use before, after; pages punched
    # other harness processes' pages of this size, before and after (the pool figure is theirs too)
    other_holders: tuple[Mapping[str, int], Mapping[str, int]] = field(default=({}, {}))


def released(r: Release) -> Verdict:
    """Memory-released oracle: the release must leave the object empty and the memory must reach
    the kernel: RssAnon for private memory, the hugetlb pool's in-use count (exact when no other
    harness process holds pages of that size). Facts: method, released (what each figure
    dropped by), notes (what was recorded but not asserted)."""
    fp0, fp1 = r.footprint
    moved = {"footprint": fp0 - fp1}
    if r.meminfo is not None:
        moved[f"meminfo_{r.meminfo[0]}"] = r.meminfo[1]
    problems: list[str] = []
    notes: list[str] = []
    if fp1 != 0:
        problems.append(f"{r.footprint_method}: {fp0:#x} -> {fp1:#x} bytes, expected 0")
    if r.rss_anon is not None:
        rss0, rss1 = r.rss_anon
        moved["RssAnon"] = rss0 - rss1
        if rss0 - rss1 < 0.9 * fp0:
            problems.append(f"RssAnon {rss0:#x} -> {rss1:#x}: less than the {fp0:#x} "
                            "resident bytes released came off the process")
    if r.hugepages is not None:
        used0, used1, pages = r.hugepages
        moved["hugepages"] = used0 - used1
        others0, others1 = r.other_holders
        if not others0 and not others1:
            if used0 - used1 != pages:
                problems.append(
                    f"hugetlb pool: {used0 - used1} pages came back, {pages} were punched "
                    f"(nr_hugepages - free_hugepages {used0} -> {used1}); another page holder "
                    "(KVM reference?) kept the rest")
        else:
            notes.append("hugepage delta not asserted: other harness processes held "
                         f"pages of this size ({others0 or others1})")
    return Verdict.of("released", [f"memory not released after {r.method}: {p}" for p in problems],
                      method=r.method, released=moved, notes=notes)


def measure_release(backing: Any, size: int, release: Callable[[], str | None]) -> Release | None:
    """Measure around `release()` (a disruptor's release_whole() of the first `size` bytes), with
    the vCPUs stopped (KVM still holds its translations); None when it released nothing."""
    b = backing
    kind_anon = not b.supports(Feature.FD) and not b.supports(Feature.SHARED)
    huge = b.supports(Feature.HUGETLB)
    fp0 = _footprint(b, size)
    rss0 = usage.process_rss().get("RssAnon", 0) if kind_anon else 0
    # system-wide figures other processes move too: recorded, not asserted
    sys_key = "Unevictable" if b.supports(Feature.GUEST_MEMFD) else \
        "Shmem" if b.supports(Feature.SHARED) and not huge else None
    sys0 = usage.meminfo().get(sys_key, 0) if sys_key else 0
    others0 = _other_holders(b.page_size) if huge else {}
    used0 = _hugetlb_in_use(b.page_size) if huge else 0
    method = release()
    if method is None:
        return None
    fp1 = _footprint(b, size)
    meminfo = (sys_key, sys0 - usage.meminfo().get(sys_key, 0)) if sys_key else None
    rss = (rss0, usage.process_rss().get("RssAnon", 0)) if kind_anon else None
    hugepages = None
    others1: dict[str, int] = {}
    if huge:
        pages = fp0 // b.page_size
        used1 = _hugetlb_in_use(b.page_size)
        # hugetlb frees a page only when its last reference goes: a reference KVM kept shows here
        for _ in range(20):
            if used0 - used1 >= pages:
                break
            time.sleep(0.01)
            used1 = _hugetlb_in_use(b.page_size)
        hugepages = (used0, used1, pages)
        others1 = _other_holders(b.page_size)
    return Release(method, b.footprint_method, (fp0, fp1), rss, meminfo, hugepages, (others0, others1))


def _footprint(b: Any, size: int) -> int:
    if b.supports(Feature.FD) and not b.supports(Feature.GUEST_MEMFD):
        return usage.allocated_bytes(b.fd)
    return usage.resident_bytes(b.addr, size)


def _hugetlb_in_use(page_size: int) -> int:
    return usage.hugepage_counter(page_size, "nr_hugepages") - usage.hugepage_counter(page_size, "free_hugepages")


def _other_holders(page_size: int) -> dict[str, int]:
    pool = HugepagePool()
    atexit.unregister(pool.release_all)
    me = str(os.getpid())
    return {k: n for k, n in pool.holders(page_size).items() if k.split(":")[0] != me}


# ---- a stalled vCPU, described -------------------------------------------------------------------
@dataclass(frozen=True)
class ThreadState:
    """A vCPU thread as the kernel shows it (read before the kick changes it)."""

    tid: int
    state: str
    wchan: str
    stack: str


def thread_state(tid: int) -> ThreadState:
    stack = _proc_task(tid, "stack")
    wchan = _proc_task(tid, "wchan")
    state = _proc_task(tid, "stat").split(") ")[-1][:1] if tid else "?"
    return ThreadState(tid, state, wchan, stack)


def describe_stall(vcpu: int, why: str, *, counters: Mapping[str, int], exits: str, host: str,
                   thread: ThreadState, in_run: bool, regs: str) -> str:
    """The progress oracle's evidence: per-vCPU counters and exits, the host side's state, the
    thread's kernel stack (before the kick), the guest registers (after the kick)."""
    t = thread
    lines = [f"vcpu {vcpu}: {why}",
             f"  counters: {dict(counters)}; exits: {exits}",
             f"  host: {host}",
             f"  thread tid {t.tid} state {t.state} wchan {t.wchan or '-'}, "
             f"{'inside' if in_run else 'outside'} KVM_RUN at the time; kernel stack:",
             *("    " + ln for ln in (t.stack.strip().splitlines() or ["(empty)"])),
             "  guest registers after the kick:",
             *("    " + ln for ln in regs.splitlines())]
    return "\n".join(lines)


def _proc_task(tid: int, name: str) -> str:
    if not tid:
        return ""
    try:
        with open(f"/proc/self/task/{tid}/{name}") as f:
            return f.read()
    except OSError as e:
        return f"({name} unreadable: {e.strerror})"
