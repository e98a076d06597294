"""The race engine: vCPU threads sweeping a region with race_toucher while host disruptor threads
mutate its backing; oracles judge what the guest read, what it wrote, whether it progressed,
whether memory came back and whether the kernel log stayed clean.

    race = Race(kvm, RaceSpec("shmem", ("punch",), vcpus=2, seconds=1, seed=7), make_backing)
    try:
        report = race.run()
    finally:
        race.close()
    assert not report.failures(), report.failure_message(report.failures(), rerun)

Threads: one per vCPU (KVM_RUN releases the GIL), one per disruptor (each syscall releases it),
and the caller's thread, which watches progress and stops everything. Every wait is bounded; the
vCPUs are also bounded by the watchdog. Overlap is measured, not assumed: per host op, whether a
vCPU was inside KVM_RUN when it began and when it ended, and per guest read, whether it saw the
host's seqlock move (`influx`).
"""

from __future__ import annotations

import atexit
import errno
import os
import random
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness import backends as backend
from harness import memory
from harness.health import case as case_health
from harness.kvm._cffi import ffi
from harness.kvm.errors import HarnessError, KvmError
from harness.kvm.exits import Intr, Io, Mmio
from harness.kvm.stats import delta as stats_delta
from harness.kvm.watchdog import WATCHDOG
from harness.lib.failures import UnexpectedExitError
from harness.lib.guestvm import GuestVm
from harness.lib.ucall import DONE, PRINTF, SYNC, UCALL_PORT, read_ucall
from harness.memory import PAGE_1G, PAGE_2M, PAGE_4K, Feature, usage
from harness.memory.hugepages import HugepagePool
from harness.race import protocol as P
from harness.race.disruptors import DISRUPTORS, Disruptor
from harness.x86 import kvmclock

if TYPE_CHECKING:
    from harness.kvm.system import Kvm
    from harness.kvm.vcpu import Vcpu
    from harness.kvm.vm import Vm
    from harness.memory import Backing

MakeBacking = Callable[[str, int, "Vm"], "Backing"]

GPA_A = 1 << 36
GPA_B = (1 << 36) + (4 << 30)  # memslot-move target: 4 GiB above, any page size fits
GVA_A = 1 << 39
GVA_B = (1 << 39) + (4 << 30)
MMIO_POISON = P.MMIO_POISON  # what a read of a GPA with no usable memory returns ("mmio")
MAX_DETAILS = 20  # violations kept with full detail (all are counted)
POLL = 0.01
ORACLES = ("stale", "ro-write", "progress", "released", "kernel", "overlap", "kvmclock")
CLOCK_STEP = 1_000_000_000  # each KVM_SET_CLOCK jumps 1 s ahead: an old update never looks new
CLOCK_WAIT = 0.5  # seconds for an update to show before it is a miss
CLOCK_DISRUPTORS = {"punch", "dontneed", "partial-thp", "pageout", "cold"}  # keep the page mapped


class RaceUnsupported(HarnessError):
    """This (backing, disruptor) pair cannot run here; the message is the reason (cases skip)."""


@dataclass(frozen=True)
class RaceSpec:
    kind: str
    disruptors: tuple[str, ...]
    vcpus: int = 1
    page: int = PAGE_4K  # guest mapping size of the region (4 KiB PTEs or 2 MiB PDEs)
    seconds: float = 1.0
    seed: int = 0
    max_ops: int | None = None  # stop after this many ops of the first disruptor (bench)
    progress_bound: float = 5.0  # a vCPU that completes no sweep for this long has stalled
    writers: int | None = None  # bit i: vCPU i writes its word of each page (default: see Race)
    label: str = ""  # the case's id, mixed into the RNG seed
    # (disruptor CPU, vCPU CPU): pin the threads (bench: both sides alike, less scheduler noise);
    # None in cases, where xdist workers share the CPUs
    pin: tuple[int, int] | None = None
    # a thread doing KVM_SET_CLOCK while the disruptor works: each vCPU's kvmclock lives in the
    # region's first page and every update must reach the page the host maps there (KVM writes it
    # through its gfn_to_pfn_cache, which invalidations must refresh)
    kvmclock: bool = False

    def describe(self) -> str:
        return (f"{'+'.join(self.disruptors)} on {self.kind}, {self.vcpus} vCPU(s), "
                f"{'2 MiB' if self.page == PAGE_2M else '4 KiB'} guest pages, {self.seconds:g} s, "
                f"seed {self.seed}")


def geometry(kind: str, page: int) -> tuple[int, int]:
    """(region bytes, tag stride) for a backing kind and guest page size: ~512-1024 tags a sweep
    (kvm_pvm refaults a 4 KiB page in ~10 us, so a fully invalidated sweep stays ~10 ms)."""
    kp = memory.kind(kind).page_size
    if kp == PAGE_1G:
        return PAGE_1G, PAGE_2M
    if kp == PAGE_2M:
        if kind == "anon-thp":
            return 4 * PAGE_2M, 4 * PAGE_4K  # 512 tags; partial-THP zaps go down to 16 KiB
        return 4 * PAGE_2M, 4 * PAGE_4K
    if page == PAGE_2M:
        return 2 * PAGE_2M, 2 * PAGE_4K
    return PAGE_2M, PAGE_4K


