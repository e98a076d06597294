"""Race engine host side: disruptor ops/s (and guest sweeps/s) of harness/race against
bench/race_disrupt.c doing the same ops, one vCPU running the same guest.

Three pairs: fallocate(PUNCH_HOLE) on shmem, munmap + mmap(MAP_FIXED_NOREPLACE) on private
anonymous memory, and the memslot delete + re-add (KVM_SET_USER_MEMORY_REGION) of private anonymous
memory, the whole region each op, followed by the seeded pause the harness draws (dumped for the C
side). The C program gets the harness's own guest: the boot slot (payload, page tables, control
page) and the vCPU registers of a Race set up by the harness, dumped once into a temporary
directory. Per op both sides do: gentab[] odd for the range, note whether the vCPU is in KVM_RUN,
the syscall(s), note again, the new tags, gentab[] even.

The harness side runs each disruptor's inner loop in C (harness/race/_fast_cdefs.py,
`kh_disrupt_run`): the same steps as race_disrupt.c's loop plus the writers' lock (a semaphore) and
page0_changes; the loop returns to Python every 10 ms (stop event, op count for the engine's
monitor). The harness's vCPU thread still handles its exits in Python (ucalls, MMIO exits of
unmapped ranges), C's in a plain loop: that shows in sweeps_per_s, which trades off with host ops/s.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.registry import BUILD_DIR, Bench, register
from harness import memory
from harness.kvm._cffi import ffi
from harness.kvm.system import Kvm
from harness.race import Race, RaceSpec
from harness.race.region import GPA_A

_images: dict[str, Path] = {}


def _make_backing(made: list[Any]) -> Any:
    def make(kind: str, size: int, vm: Any) -> Any:
        b = memory.create(kind, size, vm=vm)
        made.append(b)
        return b

    return make


# Both sides pin the disruptor to CPU 0 and the vCPU thread to CPU 1 (when there are two): on this
# shared 2-CPU machine unpinned runs of either side vary by 2x from round to round.
PIN = (0, 1) if len(os.sched_getaffinity(0)) >= 2 else None


def _spec(kind: str, disruptor: str, n: int) -> RaceSpec:
    return RaceSpec(kind, (disruptor,), vcpus=1, seconds=0.0, max_ops=n, seed=1, label="bench",
                    progress_bound=10.0, pin=PIN)


def image(kind: str, disruptor: str) -> Path:
    """The guest the harness builds for this race, as files race_disrupt.c loads."""
    key = f"{kind}-{disruptor}"
    if key in _images:
        return _images[key]
    d = Path(tempfile.mkdtemp(prefix=f"kvm-harness-race-{key}-"))
    atexit.register(shutil.rmtree, d, True)
    kvm = Kvm()
    made: list[Any] = []
    try:
        race = Race(kvm, _spec(kind, disruptor, 1), _make_backing(made))
        try:
            vm = race.vm
            assert vm is not None
            (d / "boot.bin").write_bytes(vm.read(0, vm.boot.size))
            v = vm.vcpus[0]
            (d / "sregs.bin").write_bytes(bytes(ffi.buffer(v.get_sregs())))
            (d / "regs.bin").write_bytes(bytes(ffi.buffer(v.get_regs())))
            (d / "params.txt").write_text(f"{race.ctrl_gpa} {race.gentab_gpa} {race.region} {race.stride} {GPA_A}\n")
            # the seeded pauses after each op (same spec seed and label: the harness run draws the same)
            gaps = race.disruptors[0].gaps
            (d / "gaps.txt").write_text("".join(f"{round(g * 1e9)}\n" for g in gaps))
        finally:
            race.close()
    finally:
        for b in made:
            b.close()
        kvm.close()
    _images[key] = d
    return d


def harness_race(kind: str, disruptor: str, n: int) -> dict[str, float]:
    """n ops of the disruptor through the race engine; the rates it measured."""
    kvm = Kvm()
    made: list[Any] = []
    try:
        race = Race(kvm, _spec(kind, disruptor, n), _make_backing(made))
        try:
            rep = race.run()
        finally:
            race.close()
    finally:
        for b in made:
            b.close()
        kvm.close()
    fails = rep.failures()
    if fails:
        raise RuntimeError("race failed during the benchmark:\n" + "\n".join(fails))
    return {"host_ops_per_s": rep.ops_per_s, "sweeps_per_s": rep.sweeps_per_s,
            "overlap": rep.overlap_fraction}


def _c_cmd(kind: str, disruptor: str, mode: str):
    def argv(count: int) -> list[str]:
        pin = [f"{PIN[0]},{PIN[1]}"] if PIN else []
        return [str(BUILD_DIR / "race_disrupt"), str(image(kind, disruptor)), mode, str(count), *pin]

    return argv


def _pair(name: str, label: str, kind: str, disruptor: str, count_option: str = "race_ops",
          default_count: int = 20_000) -> Bench:
    """One race pair: the harness's race engine and race_disrupt.c making the same ops."""
    return register(Bench(
        name=name,
        label=label,
        c_cmd=_c_cmd(kind, disruptor, disruptor),
        c_rate_key="host_ops_per_s",
        py=lambda n: harness_race(kind, disruptor, n),
        count_option=count_option,
        default_count=default_count,
        target=0.9,
        secondary=("sweeps_per_s",),
        unit="ops/s",
        params={"pin": PIN},
    ))


RACE_PUNCH_SHMEM = _pair("race_punch_shmem", "race: fallocate punch on shmem, host ops/s", "shmem", "punch")
RACE_REMAP_ANON = _pair("race_remap_anon", "race: munmap+mmap on anon, host ops/s", "anon", "remap")
# Each flip is ~1 ms in the kernel with a running vCPU (every vCPU is kicked out of the guest for the
# slot change), plus the seeded pause (0.28 ms on average): a few thousand per round.
RACE_SLOT_READD_ANON = _pair("race_slot_readd_anon", "race: memslot delete+re-add on anon, host ops/s", "anon",
                             "slot-readd", count_option="slot_flips", default_count=2_000)
