"""The disruptors' C loops (harness.race._cfast) against their Python step() path.

Most checks need no KVM: a Region laid out over a plain mmap'd buffer (a fake VM that only hands
out host memory), the real backings, fake vCPUs whose in_run flags the test sets. Both paths run
the same seeded schedule from the same state and must leave byte-identical gentab[], tags, control
word and counters; errors must read the same and leave the range odd; the writers' lock is one lock
for both. The last test races the real /dev/kvm through the C loop."""

from __future__ import annotations

import mmap
import os
import threading
import time
from array import array
from typing import Any

import pytest

from harness import memory
from harness.kvm._cffi import ffi
from harness.race import _cfast
from harness.race import protocol as P
from harness.race.disruptors import DISRUPTORS, Madvise, Mprotect, Punch, Remap
from harness.race.disruptors.base import HostContext
from harness.race.engine import Race
from harness.race.plan import RaceSpec
from harness.race.region import Region

SIZE = 2 << 20
STRIDE = 4096


class FakeVm:
    """What Region asks of a GuestVm: guest-physical allocations backed by plain host memory."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, 4 << 20)
        self._view = ffi.from_buffer(self.buf)
        self.base = int(ffi.cast("uintptr_t", self._view))
        self.next = 0

    def close(self) -> None:
        ffi.release(self._view)
        self.buf.close()

    def alloc(self, size: int, align: int = 4096) -> int:
        gpa = -(-self.next // align) * align
        self.next = gpa + size
        return gpa

    def gpa_to_hva(self, gpa: int) -> int:
        return self.base + gpa

    def add_memslot(self, *a: Any, **k: Any) -> None:
        pass

    def map(self, *a: Any, **k: Any) -> None:
        pass


class FakeVcpu:
    def __init__(self) -> None:
        self.in_run_flag = ffi.new("int32_t *")

    @property
    def in_run(self) -> bool:
        return bool(self.in_run_flag[0])


def _setup(kind: str, cls: type, *, double: bool = False, vcpus: int = 1, in_run: bool = True):
    backing = memory.create(kind, SIZE * (2 if double else 1))
    vm = FakeVm()
    mem = Region(vm, backing, SIZE, STRIDE, page=4096, writers=(0,), nvcpus=vcpus, alias=False)  # type: ignore[arg-type]
    vs = tuple(FakeVcpu() for _ in range(vcpus))
    for v in vs:
        v.in_run_flag[0] = int(in_run)
    ctx = HostContext(mem=mem, backing=backing, vm=vm, kind_page=4096, vcpus=vs, rng_key="fast/7",  # type: ignore[arg-type]
                      spare_vcpu=lambda: None, landed=[])  # type: ignore[arg-type, return-value]
    d = cls(ctx)
    d.prepare()
    return backing, vm, mem, d


def _close(mem: Region, backing: Any, vm: FakeVm) -> None:
    mem.close()
    backing.close()
    vm.close()


def _state(mem: Region, d: Any) -> dict[str, Any]:
    return {"gentab": bytes(mem.gentab.cast("B")), "tags": array("Q", mem.tags).tobytes(),
            "gen": mem.gen, "seq": mem.seq, "page0": mem.page0_changes, "ctrl0": int(mem.ctrl[0]),
            "ops": d.ops, "bytes": d.bytes, "overlapped": d.overlapped,
            "half": bytes(getattr(d, "half", b"")), "landed": list(d.ctx.landed), "ro": getattr(d, "ro", None)}


class ReferenceRegion:
    """Region's writers as they were in Python before they moved to C (the protocol the oracles and
    the guest were written against): the C functions must reproduce it word for word."""

    def __init__(self, npages: int, stride: int) -> None:
        self.stride, self.gen, self.seq, self.page0_changes, self.ctrl0 = stride, 0, 0, 0, 0
        self.gentab = array("Q", [0]) * npages
        self.tags = array("Q", [0]) * npages
        self.publish(0, npages * stride)

    def pages_of(self, off: int, length: int) -> tuple[int, int]:
        s = self.stride
        return -(-off // s), -(-(off + length) // s)

    def begin(self, off: int, length: int) -> None:
        self.seq += 1
        self.ctrl0 = self.seq
        if off == 0:
            self.page0_changes += 1
        p0, p1 = self.pages_of(off, length)
        if p1 > p0:
            self.gentab[p0:p1] = array("Q", (2 * self.gen + 1,)) * (p1 - p0)

    def publish(self, off: int, length: int) -> None:
        gen = self.gen + 1
        p0, p1 = self.pages_of(off, length)
        if p1 > p0:
            tb = P.tag_base(gen)
            self.tags[p0:p1] = array("Q", range(tb + p0, tb + p1))
            self.gentab[p0:p1] = array("Q", (2 * gen,)) * (p1 - p0)
        self.gen = gen


def test_c_writers_reproduce_the_python_protocol():
    """begin_change / end_change / cancel_change, now C, against the former Python writers: aligned
    and unaligned ranges, the first page, empty ranges, a cancelled change, the whole region."""
    import random

    backing, vm, mem, _ = _setup("anon", Madvise)
    try:
        ref = ReferenceRegion(mem.npages, STRIDE)
        rng = random.Random(3)
        for k in range(3000):
            off = rng.choice((0, rng.randrange(0, SIZE), rng.randrange(0, SIZE // STRIDE) * STRIDE))
            length = rng.choice((0, 1, STRIDE, rng.randrange(1, 16 * STRIDE), SIZE - off))
            length = min(length, SIZE - off)
            mem.begin_change(off, length)
            ref.begin(off, length)
            assert mem.gentab.tolist() == ref.gentab.tolist()
            if k % 97 == 5:
                mem.cancel_change()  # abort: the range stays odd
                continue
            mem.end_change(off, length)
            ref.publish(off, length)
        assert mem.gentab.tolist() == ref.gentab.tolist()
        assert list(mem.tags) == ref.tags.tolist()
        assert (mem.gen, mem.seq, mem.page0_changes, int(mem.ctrl[0])) == \
            (ref.gen, ref.seq, ref.page0_changes, ref.ctrl0)
    finally:
        _close(mem, backing, vm)


CASES = [("shmem", "punch", False), ("anon-shared", "punch", False), ("anon", "remap", False),
         ("shmem", "remap", True), ("anon", "dontneed", False), ("shmem", "cold", False),
         ("shmem", "mprotect", False), ("anon", "mprotect", False)]


@pytest.mark.parametrize(("kind", "name", "double"), CASES, ids=[f"{n}-{k}" for k, n, _ in CASES])
def test_c_loop_publishes_exactly_what_step_does(kind, name, double):
    n = 5000  # more than SCHEDULE_LEN: the schedule cycles
    out = {}
    for fast in (True, False):
        backing, vm, mem, d = _setup(kind, DISRUPTORS[name], double=double)
        try:
            d.fast = fast
            d.preflight()  # one op through step(), as the engine does, before run()
            d.run(threading.Event(), limit=n)
            assert d.error is None, d.error
            assert d.ran_fast is fast
            out[fast] = _state(mem, d)
            assert _cfast.lib.kh_trylock(mem.c), "the writers' lock was left held"
            _cfast.lib.kh_unlock(mem.c)
            # every tag is the published generation's
            for p in range(mem.npages):
                g = mem.gentab[p]
                assert g % 2 == 0 and mem.tags[p] == P.tag(g // 2, p)
        finally:
            _close(mem, backing, vm)
    assert out[True] == out[False]
    assert out[True]["ops"] == n and out[True]["overlapped"] == n  # the limit counts the preflight op; flags held at 1


def test_mprotect_c_loop_reports_writes_through_read_only_like_step():
    """A word changed (through the file: a second view) while the range is PROT_READ lands in
    ctx.landed the same way from both paths; the C loop's half-done toggle goes back to step()."""
    got = {}
    for fast in (True, False):
        backing, vm, mem, d = _setup("shmem", Mprotect)
        try:
            off, length = d.sched[0]
            p0, _ = mem.pages_of(off, length)
            if fast:
                c = d._fast_loop()
                assert c is not None
                assert _cfast.lib.kh_disrupt_run(c, 1, 10**9) == 0
                d.fast_after(c)
            else:
                d.step(off, length)
            assert d.ro == (off, length)
            os.pwrite(backing.fd, (0xBAD0_0000_0000 + p0).to_bytes(8, "little"), p0 * STRIDE + 8)
            if fast:
                assert _cfast.lib.kh_disrupt_run(c, 1, 10**9) == 0
                d.fast_after(c)
                d.ops = int(c.ops)
            else:
                d.step(off, length)
            assert d.ro is None and d.ops == 2
            got[fast] = list(d.ctx.landed)
        finally:
            _close(mem, backing, vm)
    assert got[True] == got[False] and len(got[True]) == 1
    lw = got[True][0]
    assert (lw.vcpu, lw.after) == (0, 0xBAD0_0000_0000 + lw.page)


