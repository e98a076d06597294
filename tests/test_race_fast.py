"""The disruptors' C loops (harness.race._cfast) against their Python step() path.

Most checks need no KVM: a Region laid out over a plain mmap'd buffer (a fake VM that only hands
out host memory), the real backings, fake vCPUs whose in_run flags the test sets. Both paths run
the same seeded schedule from the same state and must leave byte-identical gentab[], tags, control
word and counters; errors must read the same and leave the range odd; the writers' lock is one lock
for both. The last test races the real /dev/kvm through the C loop."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from array import array
from typing import Any

import pytest

from harness import memory
from harness.kvm._cffi import ffi
from harness.kvm.caps import KVM_MEM_GUEST_MEMFD
from harness.kvm.errors import KvmError
from harness.kvm.ioctl import kvm_ioctl
from harness.kvm.ioctls import IOCTLS
from harness.kvm.vm import Vm
from harness.race import _cfast
from harness.race import protocol as P
from harness.race.disruptors import DISRUPTORS, Madvise, Mprotect, Punch, Remap, SlotMove, SlotReadd
from harness.race.disruptors.base import HostContext
from harness.race.engine import Race
from harness.race.plan import RaceSpec
from harness.race.region import GPA_A, GPA_B, SLOT, Region

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


class SlotVm(FakeVm):
    """A FakeVm whose memslots are those of `real` (a Vm: slot-readd / slot-move issue their ioctls
    on its fd); the control page and gentab[] stay in FakeVm's buffer (no vCPU runs)."""

    def __init__(self, real: Vm) -> None:
        super().__init__()
        self.real = real

    def add_memslot(self, *a: Any, **k: Any) -> Any:
        return self.real.add_memslot(*a, **k)

    def __getattr__(self, name: str) -> Any:  # fd, memslots, delete_memslot, move_memslot...
        return getattr(self.real, name)

    def close(self) -> None:
        self.real.close()
        super().close()


def _setup(kind: str, cls: type, *, double: bool = False, vcpus: int = 1, in_run: bool = True,
           vm: Any = None):
    backing = memory.create(kind, SIZE * (2 if double else 1))
    vm = FakeVm() if vm is None else vm
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


def _race_through_c(kvm: Any, spec: RaceSpec) -> Any:
    """Run one race on the real /dev/kvm; its first disruptor must have taken the C loop, and every
    oracle must hold. Returns the report."""
    made: list[Any] = []

    def make(kind: str, size: int, vm: Any) -> Any:
        b = memory.create(kind, size, vm=vm)
        made.append(b)
        return b

    race = Race(kvm, spec, make)
    try:
        rep = race.run()
        assert race.disruptors[0].ran_fast
    finally:
        race.close()
        for b in made:
            b.close()
    assert not rep.failures(), "\n".join(rep.failures())
    return rep


def test_c_loop_races_the_real_kvm(kvm):
    """punch on shmem through the C loop against a real guest: every oracle of the case holds."""
    rep = _race_through_c(kvm, RaceSpec("shmem", ("punch",), vcpus=2, seconds=0.5, seed=11, label="fast-kvm"))
    assert rep.total_ops > 0 and rep.overlapped_ops > 0 and rep.generations == rep.total_ops + 1  # + the preflight op


# ---- the memslot flips (slot-readd, slot-move): raw KVM_SET_USER_MEMORY_REGION(2) in the C loop --------

PROBE = 7  # a slot id the region never uses


def _kernel_slot_gpas(real: Vm, size: int) -> list[int]:
    """Where KVM has a memslot now, of GPA_A and GPA_B (whatever the binding's table says): a probe
    slot added there is refused with EEXIST (overlap) when one is, accepted (and deleted) when not."""
    out = []
    for gpa in (GPA_A, GPA_B):
        try:
            real.add_memslot(gpa, 4096, slot=PROBE)
        except KvmError as e:
            assert e.errno == errno.EEXIST, e
            out.append(gpa)
        else:
            real.delete_memslot(PROBE)
    return out


