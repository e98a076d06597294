"""The race engine's oracles fed deliberately broken inputs: each must fail, and say exactly what
went wrong. Pure checks of harness.race.protocol and harness.race.oracles first, then end-to-end
ones on the real /dev/kvm
where a host that breaks the protocol on purpose (publishes a generation without its data, writes
a read-only page behind the guest's back, stalls) must be caught by the real guest and engine."""

from __future__ import annotations

import os
import threading
from array import array

import pytest

from harness.health.case import CaseHealth
from harness.health.kmsg import parse_kmsg_record
from harness.health.oracle import KmsgOracle
from harness.race import oracles as O
from harness.race import protocol as P
from harness.race.disruptors import DISRUPTORS, Convert, Disruptor, Mprotect
from harness.race.engine import Race
from harness.race.plan import RaceSpec
from harness.race.report import RaceReport

# ---- protocol (pure) -------------------------------------------------------------------------------


def test_tag_round_trip_and_layout():
    t = P.tag(123456, 511)
    assert t >> 48 == P.MAGIC
    assert P.TagInfo.decode(t) == P.TagInfo(True, 123456, 511)
    assert P.tag_base(7) + 42 == P.tag(7, 42)  # the engine's range() rewrite relies on this
    assert P.tag(P.GEN_MASK + 2, 3) == P.tag(1, 3)  # 28-bit generations wrap, as in the guest


def test_judge_accepts_current_and_ignores_reads_in_flux():
    v = P.judge(P.tag(5, 9), 10, 10, 9)
    assert v.ok and v.facts["judged"]
    # the page was in flux (odd, or changed under the read): not judged, whatever was read
    for v in (P.judge(0, 11, 11, 9), P.judge(P.tag(4, 9), 10, 12, 9)):
        assert v.ok and not v.facts["judged"]


def test_judge_flags_a_stale_generation():
    v = P.judge(P.tag(4, 9), 10, 10, 9)  # published generation 5, read generation 4
    assert not v.ok and v.problems[0].startswith("stale: generation 4, 1 older")


@pytest.mark.parametrize(("seen", "want"), [
    (0, "zero"),
    (0x1122334455667788, "foreign data"),
    (P.MMIO_POISON, "MMIO exit"),
    (P.tag(5, 8), "the tag of page 8"),
    (P.tag(9, 9), "newer generation 9"),
])
def test_classify_names_what_was_seen(seen, want):
    assert want in P.classify(seen, 5, 9)


def test_violation_says_where_and_which_generations():
    v = P.Violation(vcpu=1, page=3, seen=P.tag(4, 3), seq=10, ops=77, gva=0x8000003000,
                    gpa=0x1000003000, hva=0x7F0000003000, host_now=P.tag(5, 3))
    d = v.describe()
    for part in ("vcpu 1", "page 3", "GPA 0x1000003000", "hva 0x7f0000003000", "gva 0x8000003000",
                 "expected generation 5", "seen generation 4", "stale", "after 77 host ops",
                 "host mapping holds"):
        assert part in d, (part, d)


def test_landed_writes_compares_columns():
    before = {0: [1, 2, 3], 2: [7, 7, 7]}
    assert P.landed_writes(before, {0: [1, 2, 3], 2: [7, 7, 7]}, 10, (0x1000, 0x7000, 0x1000)) == []
    got = P.landed_writes(before, {0: [1, 9, 3], 2: [7, 7, 7]}, 10, (0x1000, 0x7000, 0x1000))
    assert len(got) == 1
    w = got[0]
    assert (w.vcpu, w.page, w.before, w.after) == (0, 11, 2, 9)
    assert w.gpa == 0x1000 + 11 * 0x1000 + 8 and w.hva == 0x7000 + 11 * 0x1000 + 8
    assert "PROT_READ" in w.describe()