def test_overlap_counts_only_ops_with_a_vcpu_in_run():
    backing, vm, mem, d = _setup("shmem", Punch, vcpus=2, in_run=False)
    try:
        d.run(threading.Event(), limit=100)
        assert d.ran_fast and d.ops == 100 and d.overlapped == 0
        d.ctx.vcpus[1].in_run_flag[0] = 1
        d.run(threading.Event(), limit=150)
        assert d.ops == 150 and d.overlapped == 50
    finally:
        _close(mem, backing, vm)


def _fail_punch(fast: bool) -> tuple[str, int, list[int], Region, Any, Any]:
    backing, _vm, mem, d = _setup("shmem", Punch)
    d.fd = os.open("/dev/null", os.O_RDONLY)  # fallocate on it: ENODEV / EBADF, whatever the kernel says
    try:
        d.fast = fast
        d.run(threading.Event(), limit=10)
    finally:
        os.close(d.fd)
    assert isinstance(d.error, OSError) and d.ran_fast is fast
    off, length = d.sched[0]
    p0, p1 = mem.pages_of(off, length)
    return str(d.error), d.error.errno, list(mem.gentab[p0:p1]), mem, d, backing


def test_an_error_reads_the_same_and_leaves_the_range_odd():
    got = {}
    for fast in (True, False):
        msg, e, gens, mem, d, backing = _fail_punch(fast)
        vm = d.ctx.vm
        try:
            assert gens and all(g == 2 * mem.gen + 1 for g in gens), "the failed op's range must stay odd"
            assert d.ops == 0 and mem.seq == 1
            assert _cfast.lib.kh_trylock(mem.c), "abort must release the writers' lock"
            _cfast.lib.kh_unlock(mem.c)
            got[fast] = (msg, e)
        finally:
            _close(mem, backing, vm)
    assert got[True] == got[False]
    assert "] fallocate(fd=" in got[True][0] and "PUNCH_HOLE|KEEP_SIZE" in got[True][0]


