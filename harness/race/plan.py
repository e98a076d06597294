"""What one race is asked to do: its spec (backing, disruptors, vCPUs, duration, seed), the
oracles a case may name, and the exception that turns a pair that cannot run here into a skip."""

from __future__ import annotations

from dataclasses import dataclass

from harness.memory import PAGE_2M, PAGE_4K
from harness.unsupported import Unsupported

# every oracle the engine judges; a case names the ones it checks (RaceReport.failures)
ORACLES = ("stale", "ro-write", "progress", "released", "kernel", "overlap", "kvmclock", "memory-fault", "uffd")


class RaceUnsupported(Unsupported):
    """This (backing, disruptor) pair cannot run here; the message is the reason (cases skip)."""


@dataclass(frozen=True)
class RaceGoal:
    """What a race must have done before it may end ahead of spec.seconds (which stays the cap):
    every vCPU completed `sweeps` sweeps of its region while the host was operating, every disruptor
    made `ops` operations that began and ended with a vCPU inside KVM_RUN, and `min_seconds` passed.
    Cases without --race-seconds race to this goal; a soak (--race-seconds) or a bench has none and
    runs its whole duration. The same goal on every machine: under TCG the guest sweeps ~50x slower,
    so a fixed short duration there made some races end without a single host operation."""

    sweeps: int = 6
    ops: int = 32
    min_seconds: float = 0.1

    def describe(self) -> str:
        return f"until {self.sweeps} sweeps per vCPU and {self.ops} overlapped ops per disruptor"


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
    # end early once this is reached (None: race the whole `seconds`)
    goal: RaceGoal | None = None

    def describe(self) -> str:
        span = f"{self.seconds:g} s" if self.goal is None else f"{self.goal.describe()}, at most {self.seconds:g} s"
        return (f"{'+'.join(self.disruptors)} on {self.kind}, {self.vcpus} vCPU(s), "
                f"{'2 MiB' if self.page == PAGE_2M else '4 KiB'} guest pages, {span}, "
                f"seed {self.seed}")

    def rng_key(self) -> str:
        """What every generator of this race is seeded from (with its purpose): reruns draw alike."""
        return f"{self.seed}/{self.label}"