@dataclass
class VcpuState:
    native_tid: int = 0
    efault: int = 0  # KVM_RUN -EFAULT (upstream's answer to a write to PROT_READ / unmapped hva)
    memory_faults: int = 0  # ... of which carried KVM_EXIT_MEMORY_FAULT
    mmio_reads: int = 0  # kvm_pvm's answer (and a memslot gap's, everywhere)
    mmio_writes: int = 0
    intr: int = 0
    done: bool = False
    error: BaseException | None = None
    diag: str | None = None
    diag_event: threading.Event = field(default_factory=threading.Event)
    diag_requested: bool = False
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class RaceReport:
    spec: RaceSpec
    backend: str = ""
    duration: float = 0.0
    region: int = 0
    stride: int = 0
    host_ops: dict[str, int] = field(default_factory=dict)
    host_seconds: float = 0.0  # the first disruptor's own time from its first op to its last
    host_bytes: int = 0
    overlapped_ops: int = 0
    generations: int = 0
    sweeps: list[int] = field(default_factory=list)
    sweeps_in_race: int = 0  # completed while the host was disrupting
    judged: int = 0
    influx: int = 0
    writes: int = 0
    efault: int = 0
    memory_faults: int = 0
    mmio_reads: int = 0
    mmio_writes: int = 0
    violation_count: int = 0
    violations: list[P.Violation] = field(default_factory=list)
    landed_count: int = 0
    landed: list[P.LandedWrite] = field(default_factory=list)
    stalls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    released: dict[str, int] = field(default_factory=dict)
    release_method: str | None = None
    release_problems: list[str] = field(default_factory=list)
    release_notes: list[str] = field(default_factory=list)
    clock_sets: int = 0
    clock_seen: int = 0  # updates seen in the host mapping
    clock_inconclusive: int = 0  # a host op touched the page before the update showed
    clock_misses: list[P.ClockMiss] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    stats_note: str = ""
    kernel_failure: str = ""  # the case's kernel-health verdict (harness/health/case.py), when it fails
    kmsg_note: str = ""

    # ---- figures -------------------------------------------------------------------------------
    @property
    def total_ops(self) -> int:
        return sum(self.host_ops.values())

    @property
    def ops_per_s(self) -> float:
        t = self.host_seconds or self.duration
        return self.total_ops / t if t else 0.0

    @property
    def sweeps_per_s(self) -> float:
        """Guest sweeps per second while the host was disrupting (all vCPUs)."""
        return self.sweeps_in_race / self.duration if self.duration else 0.0

    @property
    def overlap_fraction(self) -> float:
        return self.overlapped_ops / self.total_ops if self.total_ops else 0.0

    # ---- oracles -------------------------------------------------------------------------------
    def failures(self, oracles: tuple[str, ...] = ORACLES) -> list[str]:
        """One line per broken oracle (only those named); harness errors always count."""
        out = [f"harness/thread error: {e}" for e in self.errors]
        if "stale" in oracles and self.violation_count:
            out.append(f"stale data: {self.violation_count} guest read(s) broke the generation protocol:\n"
                       + "\n".join("    " + v.describe() for v in self.violations))
        if "ro-write" in oracles and self.landed_count:
            out.append(f"write through read-only: {self.landed_count} guest write(s) landed in PROT_READ "
                       "pages:\n" + "\n".join("    " + w.describe() for w in self.landed))
        if "progress" in oracles:
            out += [f"progress: {s}" for s in self.stalls]
        if "kvmclock" in oracles and self.clock_misses:
            out.append(f"kvmclock: {len(self.clock_misses)} update(s) lost:\n"
                       + "\n".join("    " + m.describe() for m in self.clock_misses[:MAX_DETAILS]))
        if "released" in oracles and self.release_problems:
            out += [f"memory not released after {self.release_method}: {p}" for p in self.release_problems]
        if "kernel" in oracles and self.kernel_failure:
            out.append(self.kernel_failure)
        if "overlap" in oracles and not self.stalls and not self.errors:
            if self.total_ops == 0:
                out.append("overlap: the host made no operation at all")
            elif self.overlapped_ops == 0:
                out.append(f"overlap: none of {self.total_ops} host operations ran while a vCPU was in "
                           "KVM_RUN: the race did not race")
        return out

    def properties(self) -> list[tuple[str, object]]:
        """JUnit properties (record_property): what the case achieved."""
        s = self.spec
        props: list[tuple[str, object]] = [
            ("race_seed", s.seed), ("race_seconds", round(self.duration, 3)), ("backend", self.backend),
            ("region_bytes", self.region), ("tag_stride", self.stride),
            ("host_ops", self.total_ops), ("host_ops_per_s", round(self.ops_per_s)),
            ("host_bytes", self.host_bytes), ("generations", self.generations),
            ("overlapped_ops", self.overlapped_ops), ("overlap_fraction", round(self.overlap_fraction, 3)),
            ("guest_sweeps", sum(self.sweeps)), ("guest_sweeps_per_s", round(self.sweeps_per_s, 1)),
            ("guest_sweeps_per_vcpu", ",".join(map(str, self.sweeps))),
            ("guest_reads_judged", self.judged), ("guest_reads_influx", self.influx),
            ("guest_writes", self.writes), ("efault_retries", self.efault),
            ("memory_fault_exits", self.memory_faults), ("mmio_read_exits", self.mmio_reads),
            ("mmio_write_exits", self.mmio_writes), ("stale_reads", self.violation_count),
            ("landed_ro_writes", self.landed_count),
        ]
        if self.clock_sets:
            props += [("kvmclock_sets", self.clock_sets), ("kvmclock_updates_seen", self.clock_seen),
                      ("kvmclock_inconclusive", self.clock_inconclusive),
                      ("kvmclock_misses", len(self.clock_misses))]
        props += [(f"host_ops_{k}", v) for k, v in self.host_ops.items()]
        props += [(f"released_{k}", v) for k, v in self.released.items()]
        props += [(f"kvm_stat_{k}", v) for k, v in sorted(self.stats.items())]
        if self.stats_note:
            props.append(("kvm_stats_note", self.stats_note))
        return props

    def summary(self) -> str:
        s = self.spec
        lines = [
            f"race: {s.describe()} [{self.backend}], region {self.region:#x} bytes, a tag every "
            f"{self.stride:#x}",
            f"  host: {self.total_ops} ops ({', '.join(f'{k} {v}' for k, v in self.host_ops.items())}) in "
            f"{self.duration:.2f} s = {self.ops_per_s:,.0f}/s, {self.host_bytes:#x} bytes, "
            f"{self.generations} generations",
            f"  overlap: {self.overlapped_ops}/{self.total_ops} host ops began and ended with a vCPU in "
            f"KVM_RUN ({100 * self.overlap_fraction:.0f}%); guest reads during host changes: {self.influx}",
            f"  guest: sweeps per vCPU {self.sweeps} ({self.sweeps_per_s:,.0f}/s), reads judged "
            f"{self.judged}, writes {self.writes}",
            f"  exits: EFAULT retries {self.efault} (MEMORY_FAULT {self.memory_faults}), MMIO reads "
            f"{self.mmio_reads}, MMIO writes {self.mmio_writes} (the way this kernel refused access)",
        ]
        if self.clock_sets:
            lines.append(f"  kvmclock: {self.clock_sets} KVM_SET_CLOCKs, {self.clock_seen} updates seen in the "
                         f"host mapping, {self.clock_inconclusive} overtaken by a host op on that page, "
                         f"{len(self.clock_misses)} lost")
        if self.release_method:
            lines.append(f"  released after {self.release_method}: "
                         + ", ".join(f"{k} {v:#x}" for k, v in self.released.items())
                         + ("; " + "; ".join(self.release_notes) if self.release_notes else ""))
        if self.stats:
            lines.append("  KVM stats delta: " + ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())))
        elif self.stats_note:
            lines.append(f"  KVM stats: {self.stats_note}")
        if self.kmsg_note:
            lines.append(f"  kernel log: {self.kmsg_note}")
        return "\n".join(lines)

    def failure_message(self, failures: list[str], rerun: str) -> str:
        return ("\n".join(failures) + "\n" + self.summary()
                + f"\nseed {self.spec.seed}; rerun exactly this case with:\n  {rerun}")