def test_report_fails_only_on_the_named_oracles():
    rep = RaceReport(RaceSpec("anon", ("dontneed",), seed=99), host_ops={"dontneed": 10}, overlapped_ops=10)
    assert rep.failures() == []
    rep.violation_count = 1
    rep.violations = [P.Violation(0, 1, 0, 4, 0, 0x8000001000, 0x1000001000, 0x7F0000001000)]
    rep.release = O.released(O.Release("madvise", "mincore", (0x1000, 0x1000)))
    assert any(f.startswith("stale data: 1 guest read") for f in rep.failures(("stale",)))
    assert rep.failures(("progress",)) == []
    assert any("memory not released" in f for f in rep.failures(("released",)))
    msg = rep.failure_message(rep.failures(), "cd /repo && pytest X --race-seed 99")
    assert "seed 99" in msg and "--race-seed 99" in msg and "expected generation 2" in msg


def test_report_overlap_oracle():
    rep = RaceReport(RaceSpec("anon", ("dontneed",)), host_ops={"dontneed": 10}, overlapped_ops=0)
    assert any("did not race" in f for f in rep.failures(("overlap",)))
    rep.host_ops = {"dontneed": 0}
    assert any("no operation" in f for f in rep.failures(("overlap",)))
    rep.stalls = ["vcpu 0: stalled"]  # a stalled race says why it did not race: overlap is not judged
    assert [v.ok for v in rep.verdicts(("overlap",))] == [True]


def test_memory_fault_oracle_names_stray_exits():
    from harness.race.region import GPA_A, GPA_B

    win = ((GPA_A, GPA_A + (2 << 20)), (GPA_B, GPA_B + (2 << 20)))
    assert O.stray_fault(GPA_A + 0x3000, 0x1000, win) is None
    assert O.stray_fault(GPA_B, 1 << 21, win) is None
    assert "not aligned" in O.stray_fault(GPA_A + 0x3008, 0x1000, win)
    assert "not a page size" in O.stray_fault(GPA_A, 0x3000, win)
    assert "outside the raced region" in O.stray_fault(GPA_A + (2 << 20), 0x1000, win)
    rep = RaceReport(RaceSpec("private", ("convert",)), host_ops={"convert": 5}, overlapped_ops=5,
                     memory_faults=3, stray_faults=["vcpu 1: MEMORY_FAULT(gpa=0x10, ...): outside"])
    fails = rep.failures(("memory-fault",))
    assert len(fails) == 1 and "1 of 3 KVM_EXIT_MEMORY_FAULT" in fails[0] and "vcpu 1" in fails[0]
    assert rep.failures(("stale",)) == []


def test_released_names_what_stayed():
    v = O.released(O.Release("madvise(MADV_DONTNEED)", "mincore", (0x4000, 0), rss_anon=(0x9000, 0x8000)))
    assert not v.ok and len(v.problems) == 1
    assert v.problems[0].startswith("memory not released after madvise(MADV_DONTNEED): RssAnon 0x9000 -> 0x8000")
    assert v.facts["released"] == {"footprint": 0x4000, "RssAnon": 0x1000}
    kept = O.released(O.Release("punch", "st_blocks", (4 * 0x200000, 0), hugepages=(10, 7, 4)))
    assert not kept.ok and "3 pages came back, 4 were punched" in kept.problems[0]
    shared = O.released(O.Release("punch", "st_blocks", (4 * 0x200000, 0), hugepages=(10, 7, 4),
                                  other_holders=({"123:x": 2}, {})))
    assert shared.ok and "not asserted" in shared.facts["notes"][0]
    rep = RaceReport(RaceSpec("hugetlb-2m", ("punch",)), release=shared)
    assert "released after punch: footprint 0x800000, hugepages 0x3; hugepage delta" in rep.summary()


class _Log:
    """A kernel log with the records a case would have drained (the reader is tested elsewhere)."""

    available = True
    reason = ""
    lost = 0

    def __init__(self, texts: list[str]) -> None:
        self.recs = [parse_kmsg_record(f"4,{i + 1},1000,-;{t}\n") for i, t in enumerate(texts)]

    def drain(self):
        out, self.recs = self.recs, []
        return out

    def close(self) -> None:
        pass


def _health(texts: list[str]) -> CaseHealth:
    o = KmsgOracle("off")
    o.mode = "fail"
    o.reader = _Log([])  # type: ignore[assignment]
    w = o.begin("cases/test_races.py::test_race[x]")
    o.reader = _Log(texts)  # type: ignore[assignment]
    return CaseHealth(o, w)