def test_an_mprotect_error_reads_the_same():
    got = {}
    for fast in (True, False):
        backing, vm, mem, d = _setup("anon", Mprotect)
        try:
            d.addr = 0x10000  # nothing mapped there: ENOMEM
            d.fast = fast
            d.run(threading.Event(), limit=10)
            assert isinstance(d.error, OSError) and d.ran_fast is fast and d.ops == 0
            got[fast] = str(d.error)
        finally:
            _close(mem, backing, vm)
    assert got[True] == got[False] and "] mprotect(0x" in got[True] and "PROT_READ)" in got[True]


def test_python_writers_and_the_c_loop_share_one_lock():
    backing, vm, mem, d = _setup("shmem", Punch)
    try:
        stop = threading.Event()
        with mem.locked():  # as the kvmclock reader holds it
            th = threading.Thread(target=d.run, args=(stop, 10_000))
            th.start()
            time.sleep(0.1)
            assert d.ops == 0 and mem.seq == 0, "the C loop changed the region under the lock"
        th.join(30)
        assert not th.is_alive() and d.error is None and d.ops == 10_000
        # and a Python writer between C slices: its change is one more generation, same protocol
        gen = mem.gen
        mem.begin_change(0, STRIDE)
        assert mem.gentab[0] == 2 * gen + 1 and mem.page0_changes >= 1
        mem.end_change(0, STRIDE)
        assert mem.gentab[0] == 2 * (gen + 1) and mem.tags[0] == P.tag(gen + 1, 0)
    finally:
        _close(mem, backing, vm)


def test_stop_ends_the_c_loop():
    backing, vm, mem, d = _setup("anon", Madvise)
    try:
        stop = threading.Event()
        th = threading.Thread(target=d.run, args=(stop,))
        th.start()
        time.sleep(0.05)
        stop.set()
        d.request_stop()
        th.join(5)
        assert not th.is_alive() and d.error is None and d.ran_fast and d.ops > 0
    finally:
        _close(mem, backing, vm)


def test_a_subclass_that_changes_an_op_runs_in_python():
    class Planted(Remap):
        def end(self, off: int, length: int) -> None:
            super().end(off, length)

    class PlantedStep(Punch):
        def step(self, off: int, length: int) -> None:
            super().step(off, length)

    for cls, kind in ((Planted, "anon"), (PlantedStep, "shmem")):
        backing, vm, mem, d = _setup(kind, cls)
        try:
            assert d._fast_loop() is None
            d.run(threading.Event(), limit=3)
            assert not d.ran_fast and d.ops == 3 and d.error is None
        finally:
            _close(mem, backing, vm)


def test_c_loop_races_the_real_kvm(kvm):
    """punch on shmem through the C loop against a real guest: every oracle of the case holds."""
    made: list[Any] = []

    def make(kind: str, size: int, vm: Any) -> Any:
        b = memory.create(kind, size, vm=vm)
        made.append(b)
        return b

    race = Race(kvm, RaceSpec("shmem", ("punch",), vcpus=2, seconds=0.5, seed=11, label="fast-kvm"), make)
    try:
        rep = race.run()
        assert race.disruptors[0].ran_fast
    finally:
        race.close()
        for b in made:
            b.close()
    assert not rep.failures(), "\n".join(rep.failures())
    assert rep.total_ops > 0 and rep.overlapped_ops > 0 and rep.generations == rep.total_ops + 1  # + the preflight op