class Race:
    """One race: a GuestVm running race_toucher on `vcpus` vCPUs over one memslot of a backing."""

    SLOT = 1

    def __init__(self, kvm: Kvm, spec: RaceSpec, make_backing: MakeBacking) -> None:
        if not 1 <= spec.vcpus <= P.MAX_VCPUS:
            raise HarnessError(f"race: {spec.vcpus} vCPUs (1..{P.MAX_VCPUS})")
        unknown = [d for d in spec.disruptors if d not in DISRUPTORS]
        if unknown or not spec.disruptors:
            raise HarnessError(f"race: unknown disruptors {unknown} (known: {', '.join(DISRUPTORS)})")
        self.kvm = kvm
        self.spec = spec
        self.kind = spec.kind
        k = memory.kind(spec.kind)
        self.kind_page = k.page_size
        self.region, self.stride = geometry(spec.kind, spec.page)
        if spec.page not in (PAGE_4K, PAGE_2M):
            raise HarnessError(f"race: guest page size {spec.page:#x} (4 KiB or 2 MiB)")
        self._lock = threading.Lock()  # serializes seqlock writers (several disruptors)
        self._stop_disrupt = threading.Event()
        self.landed: list[P.LandedWrite] = []
        self.vm: GuestVm | None = None
        self.backing: Any = None
        self._spare: Vcpu | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.loc = 0
        self._t_run = 0.0
        self.report = RaceReport(spec, backend=backend.name(), region=self.region, stride=self.stride)
        try:
            self._setup(k, make_backing)
        except BaseException:
            self.close()
            raise

    # ---- set-up --------------------------------------------------------------------------------
    def rng(self, what: str) -> random.Random:
        """A generator per purpose, from (seed, case label, purpose): reruns draw the same ops."""
        return random.Random(f"{self.spec.seed}/{self.spec.label}/{what}")

    def _setup(self, k: memory.BackingKind, make_backing: MakeBacking) -> None:
        spec = self.spec
        self.vm = vm = GuestVm(self.kvm, "race_toucher", "long64", nr_vcpus=spec.vcpus)
        self.ctrl_gpa = vm.alloc(4096, 4096)
        for v in vm.vcpus:
            r = v.get_regs()
            r.rsi = self.ctrl_gpa
            v.set_regs(r)
        classes = [DISRUPTORS[d] for d in spec.disruptors]
        for c in classes:
            why = c.unsupported(spec.kind, k.features, self.kind_page, self)
            if why:
                raise RaceUnsupported(f"{c.name} on {spec.kind}: {why}")
        alt = any(c.alt_half for c in classes) and Feature.FD in k.features and \
            Feature.GUEST_MEMFD not in k.features
        self.backing = b = make_backing(spec.kind, self.region * (2 if alt else 1), vm)
        self.gpa_a, self.gpa_b = GPA_A, GPA_B
        vm.add_memslot(GPA_A, self.region, slot=self.SLOT, backing=b)
        vm.map(GVA_A, GPA_A, self.region, spec.page)
        if any(c.uses_gpa_b for c in classes):
            vm.map(GVA_B, GPA_B, self.region, spec.page)
        self.npages = self.region // self.stride
        self.writers = self._writers(classes)

        ctrl = ffi.cast("uint64_t *", vm.gpa_to_hva(self.ctrl_gpa))
        self.ctrl = ctrl
        self._seq_ptr = ctrl  # ctrl[0]: one aligned 8-byte store per update
        ctrl[1] = 0
        ctrl[2] = 0
        ctrl[3] = GVA_A
        ctrl[4] = GVA_B
        ctrl[5] = self.npages
        ctrl[6] = self.stride
        ctrl[7] = sum(1 << v for v in self.writers)
        ctrl[8] = spec.vcpus
        self.gentab_gpa = vm.alloc(self.npages * 8, 4096)
        ctrl[9] = self.gentab_gpa  # identity-mapped: GVA == GPA
        self._gentab_view = ffi.buffer(ffi.cast("char *", vm.gpa_to_hva(self.gentab_gpa)), self.npages * 8)
        self.gentabQ = memoryview(self._gentab_view).cast("B").cast("Q")
        self._words_view = ffi.buffer(ffi.cast("char *", b.addr), self.region)
        self.wordsQ = memoryview(self._words_view).cast("B").cast("Q")
        self.tagsQ = self.wordsQ[:: self.stride // 8]
        self.gen = 0
        self.seq = 0
        ctrl[0] = 0
        self.publish(0, self.region)  # generation 1 everywhere
        self._vcpus = list(vm.vcpus)

        self.page0_changes = 0  # host ops that covered the region's first page (kvmclock oracle)
        if spec.kvmclock:
            bad = [c.name for c in classes if c.name not in CLOCK_DISRUPTORS]
            if bad:
                raise RaceUnsupported(f"the kvmclock oracle needs the first page mapped and writable; "
                                      f"{', '.join(bad)} can take it away")
            for v in vm.vcpus:
                v.set_msrs({kvmclock.MSR_KVM_SYSTEM_TIME_NEW: kvmclock.enable_value(self.pvclock_gpa(v.id))})
        self.disruptors: list[Disruptor] = [c(self) for c in classes]
        for d in self.disruptors:
            d.prepare()
        for d in self.disruptors:
            try:
                d.preflight()
            except OSError as e:
                raise RaceUnsupported(f"{d.name} on {spec.kind}: the kernel refuses it: {e}") from e
        for d in self.disruptors:
            d.ops = d.bytes = d.overlapped = 0
        self.landed.clear()
        self.vstate = [VcpuState() for _ in range(spec.vcpus)]
        self._vm_stats0 = self._read_stats()

    def _writers(self, classes: list[type[Disruptor]]) -> list[int]:
        if self.spec.writers is not None:
            return [v for v in range(self.spec.vcpus) if self.spec.writers >> v & 1]
        if any(c.name == "mprotect" for c in classes):
            return list(range(self.spec.vcpus))  # the read-only oracle needs writes from everyone
        return [v for v in range(self.spec.vcpus) if v % 2 == 0]  # writers and pure readers mixed

    def spare_vcpu(self) -> Vcpu:
        """A vCPU that never runs (for vCPU ioctls that must not wait on a running vCPU's mutex)."""
        if self._spare is None:
            assert self.vm is not None
            self._spare = self.vm.create_vcpu()
            self._spare.set_cpuid(self.kvm.supported_cpuid)
        return self._spare

    def pvclock_gpa(self, vcpu: int) -> int:
        return GPA_A + P.PVCLOCK_OFFSET + P.PVCLOCK_SIZE * vcpu

    # ---- what disruptors call ------------------------------------------------------------------
    @property
    def gpa_now(self) -> int:
        return self.gpa_of_loc(self.loc)

    def gpa_of_loc(self, loc: int) -> int:
        return self.gpa_b if loc else self.gpa_a

    def set_loc(self, loc: int) -> None:
        self.loc = loc
        self.ctrl[2] = loc

    def pages_of(self, off: int, length: int) -> tuple[int, int]:
        """Tag indices [p0, p1) inside [off, off+length)."""
        s = self.stride
        return -(-off // s), -(-(off + length) // s)

    def in_run(self) -> bool:
        """A vCPU is inside KVM_RUN now."""
        return any(v.in_run for v in self._vcpus)

    def mark(self, off: int, length: int) -> None:
        """Seqlock odd for the pages of [off, off+length): the host is about to change them."""
        p0, p1 = self.pages_of(off, length)
        if p1 > p0:
            self.gentabQ[p0:p1] = array("Q", (2 * self.gen + 1,)) * (p1 - p0)

    def publish(self, off: int, length: int) -> None:
        """The new generation's tag in every page of [off, off+length), then gentab = 2 * gen."""
        gen = self.gen + 1
        p0, p1 = self.pages_of(off, length)
        if p1 > p0:
            tb = P.tag_base(gen)
            self.tagsQ[p0:p1] = array("Q", range(tb + p0, tb + p1))
            self.gentabQ[p0:p1] = array("Q", (2 * gen,)) * (p1 - p0)
        self.gen = gen

    # ---- threads -------------------------------------------------------------------------------
    def _vcpu_main(self, i: int) -> None:
        assert self.vm is not None
        v = self.vm.vcpus[i]
        st = self.vstate[i]
        st.native_tid = threading.get_native_id()
        if self.spec.pin is not None:
            os.sched_setaffinity(0, {self.spec.pin[1]})  # 0: this thread
        run = v.run
        bound = self.spec.seconds + 4 * self.spec.progress_bound + 30
        try:
            with v.deadline(bound, f"race vcpu {i}: still running {bound:g} s after the start"):
                while True:
                    try:
                        ex = run()
                    except KvmError as e:
                        if e.errno != errno.EFAULT:
                            raise
                        # upstream: an access the host mapping forbids (PROT_READ, unmapped);
                        # retry: the disruptor restores it
                        st.efault += 1
                        if v.kvm_run.exit_reason == 39:  # KVM_EXIT_MEMORY_FAULT
                            st.memory_faults += 1
                        continue
                    t = type(ex)
                    if t is Io and ex.port == UCALL_PORT:
                        uc = read_ucall(v, ex)
                        if uc.cmd == SYNC and uc.args and uc.args[0] == P.VIOLATION:
                            self._record_violation(i, uc.args)
                            continue
                        if uc.cmd == DONE:
                            st.done = True
                            return
                        if uc.cmd == PRINTF:
                            continue
                        uc.check(v)
                        raise UnexpectedExitError(v, ex, f"race_toucher sent {uc!r}")
                    if t is Mmio:
                        if ex.is_write:
                            st.mmio_writes += 1
                        else:
                            st.mmio_reads += 1
                            v.complete_mmio(MMIO_POISON)
                        continue
                    if t is Intr:
                        st.intr += 1
                        v.kvm_run.immediate_exit = 0
                        if st.diag_requested:
                            st.diag = v.dump_state()
                            st.diag_requested = False
                            st.diag_event.set()
                        continue
                    raise UnexpectedExitError(v, ex, "race_toucher only exits for ucalls and MMIO")
        except BaseException as e:
            st.error = e

    def _record_violation(self, i: int, args: tuple[int, ...]) -> None:
        _, pl, seen, g1, gva, ops = (list(args) + [0] * 6)[:6]
        page, loc = pl & 0xFFFFFFFF, (pl >> 32) & 1
        self.report.violation_count += 1
        if len(self.report.violations) < MAX_DETAILS:
            gpa = self.gpa_of_loc(loc) + page * self.stride
            hva = self.backing.addr + page * self.stride
            self.report.violations.append(P.Violation(i, page, seen, g1, ops, gva, gpa, hva, loc))

    def _disruptor_main(self, d: Disruptor) -> None:
        sched = d.sched
        n = len(sched)
        i = 0
        stop = self._stop_disrupt
        limit = self.spec.max_ops if d is self.disruptors[0] else None
        if self.spec.pin is not None:
            os.sched_setaffinity(0, {self.spec.pin[0]})
        d.t_start = time.monotonic()
        try:
            while not stop.is_set():
                if limit is not None and d.ops >= limit:
                    break
                off, length = sched[i]
                i = i + 1 if i + 1 < n else 0
                d.step(off, length)
        except BaseException as e:
            d.error = e
            d.abort()
        finally:
            d.t_end = time.monotonic()
            try:
                d.finish()
            except BaseException as e:
                d.error = d.error or e

    def _pvclock(self, vcpu: int) -> tuple[int, int]:
        """(version, system_time) of vCPU's pvclock as the host mapping shows it (consistent read).

        Under the disruptors' lock: the host never touches a page while it is changing it (a read
        fault racing a hugetlb punch with an exactly sized pool gets SIGBUS)."""
        q = (P.PVCLOCK_OFFSET + P.PVCLOCK_SIZE * vcpu) // 8
        w = self.wordsQ
        with self._lock:
            while True:
                v1 = w[q] & 0xFFFFFFFF
                st = w[q + 2]
                v2 = w[q] & 0xFFFFFFFF
                if v1 == v2:
                    return v1, st

    def _clock_main(self) -> None:
        """KVM_SET_CLOCK over and over while the disruptors work (see _clock_once)."""
        assert self.vm is not None
        stop = self._stop_disrupt
        try:
            while not stop.is_set():
                self._clock_once()
        except BaseException as e:
            self.report.errors.append(f"kvmclock thread: {e!r}")

    def _clock_once(self) -> None:
        """One KVM_SET_CLOCK; then every vCPU's pvclock must show it in the page the host maps,
        unless a host op touched that page first (then: inconclusive)."""
        assert self.vm is not None
        rep = self.report
        if not hasattr(self, "_clock_base"):
            self._clock_base = self.vm.get_clock() + CLOCK_STEP
        self._clock_base += CLOCK_STEP
        set_ns = self._clock_base
        before = self.page0_changes
        self.vm.set_clock(set_ns)
        rep.clock_sets += 1
        t0 = time.monotonic()
        pending = set(range(self.spec.vcpus))
        while pending:
            for i in list(pending):
                ver, st = self._pvclock(i)
                if P.pvclock_fresh(ver, st, set_ns, CLOCK_STEP):
                    pending.discard(i)
                    rep.clock_seen += 1
            if not pending:
                return
            if self.page0_changes != before or any(s.done or s.error for s in self.vstate):
                rep.clock_inconclusive += 1
                return
            waited = time.monotonic() - t0
            if waited > CLOCK_WAIT:
                for i in sorted(pending):
                    ver, st = self._pvclock(i)
                    gpa = self.pvclock_gpa(i)
                    rep.clock_misses.append(P.ClockMiss(i, set_ns, gpa, self.backing.addr + gpa - GPA_A,
                                                        ver, st, waited))
                return
            time.sleep(0)  # let the vCPU threads take the GIL for their exits

    # ---- running -------------------------------------------------------------------------------
    def counters(self, i: int) -> dict[str, int]:
        base = P.CTRL_VCPU0 // 8 + i * P.VCPU_SIZE // 8
        return {name: int(self.ctrl[base + k]) for k, name in enumerate(P.VCPU_FIELDS)}

    def _sweeps(self) -> list[int]:
        base = P.CTRL_VCPU0 // 8
        step = P.VCPU_SIZE // 8
        return [int(self.ctrl[base + i * step]) for i in range(self.spec.vcpus)]

    def run(self) -> RaceReport:
        """Race for spec.seconds (or until the first disruptor made spec.max_ops ops); then a quiet
        sweep, stop, and the end-of-race oracles. Returns the report (failures() says what broke)."""
        assert self.vm is not None
        spec = self.spec
        rep = self.report
        # The case's own kernel-health window (or one of our own outside pytest): one verdict per case.
        health, own_health = case_health.for_case(spec.label or "race")
        try:
            for i in range(spec.vcpus):
                t = threading.Thread(target=self._vcpu_main, args=(i,), name=f"race-vcpu{i}", daemon=True)
                self._threads.append(t)
                t.start()
            # faults first: every vCPU completes a sweep before the host starts disrupting
            if self._wait_sweeps([1] * spec.vcpus, spec.progress_bound, "its first sweep (before any host op)"):
                t0 = time.monotonic()
                dthreads = []
                for d in self.disruptors:
                    th = threading.Thread(target=self._disruptor_main, args=(d,), name=f"race-{d.name}",
                                          daemon=True)
                    dthreads.append(th)
                    self._threads.append(th)
                sw0 = self._sweeps()
                if spec.kvmclock:
                    th = threading.Thread(target=self._clock_main, name="race-kvmclock", daemon=True)
                    dthreads.append(th)
                    self._threads.append(th)
                for th in dthreads:
                    th.start()
                self._monitor(t0)
                rep.duration = time.monotonic() - t0
                rep.sweeps_in_race = sum(self._sweeps()) - sum(sw0)
                self._stop_disruptors(dthreads)
                if spec.kvmclock and not self.report.stalls:
                    self._clock_once()  # the race is over: this one can only pass or miss
                # a quiet sweep: one started after the last host op, every read judged
                now = self._sweeps()
                self._wait_sweeps([s + 2 for s in now], spec.progress_bound, "a quiet sweep after the race")
            self._stop_vcpus()
        finally:
            self._stop_disrupt.set()
            self.ctrl[1] = 1
        self._collect(rep)
        self._end_oracles(rep)
        self._kernel_oracle(rep, health)
        if own_health:
            health.close()
        return rep

    def _monitor(self, t0: float) -> None:
        spec = self.spec
        end = t0 + spec.seconds
        last = self._sweeps()
        last_t = [t0] * spec.vcpus
        first = self.disruptors[0]
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            if any(st.error for st in self.vstate) or any(d.error for d in self.disruptors):
                return
            if spec.max_ops is not None:
                if first.ops >= spec.max_ops:
                    return
                if now - t0 > max(spec.seconds, 1.0) * 600:
                    self.report.errors.append(f"max_ops {spec.max_ops} not reached in 600x the time")
                    return
            elif now >= end:
                return
            cur = self._sweeps()
            for i, (a, b) in enumerate(zip(last, cur, strict=True)):
                if b != a:
                    last[i], last_t[i] = b, now
                elif now - last_t[i] > spec.progress_bound:
                    self._stall(i, f"no sweep completed for {now - last_t[i]:.2f} s during the race "
                                   f"(bound {spec.progress_bound:g} s)")
                    return

    def _wait_sweeps(self, want: list[int], bound: float, what: str) -> bool:
        end = time.monotonic() + bound
        while True:
            cur = self._sweeps()
            lagging = [i for i, (c, w) in enumerate(zip(cur, want, strict=True))
                       if c < w and not self.vstate[i].done]
            if not lagging:
                return True
            if any(st.error for st in self.vstate):
                return False
            if time.monotonic() > end:
                for i in lagging:
                    self._stall(i, f"did not complete {what} within {bound:g} s "
                                   f"(sweeps {cur[i]}, needed {want[i]})")
                return False
            time.sleep(POLL)

    def _stall(self, i: int, why: str) -> None:
        """Progress oracle: per-vCPU counters, the thread's kernel stack (before the kick), the
        guest RIP (after the kick), the host side's state."""
        assert self.vm is not None
        st = self.vstate[i]
        v = self.vm.vcpus[i]
        stack = _proc_task(st.native_tid, "stack")
        wchan = _proc_task(st.native_tid, "wchan")
        state = _proc_task(st.native_tid, "stat").split(") ")[-1][:1] if st.native_tid else "?"
        in_run = v.in_run
        st.diag_event.clear()
        st.diag_requested = True
        v.kick()
        if st.diag_event.wait(2.0):
            regs = st.diag or ""
        else:
            regs = "(the vCPU thread did not come back from KVM_RUN within 2 s of the kick)"
        ops = {d.name: d.ops for d in self.disruptors}
        lines = [f"vcpu {i}: {why}",
                 f"  counters: {self.counters(i)}; exits: efault {st.efault}, mmio r/w "
                 f"{st.mmio_reads}/{st.mmio_writes}, intr {st.intr}",
                 f"  host: ops {ops}, ops started {self.seq}, generation {self.gen}, loc {self.loc}",
                 f"  thread tid {st.native_tid} state {state} wchan {wchan or '-'}, "
                 f"{'inside' if in_run else 'outside'} KVM_RUN at the time; kernel stack:",
                 *("    " + ln for ln in (stack.strip().splitlines() or ["(empty)"])),
                 "  guest registers after the kick:",
                 *("    " + ln for ln in regs.splitlines())]
        self.report.stalls.append("\n".join(lines))

    def _stop_disruptors(self, threads: list[threading.Thread]) -> None:
        self._stop_disrupt.set()
        for th in threads:
            th.join(10.0)
            if th.is_alive():
                self.report.errors.append(f"disruptor thread {th.name} did not stop within 10 s")

    def _stop_vcpus(self) -> None:
        assert self.vm is not None
        self.ctrl[1] = 1
        bound = self.spec.progress_bound + 2
        for i, t in enumerate(self._threads[: self.spec.vcpus]):
            t.join(bound)
            if t.is_alive():
                v = self.vm.vcpus[i]
                WATCHDOG.expire(v, f"race: vcpu {i} did not stop within {bound:g} s of ctrl->stop")
                t.join(5.0)
                if t.is_alive():
                    self.report.errors.append(f"vcpu {i} thread still alive after the stop and a kick "
                                              "(leaked: the VM cannot be closed safely)")

    # ---- after the race ------------------------------------------------------------------------
    def _collect(self, rep: RaceReport) -> None:
        rep.host_ops = {d.name: d.ops for d in self.disruptors}
        d0 = self.disruptors[0]
        if d0.t_end > d0.t_start:
            rep.host_seconds = d0.t_end - d0.t_start
        rep.host_bytes = sum(d.bytes for d in self.disruptors)
        rep.overlapped_ops = sum(d.overlapped for d in self.disruptors)
        rep.generations = self.gen - 1
        for d in self.disruptors:
            if d.error is not None:
                rep.errors.append(f"disruptor {d.name}: {d.error!r}")
        for i, st in enumerate(self.vstate):
            c = self.counters(i)
            st.counters = c
            rep.sweeps.append(c["sweeps"])
            rep.judged += c["judged"]
            rep.influx += c["influx"]
            rep.writes += c["writes"]
            rep.efault += st.efault
            rep.memory_faults += st.memory_faults
            rep.mmio_reads += st.mmio_reads
            rep.mmio_writes += st.mmio_writes
            if st.error is not None and not (rep.stalls and "watchdog" in str(st.error)):
                rep.errors.append(f"vcpu {i}: {type(st.error).__name__}: {st.error}")
            elif not st.done and not rep.stalls and not rep.errors:
                rep.errors.append(f"vcpu {i} never reached DONE")
        rep.landed_count = len(self.landed)
        rep.landed = self.landed[:MAX_DETAILS]
        # where a stale read came from, as the host sees it now (everything is mapped again)
        if not any(t.is_alive() for t in self._threads):
            for k, v in enumerate(rep.violations):
                try:
                    now = self.tagsQ[v.page]
                except (IndexError, ValueError):
                    continue
                rep.violations[k] = P.Violation(v.vcpu, v.page, v.seen, v.seq, v.ops, v.gva, v.gpa,
                                                v.hva, v.loc, now)

    def _read_stats(self) -> dict[str, int]:
        assert self.vm is not None
        out: dict[str, int] = {}
        try:
            for k, v in self.vm.stats().read().items():
                if isinstance(v, int):
                    out[f"vm.{k}"] = v
            for vc in self.vm.vcpus:
                for k, v in vc.stats().read().items():
                    if isinstance(v, int):
                        out[f"vcpu.{k}"] = out.get(f"vcpu.{k}", 0) + v
        except (KvmError, OSError) as e:
            out["_error"] = 0
            self.report.stats_note = f"binary stats unavailable: {e}"
        return out

    def _end_oracles(self, rep: RaceReport) -> None:
        if any(t.is_alive() for t in self._threads):
            return
        after = self._read_stats()
        rep.stats = {k: v for k, v in stats_delta(self._vm_stats0, after).items() if not k.startswith("_")}
        if not rep.stats and not rep.stats_note:
            rep.stats_note = ("every binary stat stayed unchanged (this backend does not count faults "
                              "there: not observable, not a pass)")
        self._released(rep)

    def _released(self, rep: RaceReport) -> None:
        """Memory-released oracle: with the vCPUs stopped (KVM still holds its translations), the
        disruptor's own release of the whole region must leave the object empty, and the memory
        must reach the kernel: RssAnon for private memory, the hugetlb pool's in-use count (exact
        when no other harness process holds pages of that size)."""
        b = self.backing
        d = next((d for d in self.disruptors if type(d).release_whole is not Disruptor.release_whole), None)
        if d is None:
            return
        kind_anon = not b.supports(Feature.FD) and not b.supports(Feature.SHARED)
        huge = b.supports(Feature.HUGETLB)
        region = self.region
        fp0 = _footprint(b, region)
        rss0 = usage.process_rss().get("RssAnon", 0) if kind_anon else 0
        # system-wide figures other processes move too: recorded, not asserted
        sys_key = "Unevictable" if b.supports(Feature.GUEST_MEMFD) else \
            "Shmem" if b.supports(Feature.SHARED) and not huge else None
        sys0 = usage.meminfo().get(sys_key, 0) if sys_key else 0
        others0 = _other_holders(b.page_size) if huge else None
        used0 = _hugetlb_in_use(b.page_size) if huge else 0
        method = d.release_whole()
        if method is None:
            return
        rep.release_method = method
        fp1 = _footprint(b, region)
        rep.released["footprint"] = fp0 - fp1
        if sys_key:
            rep.released[f"meminfo_{sys_key}"] = sys0 - usage.meminfo().get(sys_key, 0)
        if fp1 != 0:
            rep.release_problems.append(f"{b.footprint_method}: {fp0:#x} -> {fp1:#x} bytes, expected 0")
        if kind_anon:
            rss1 = usage.process_rss().get("RssAnon", 0)
            rep.released["RssAnon"] = rss0 - rss1
            if rss0 - rss1 < 0.9 * fp0:
                rep.release_problems.append(f"RssAnon {rss0:#x} -> {rss1:#x}: less than the {fp0:#x} "
                                            "resident bytes released came off the process")
        if huge:
            pages = fp0 // b.page_size
            used1 = _hugetlb_in_use(b.page_size)
            # hugetlb frees a page only when its last reference goes: a reference KVM kept shows here
            for _ in range(20):
                if used0 - used1 >= pages:
                    break
                time.sleep(0.01)
                used1 = _hugetlb_in_use(b.page_size)
            rep.released["hugepages"] = used0 - used1
            others1 = _other_holders(b.page_size)
            if not others0 and not others1:
                if used0 - used1 != pages:
                    rep.release_problems.append(
                        f"hugetlb pool: {used0 - used1} pages came back, {pages} were punched "
                        f"(nr_hugepages - free_hugepages {used0} -> {used1}); another page holder "
                        "(KVM reference?) kept the rest")
            else:
                rep.release_notes.append("hugepage delta not asserted: other harness processes held "
                                         f"pages of this size ({others0 or others1})")

    def _kernel_oracle(self, rep: RaceReport, health: case_health.CaseHealth) -> None:
        """The case's kernel-health check, judged by the same rules as every other case (known issues,
        --kmsg mode); what it reports here is not reported again after the test body."""
        if not health.active:
            rep.kmsg_note = f"not checked: {health.reason}"
            return
        rep.kernel_failure = health.check("the race") or ""

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and join every thread, restore the region, close the VM (the backing is the
        caller's: make_backing's owner closes it)."""
        if self._closed:
            return
        self._closed = True
        self._stop_disrupt.set()
        if self.vm is not None and getattr(self, "ctrl", None) is not None:
            self.ctrl[1] = 1
        for t in self._threads:
            t.join(5.0)
            if t.is_alive() and self.vm is not None:
                for v in self.vm.vcpus:
                    if v.in_run:
                        WATCHDOG.expire(v, "race: closing")
                t.join(5.0)
        alive = [t.name for t in self._threads if t.is_alive()]
        self._words_view = self._gentab_view = None
        self.wordsQ = self.tagsQ = self.gentabQ = None  # type: ignore[assignment]
        if alive:
            raise HarnessError(f"race threads still alive at close: {alive} (the VM is left open)")
        if self.vm is not None:
            self.vm.close()
            self.vm = None

    def __enter__(self) -> Race:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _proc_task(tid: int, name: str) -> str:
    if not tid:
        return ""
    try:
        with open(f"/proc/self/task/{tid}/{name}") as f:
            return f.read()
    except OSError as e:
        return f"({name} unreadable: {e.strerror})"


def _footprint(b: Any, region: int) -> int:
    if b.supports(Feature.FD) and not b.supports(Feature.GUEST_MEMFD):
        return usage.allocated_bytes(b.fd)
    return usage.resident_bytes(b.addr, region)


def _hugetlb_in_use(page_size: int) -> int:
    return usage.hugepage_counter(page_size, "nr_hugepages") - usage.hugepage_counter(page_size, "free_hugepages")


def _other_holders(page_size: int) -> dict[str, int]:
    pool = HugepagePool()
    atexit.unregister(pool.release_all)
    me = str(os.getpid())
    return {k: n for k, n in pool.holders(page_size).items() if k.split(":")[0] != me}