def _slot_state(vm: SlotVm, mem: Region) -> dict[str, Any]:
    table = vm.real.memslot_snapshot()
    return {"loc": mem.loc, "table": {k: m.describe() for k, m in table.items() if k != 0},
            "kernel": _kernel_slot_gpas(vm.real, mem.size)}


def _setup_slot(kvm: Any, kind: str, cls: type, **k: Any):
    vm = SlotVm(Vm(kvm))
    backing, vm, mem, d = _setup(kind, cls, vm=vm, **k)
    return backing, vm, mem, d


SLOT_CASES = [("anon", "slot-readd"), ("shmem", "slot-readd"), ("anon", "slot-move"), ("shmem", "slot-move")]


@pytest.mark.parametrize(("kind", "name"), SLOT_CASES, ids=[f"{n}-{k}" for k, n in SLOT_CASES])
@pytest.mark.parametrize("n", [200, 201])
def test_slot_c_loop_publishes_exactly_what_step_does(kvm, kind, name, n):
    """Same schedule, same counters, gentab[], tags, ctrl->loc; and the slot table equals the kernel's
    slots, right when the loop returns (before finish(), which moves the slot back) and after."""
    seen: dict[bool, dict[str, Any]] = {}

    class Recorded(DISRUPTORS[name]):  # type: ignore[misc, valid-type]  # finish() only: the C loop stays
        def finish(self) -> None:
            self.at_return = _slot_state(self.ctx.vm, self.mem)
            super().finish()

    out = {}
    for fast in (True, False):
        backing, vm, mem, d = _setup_slot(kvm, kind, Recorded)
        try:
            d.fast = fast
            d.preflight()  # one op through step() first, as the engine does (slot-move: now at GPA_B)
            d.run(threading.Event(), limit=n)
            assert d.error is None, d.error
            assert d.ran_fast is fast
            out[fast] = {**_state(mem, d), "at_return": d.at_return, "after": _slot_state(vm, mem)}
            assert _cfast.lib.kh_trylock(mem.c), "the writers' lock was left held"
            _cfast.lib.kh_unlock(mem.c)
            seen[fast] = out[fast]["at_return"]
        finally:
            _close(mem, backing, vm)
    assert out[True] == out[False]
    back = name == "slot-move" and n % 2  # the preflight's move + the loop's left it at GPA_B
    assert seen[True]["loc"] == back
    assert out[True]["after"]["loc"] == 0  # finish() moves it back (one more op)
    assert out[True]["ops"] == n + back and out[True]["overlapped"] == n + back and out[True]["gen"] == n + back + 1
    for st in (seen[True], out[True]["after"]):  # the table says where KVM has the slot
        assert st["kernel"] == [GPA_B if st["loc"] else GPA_A] and f"gpa={st['kernel'][0]:#x}," in st["table"][SLOT]


def _slot_failure(kvm: Any, name: str, fast: bool, plant: Any) -> tuple[str, Any, dict[str, Any]]:
    backing, vm, mem, d = _setup_slot(kvm, "anon", DISRUPTORS[name])
    try:
        plant(vm, mem)
        d.fast = fast
        d.run(threading.Event(), limit=10)
        assert isinstance(d.error, KvmError) and d.ran_fast is fast, d.error
        assert d.ops == 0 and mem.seq == 1
        assert all(g == 2 * mem.gen + 1 for g in mem.gentab), "the failed op's range must stay odd"
        assert _cfast.lib.kh_trylock(mem.c), "abort must release the writers' lock"
        _cfast.lib.kh_unlock(mem.c)
        return str(d.error), d.error.errno, _slot_state(vm, mem)
    finally:
        _close(mem, backing, vm)