def test_kernel_oracle_reports_new_splats():
    rep = RaceReport(RaceSpec("anon", ("dontneed",)), host_ops={"dontneed": 1}, overlapped_ops=1)
    rep.kernel = O.kernel(_health(["kvm: fine", "WARNING: CPU: 1 PID: 42 at arch/x86/kvm/mmu/mmu.c:123 "
                                   "kvm_mmu_page_fault+0x1/0x2"]))
    fails = rep.failures(("kernel",))
    assert len(fails) == 1 and "WARNING" in fails[0] and "mmu.c:123" in fails[0]
    clean = RaceReport(RaceSpec("anon", ("dontneed",)))
    clean.kernel = O.kernel(_health(["kvm: fine"]))
    assert clean.failures(("kernel",)) == []


def test_kernel_oracle_is_the_case_health_check():
    # What the race reported is not reported again by the check after the test body.
    h = _health(["WARNING: CPU: 1 PID: 42 at arch/x86/kvm/mmu/mmu.c:123 kvm_mmu_page_fault+0x1/0x2"])
    rep = RaceReport(RaceSpec("anon", ("dontneed",)), host_ops={"dontneed": 1}, overlapped_ops=1)
    rep.kernel = O.kernel(h)
    assert rep.failures(("kernel",)) and h.check("teardown") is None


# ---- end to end: a host that breaks the protocol on purpose ---------------------------------------


class StalePublisher(Disruptor):
    """Publishes each new generation in gentab without writing its data: every guest read of
    those pages then returns the previous generation's tag: a stale read the guest must report."""

    name = "broken-stale"

    def step(self, off: int, length: int) -> None:
        m = self.mem
        self.begin(off, length)
        gen = m.gen + 1
        p0, p1 = m.pages_of(off, length)
        m.gentab[p0:p1] = array("Q", (2 * gen,)) * (p1 - p0)  # no tag rewrite: the data is old
        m.gen = gen
        self.abort()  # the writers' lock, released without end()'s publishing
        self.ops += 1


class ForgetfulConvert(Convert):
    """A conversion the host 'forgets' to undo: the range is made private and the next generation is
    published while it still is. The guest then reads the private side (a fresh guest_memfd page:
    zeros) where the protocol says the new shared tag must be: the stale oracle must name it."""

    name = "broken-convert"

    def step(self, off: int, length: int) -> None:
        gpa = self.mem.gpa_now + off
        self.begin(off, length)
        self.set_attrs(gpa, length, 8)  # PRIVATE, never back to shared
        self.end(off, length)


class LandingWriter(Mprotect):
    """While a range is PROT_READ, writes vCPU 0's word of its first page through the file (a
    second view of the same shmem page): exactly what a guest write through read-only looks like."""

    name = "broken-ro"

    def step(self, off: int, length: int) -> None:
        was_rw = self.ro is None
        super().step(off, length)
        if was_rw and self.ro is not None:
            o, _ = self.ro
            p0, _ = self.mem.pages_of(o, length)
            os.pwrite(self.ctx.backing.fd, (0xBAD0_0000_0000 + self.ops).to_bytes(8, "little"),
                      p0 * self.mem.stride + 8)


def _run(kvm, backings, spec):
    race = Race(kvm, spec, lambda k, size, vm: backings(k, size, vm=vm))
    try:
        return race.run(), race
    finally:
        race.close()


def test_stale_generation_is_caught_by_the_guest(kvm, backings, monkeypatch):
    monkeypatch.setitem(DISRUPTORS, StalePublisher.name, StalePublisher)
    spec = RaceSpec("anon", (StalePublisher.name,), vcpus=1, seconds=0.3, seed=1, label="broken-stale")
    rep, _ = _run(kvm, backings, spec)
    assert rep.violation_count > 0, rep.summary()
    fails = rep.failures(("stale",))
    assert len(fails) == 1
    v = rep.violations[0]
    assert v.seen_gen is not None and P.gen_before(v.seen_gen, v.expected_gen), v.describe()
    assert v.gpa == spec_gpa(v) and v.hva != 0
    for part in ("stale data", "GPA 0x", "hva 0x", "expected generation", "seen generation", "stale:"):
        assert part in fails[0], (part, fails[0])
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("race-"))


