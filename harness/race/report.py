"""RaceReport: what one race measured and recorded, the oracles' verdicts on it, and its text
(failure lines, summary, JUnit properties)."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.oracles.verdict import Verdict
from harness.race import oracles as O
from harness.race import protocol as P
from harness.race.plan import ORACLES, RaceSpec


@dataclass
class RaceReport:
    spec: RaceSpec
    backend: str = ""
    duration: float = 0.0
    ended: str = "time"  # "goal": spec.goal was reached before spec.seconds
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
    stray_faults: list[str] = field(default_factory=list)  # memory-fault exits naming no page of the region
    mmio_reads: int = 0
    mmio_writes: int = 0
    violation_count: int = 0
    violations: list[P.Violation] = field(default_factory=list)
    landed_count: int = 0
    landed: list[P.LandedWrite] = field(default_factory=list)
    stalls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    release: Verdict | None = None  # oracles.released(), when a disruptor released the region
    clock_sets: int = 0
    clock_seen: int = 0  # updates seen in the host mapping
    clock_inconclusive: int = 0  # a host op touched the page before the update showed
    clock_not_entered: int = 0  # vCPUs (per set) that never entered their guest within the entry wait
    clock_misses: list[P.ClockMiss] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    stats_note: str = ""
    kernel: Verdict | None = None  # oracles.kernel(): the case's kernel-health verdict
    # what a disruptor records of its own (report_into(): the uffd mode's counts and oracle)
    extra: dict[str, object] = field(default_factory=dict)  # JUnit properties
    extra_lines: list[str] = field(default_factory=list)  # summary lines
    extra_verdicts: dict[str, Verdict] = field(default_factory=dict)  # by oracle name

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

    @property
    def released(self) -> dict[str, int]:
        """What each memory figure dropped by after the release (empty without one)."""
        return dict(self.release.facts["released"]) if self.release is not None else {}

    # ---- oracles -------------------------------------------------------------------------------
    def verdicts(self, oracles: tuple[str, ...] = ORACLES) -> list[Verdict]:
        """The named oracles' verdicts, in the order failures() lists them (an oracle with nothing
        to judge here is ok)."""
        out = []
        if "stale" in oracles:
            out.append(O.stale(self.violation_count, self.violations))
        if "ro-write" in oracles:
            out.append(O.ro_write(self.landed_count, self.landed))
        if "progress" in oracles:
            out.append(O.progress(self.stalls))
        if "memory-fault" in oracles:
            out.append(O.memory_faults(self.memory_faults, self.stray_faults))
        if "kvmclock" in oracles:
            out.append(O.kvmclock(self.clock_misses))
        if "released" in oracles:
            out.append(self.release if self.release is not None else Verdict.of("released", ()))
        if "kernel" in oracles:
            out.append(self.kernel if self.kernel is not None else Verdict.of("kernel", ()))
        if "overlap" in oracles:
            out.append(O.overlap(self.total_ops, self.overlapped_ops, judged=not self.stalls and not self.errors))
        out += [v for name, v in self.extra_verdicts.items() if name in oracles]
        return out

    def failures(self, oracles: tuple[str, ...] = ORACLES) -> list[str]:
        """One line per broken oracle (only those named); harness errors always count."""
        out = [f"harness/thread error: {e}" for e in self.errors]
        for v in self.verdicts(oracles):
            out += v.problems
        return out

    def properties(self) -> list[tuple[str, object]]:
        """JUnit properties (record_property): what the case achieved."""
        s = self.spec
        props: list[tuple[str, object]] = [
            ("race_seed", s.seed), ("race_seconds", round(self.duration, 3)), ("race_ended", self.ended),
            ("backend", self.backend),
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
                      ("kvmclock_not_entered", self.clock_not_entered),
                      ("kvmclock_misses", len(self.clock_misses))]
        props += [(f"host_ops_{k}", v) for k, v in self.host_ops.items()]
        props += list(self.extra.items())
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
            f"{self.generations} generations"
            + ("; ended at its goal" if self.ended == "goal" else ""),
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
                         f"{self.clock_not_entered} unjudged (the vCPU did not enter its guest within "
                         f"{P.CLOCK_ENTRY_WAIT:g} s), {len(self.clock_misses)} lost")
        lines += self.extra_lines
        if self.release is not None:
            notes = self.release.facts["notes"]
            lines.append(f"  released after {self.release.facts['method']}: "
                         + ", ".join(f"{k} {v:#x}" for k, v in self.released.items())
                         + ("; " + "; ".join(notes) if notes else ""))
        if self.stats:
            lines.append("  KVM stats delta: " + ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())))
        elif self.stats_note:
            lines.append(f"  KVM stats: {self.stats_note}")
        if self.kernel is not None and self.kernel.facts.get("note"):
            lines.append(f"  kernel log: {self.kernel.facts['note']}")
        return "\n".join(lines)

    def failure_message(self, failures: list[str], rerun: str) -> str:
        return ("\n".join(failures) + "\n" + self.summary()
                + f"\nseed {self.spec.seed}; rerun exactly this case with:\n  {rerun}")