def _delete_behind_the_table(vm: SlotVm, mem: Region) -> None:
    m = vm.real.memslots[SLOT]
    r = ffi.new("struct kvm_userspace_memory_region *")
    r.slot, r.guest_phys_addr, r.memory_size, r.userspace_addr = SLOT, m.gpa, 0, m.hva
    kvm_ioctl(vm.real.fd, "KVM_SET_USER_MEMORY_REGION", r)  # the binding's table still has the slot


def _occupy_gpa_b(vm: SlotVm, mem: Region) -> None:
    vm.real.add_memslot(GPA_B, 4096, slot=2)


def _occupy_gpa_b_and_point_there(vm: SlotVm, mem: Region) -> None:
    vm.real.add_memslot(GPA_B, 4096, slot=2)
    # binding and guest say GPA_B (KVM has it at GPA_A): the delete succeeds, the re-add at GPA_B fails
    vm.real.note_memslot_changed(SLOT, GPA_B, mem.size)
    mem.set_loc(1)


FAILURES = [("slot-readd", _delete_behind_the_table, "EINVAL", [], True),
            ("slot-readd", _occupy_gpa_b_and_point_there, "EEXIST", [GPA_B], False),
            ("slot-move", _occupy_gpa_b, "EEXIST", [GPA_A, GPA_B], True)]


@pytest.mark.parametrize(("name", "plant", "err", "kernel", "in_table"), FAILURES,
                         ids=["readd-delete", "readd-add", "move"])
def test_a_slot_error_reads_the_same_and_leaves_the_table_as_step_does(kvm, name, plant, err, kernel, in_table):
    got = {fast: _slot_failure(kvm, name, fast, plant) for fast in (True, False)}
    assert got[True] == got[False]
    msg, e, st = got[True]
    assert errno.errorcode[e] == err and msg.startswith("KVM_SET_USER_MEMORY_REGION(slot=1, gpa=0x"), msg
    assert st["kernel"] == kernel and (SLOT in st["table"]) is in_table


class _Recorder:
    """kvm_ioctl for a Vm with no fd: records (name, argument bytes); fails the call numbered `fail`."""

    def __init__(self, fail: int = -1) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.fail = fail

    def __call__(self, fd: int, name: str, arg: Any = 0, desc: Any = "") -> int:
        self.calls.append((name, bytes(ffi.buffer(arg))))
        if len(self.calls) - 1 == self.fail:
            raise KvmError(errno.EINVAL, name, desc() if callable(desc) else desc)
        return 0


class _GmemBacking:
    """A guest_memfd backing as add_memslot reads one (no kernel object behind it)."""

    def __init__(self, addr: int) -> None:
        self.addr, self.length, self.guest_memfd, self.guest_memfd_offset = addr, SIZE, 77, 0x3000

    def close(self) -> None:
        pass


ARG_CASES = [("slot-readd", "v1"), ("slot-readd", "gmem"), ("slot-move", "v1"), ("slot-move", "v2")]