def spec_gpa(v: P.Violation) -> int:
    from harness.race.region import GPA_A, GPA_B, geometry

    _, stride = geometry("anon", 4096)
    return (GPA_B if v.loc else GPA_A) + v.page * stride


def test_a_skipped_conversion_back_is_caught(kvm, backings, monkeypatch):
    """Planted fault for the private-memory races: a range published while still private. Runs where
    the kernel has SW-protected VMs (the runner's debian:7.3.4+KVM_SW_PROTECTED_VM=y), skips elsewhere."""
    monkeypatch.setitem(DISRUPTORS, ForgetfulConvert.name, ForgetfulConvert)
    spec = RaceSpec("private", (ForgetfulConvert.name,), vcpus=1, seconds=0.3, seed=6, label="broken-convert")
    rep, _ = _run(kvm, backings, spec)
    assert rep.violation_count > 0, rep.summary()
    fails = rep.failures(("stale",))
    assert len(fails) == 1 and "zero" in fails[0], fails


def test_write_through_read_only_is_caught(kvm, backings, monkeypatch):
    monkeypatch.setitem(DISRUPTORS, LandingWriter.name, LandingWriter)
    spec = RaceSpec("shmem", (LandingWriter.name,), vcpus=1, seconds=0.3, seed=2, label="broken-ro")
    rep, _ = _run(kvm, backings, spec)
    assert rep.landed_count > 0, rep.summary()
    fails = rep.failures(("ro-write",))
    assert len(fails) == 1 and "PROT_READ" in fails[0] and "vcpu 0's word" in fails[0]
    assert rep.violation_count == 0  # the tags were never touched: reads stay right


def test_a_stall_reports_counters_kernel_stack_and_rip(kvm, backings):
    # a bound far below one sweep's time: the first sweep "stalls"
    spec = RaceSpec("anon", ("dontneed",), vcpus=1, seconds=0.3, seed=3, progress_bound=0.001,
                    label="stall")
    rep, _ = _run(kvm, backings, spec)
    fails = rep.failures(("progress",))
    assert fails, rep.summary()
    text = fails[0]
    for part in ("vcpu 0", "did not complete its first sweep", "counters:", "kernel stack", "rip="):
        assert part in text, (part, text)
    assert rep.total_ops == 0  # the host never started: a stall before the race is reported as such


def test_a_lost_kvmclock_update_is_caught(kvm, backings, monkeypatch):
    """Point the vCPUs' kvmclock MSR one page away from where the host looks: every update then
    "never reaches" the page the host checks, which is what a stale gfn_to_pfn_cache looks like."""
    from harness.race import clock, region

    monkeypatch.setattr(region.Region, "pvclock_gpa",
                        lambda self, v: region.GPA_A + 0x1000 + P.PVCLOCK_OFFSET + P.PVCLOCK_SIZE * v)
    monkeypatch.setattr(clock, "CLOCK_WAIT", 0.05)
    spec = RaceSpec("anon", ("dontneed",), vcpus=1, seconds=0.3, seed=5, label="clock", kvmclock=True)
    rep, _ = _run(kvm, backings, spec)
    fails = rep.failures(("kvmclock",))
    assert fails and "KVM_SET_CLOCK" in fails[0] and "gfn_to_pfn_cache" in fails[0], rep.summary()


def test_pvclock_fresh():
    assert P.pvclock_fresh(2, 5_000_000_100, 5_000_000_000, 1_000_000_000)
    assert not P.pvclock_fresh(3, 5_000_000_100, 5_000_000_000, 1_000_000_000)  # update in progress
    assert not P.pvclock_fresh(2, 4_000_000_100, 5_000_000_000, 1_000_000_000)  # the previous set
    assert not P.pvclock_fresh(0, 0, 5_000_000_000, 1_000_000_000)  # punched: zeros


def test_a_clean_race_passes_every_oracle(kvm, backings):
    """The control: the same engine with a correct host finds nothing."""
    spec = RaceSpec("anon", ("dontneed",), vcpus=2, seconds=0.3, seed=4, label="clean", kvmclock=True)
    rep, _ = _run(kvm, backings, spec)
    assert rep.failures() == [], rep.summary()
    assert rep.judged > 0 and rep.overlapped_ops > 0 and rep.release is not None and rep.clock_seen > 0