@pytest.mark.parametrize(("name", "how"), ARG_CASES, ids=[f"{n}-{h}" for n, h in ARG_CASES])
def test_slot_c_loop_issues_the_ioctls_the_binding_would(monkeypatch, name, how):
    """Per op the C loop issues, byte for byte, the ioctl(s) step() issues through the binding
    (Vm._update's v1/v2 choice, add_memslot's for a guest_memfd re-add), and a failure reads the same:
    also for the v2 / guest_memfd slots this kernel may not offer."""
    rec = _Recorder()
    monkeypatch.setattr("harness.kvm.vm.kvm_ioctl", rec)
    shell = Vm.__new__(Vm)  # a Vm with no kernel object: only the slot table and the recorded ioctls
    shell.__dict__.update(memslots={}, vcpus=[], _owned=[], _stats=None, fd=-1, closed=False)
    vm = SlotVm(shell)
    backing = memory.create("anon", SIZE)
    if how == "gmem":
        backing, anon = _GmemBacking(backing.addr), backing
    else:
        anon = backing
    mem = Region(vm, backing, SIZE, STRIDE, page=4096, writers=(0,), nvcpus=1, alias=False)  # type: ignore[arg-type]
    try:
        if how == "v2":  # a slot made through the v2 ioctl: changes go through it too
            shell.delete_memslot(SLOT)
            shell.add_memslot(GPA_A, SIZE, slot=SLOT, backing=backing, v2=True)
        m = shell.memslots[SLOT]
        assert m.v2 is (how != "v1") and bool(m.flags & KVM_MEM_GUEST_MEMFD) is (how == "gmem")
        ctx = HostContext(mem=mem, backing=backing, vm=vm, kind_page=4096, vcpus=(), rng_key="fast/7",  # type: ignore[arg-type]
                          spare_vcpu=lambda: None, landed=[])  # type: ignore[arg-type, return-value]
        d = DISRUPTORS[name](ctx)
        d.prepare()
        c = d._fast_loop()
        if how == "v2" and name == "slot-readd":
            assert c is None  # step()'s re-add would make it a v1 slot: that stays in Python
            return
        assert c is not None
        rec.calls.clear()
        d.step(0, SIZE)
        want = rec.calls[:]
        assert shell.memslots[SLOT] == m or name == "slot-move"
        mem.set_loc(0)
        shell.note_memslot_changed(SLOT, GPA_A, SIZE)
        gpa = GPA_B if name == "slot-move" else GPA_A
        names = {IOCTLS[n].number: n for n in ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2")}
        got = []
        for k in range(len(want)):
            c.slot_arg[k].guest_phys_addr = gpa
            n = names[int(c.slot_req[k])]
            got.append((n, bytes(_cfast.ffi.buffer(_cfast.ffi.addressof(c.slot_arg[k])))[:IOCTLS[n].size]))
        assert got == want
        for k in range(len(want)):  # the message a failure of call k raises, both ways
            rec.calls.clear()
            rec.fail = k
            with pytest.raises(KvmError) as ei:
                d.step(0, SIZE)
            d.abort()
            c.fail, c.fail_a, c.err = _cfast.lib.KH_FAIL_SLOT, k, errno.EINVAL
            assert str(d.fast_error(c)) == str(ei.value)
            mem.set_loc(0)
            shell.memslots[SLOT] = m
    finally:
        mem.close()
        anon.close()
        shell.closed = True  # no fd, nothing to close
        FakeVm.close(vm)


def test_slot_move_c_loop_races_the_real_kvm(kvm, monkeypatch):
    """slot-move through the C loop against a real guest: the oracles hold, and when the loop
    returns (an odd number of moves after the preflight's: back at GPA_A) the binding's slot table
    says where KVM has the slot."""
    at_return: list[Any] = []

    class Recorded(SlotMove):
        def finish(self) -> None:
            vm = self.ctx.vm
            at_return.append((self.mem.gpa_now, vm.memslots[SLOT].gpa, _kernel_slot_gpas(vm, self.mem.size)))
            super().finish()

    monkeypatch.setitem(DISRUPTORS, "slot-move", Recorded)
    rep = _race_through_c(kvm, RaceSpec("anon", ("slot-move",), vcpus=2, seconds=5.0, max_ops=41, seed=11,
                                        label="fast-kvm"))
    assert rep.total_ops == 41 and rep.overlapped_ops > 0
    assert at_return == [(GPA_A, GPA_A, [GPA_A])]


def test_slot_readd_runs_in_c_and_leaves_the_table(kvm):
    backing, vm, mem, d = _setup_slot(kvm, "anon", SlotReadd)
    try:
        before = vm.real.memslot_snapshot()
        d.run(threading.Event(), limit=50)
        assert d.ran_fast and d.error is None and d.ops == 50
        assert vm.real.memslot_snapshot() == before and _kernel_slot_gpas(vm.real, SIZE) == [GPA_A]
    finally:
        _close(mem, backing, vm)
