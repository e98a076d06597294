"""kvmclock through KVM's gfn_to_pfn_cache, on invalidated backings.

The guest (guests/payloads/kvmclock.c) enables kvmclock (MSR_KVM_SYSTEM_TIME_NEW) with its pvclock
struct in the first page of a test slot on each backing. The host then invalidates that page (punch
hole, munmap + remap, memslot delete + re-add, memslot move + a new slot at the GPA, guest_memfd
punch), seeds the page mapped now with a marker version, and asks KVM for a clock update
(KVM_SET_CLOCK, KVM_KVMCLOCK_CTRL, or moving the vCPU to another thread and CPU). Oracles:
  - the page mapped now holds an even version above the seed with sane time, at the struct's
    offset only (the rest of the page is as seeded), and the guest reads the same through its mapping;
  - the old page, which the host keeps alive where the method allows, is byte-for-byte untouched
    (a write there is a write through a stale pfn);
  - no kernel splat.
The race cases let a host thread invalidate over and over while the vCPU rewrites the MSR in a loop
(each write is one clock update through the cache); kept old pages must stay untouched, the guest
must never see a half-written struct after its own update, and the kernel log stays clean.
The same cache on private memory (a SW-protected VM): test_kvmclock_on_private_memory. Xen
shared_info / vcpu_info / runstate use it too: cases/test_xen.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from harness import memory
from harness.kvm.caps import Cap, VmType
from harness.kvm.errors import KvmError
from harness.lib.guestvm import GuestVm
from harness.lib.ucall import DONE, SYNC
from harness.memory import PAGE_1G, PAGE_4K, Feature, hostmem
from harness.memory.private import PrivateMemory, private_memory_reason
from harness.oracles.kvmclock import guest_time, pvclock_update, untouched_page
from harness.pytest import options
from harness.unsupported import Unsupported
from harness.x86.kvmclock import (
    KVM_CLOCK_TSC_STABLE,
    MSR_KVM_SYSTEM_TIME_NEW,
    PVCLOCK_GUEST_STOPPED,
    PVCLOCK_SIZE,
    Pvclock,
)

SLOT = 1
GPA = 1 << 40
GPA_AWAY = 1 << 41  # where slot-move puts the old memory
GVA = 1 << 39
PV_OFF = 0x40  # the struct sits inside the page: KVM must write exactly there
SEED_BASE = 1000
UNIT_4K = 16 * PAGE_4K  # test slot size for 4 KiB kinds

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4


def mremap(old: int, size: int, new: int, flags: int) -> None:
    r = _libc.mremap(old, size, size, flags | MREMAP_MAYMOVE | MREMAP_FIXED, new)
    if r is None or r == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, f"mremap({old:#x}, {size:#x} -> {new:#x}, flags {flags:#x}): {os.strerror(e)}")


# ---- the guest ------------------------------------------------------------------------------------
class Clock:
    """A GuestVm running the kvmclock payload with a descriptor in scratch memory."""

    def __init__(self, vm: GuestVm) -> None:
        self.vm = vm
        self.desc = vm.alloc(64, 64)
        vm.vcpu.set_args(self.desc)

    def cmd(self, cmd: int, *, count: int = 0, timeout: float | None = None) -> tuple[int, ...]:
        vals = (cmd, MSR_KVM_SYSTEM_TIME_NEW, GPA + PV_OFF, GVA + PV_OFF, count, 0, 0)
        self.vm.write(self.desc, b"".join(v.to_bytes(8, "little") for v in vals))
        uc = self.vm.vcpu.run_until_ucall(timeout)
        assert uc.cmd == SYNC, f"kvmclock answered {uc!r} to cmd {cmd}"
        return uc.args

    def stop(self) -> None:
        self.vm.write_u64(self.desc + 40, 1)

    def done(self) -> None:
        self.vm.write(self.desc, bytes(56))
        assert self.vm.vcpu.run_until_ucall().cmd == DONE


# ---- invalidations ------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where the pvclock page lives now and how to read the page it lived in before."""

    backing: memory.Backing
    offset: int  # of the pvclock unit inside `backing` (what the guest's GPA maps to now)
    read_old: Callable[[], bytes] | None = None  # the old unit, kept alive by the host
    old_where: str = ""

    def read_now(self, length: int) -> bytes:
        return self.backing.read(self.offset, length)

    def write_now(self, data: bytes) -> None:
        self.backing.write(self.offset, data)


@dataclass
class Setup:
    vm: GuestVm
    kind: str
    unit: int  # invalidation granularity: the kind's page (4 KiB kinds: the whole small slot)
    make: Callable[[], memory.Backing]
    backing: memory.Backing
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    moves: int = 0
    file_view: hostmem.Mapping | None = None  # remap of fd kinds: the whole file, kept mapped
    file_cur: int = 0  # remap of fd kinds: the file offset the unit maps now

    def invalidate(self, method: str) -> Target:
        return INVALIDATIONS[method](self)


def _punch(s: Setup) -> Target:
    s.backing.punch_hole(0, s.unit)
    return Target(s.backing, 0)


def _remap(s: Setup) -> Target:
    """Replace the host mapping of the unit, keeping the old memory alive and readable."""
    b = s.backing
    if b.supports(Feature.FD):
        # map the unit onto the spare file offset `unit` (then back to 0, ...): the old offset stays
        # in the file, readable through a second mapping of the whole file the test keeps
        if s.file_view is None:
            s.file_view = hostmem.Mapping(2 * s.unit, flags=hostmem.MAP_SHARED, fd=b.fd)
            s.cleanup.append(s.file_view.close)
        cur, new = s.file_cur, s.unit - s.file_cur
        hostmem.mmap(s.unit, hostmem.PROT_READ | hostmem.PROT_WRITE, hostmem.MAP_SHARED | hostmem.MAP_FIXED,
                     b.fd, new, b.addr)
        s.file_cur = new
        view = s.file_view
        return Target(b, 0, lambda: bytes(view.buf[cur:cur + s.unit]), f"file offset {cur:#x}")
    # anonymous: move the old pages away (kept), then fresh memory at the same address
    keep = hostmem.Mapping(s.unit + (memory.PAGE_2M if s.unit >= memory.PAGE_2M else 0))
    s.cleanup.append(keep.close)
    dst = (keep.addr + s.unit - 1) // s.unit * s.unit if s.unit >= memory.PAGE_2M else keep.addr
    shared = b.supports(Feature.SHARED)
    # private: MREMAP_DONTUNMAP leaves the source mapped, fresh (zero-fill) in one step; shared
    # anonymous memory would keep the same shmem object there, so move it and map a new one
    mremap(b.addr, s.unit, dst, 0 if shared else MREMAP_DONTUNMAP)
    if shared:
        hostmem.mmap(s.unit, hostmem.PROT_READ | hostmem.PROT_WRITE,
                     hostmem.MAP_SHARED | hostmem.MAP_ANONYMOUS | hostmem.MAP_FIXED, -1, 0, b.addr)
    elif s.unit >= memory.PAGE_2M:
        hostmem.madvise(b.addr, s.unit, hostmem.MADV_HUGEPAGE)
    return Target(b, 0, lambda: bytes(hostmem.view(dst, s.unit)), f"moved to {dst:#x}")


def _slot_readd(s: Setup) -> Target:
    """KVM_MR_DELETE, then the same slot id and GPA on other memory; the old backing is kept."""
    old = s.backing
    new = s.make()
    s.vm.delete_memslot(SLOT)
    s.vm.add_memslot(GPA, s.unit, slot=SLOT, backing=new)
    s.backing = new
    return Target(new, 0, lambda: old.read(0, s.unit), f"old backing {old.kind} at {old.addr:#x}")


def _slot_move(s: Setup) -> Target:
    """KVM_MR_MOVE of the slot away, and a new slot on other memory at the old GPA."""
    old = s.backing
    cur = s.vm.slot_for(GPA).slot
    s.moves += 1
    away = GPA_AWAY + s.moves * (1 << 32)
    s.vm.move_memslot(cur, away)
    new = s.make()
    s.vm.add_memslot(GPA, s.unit, backing=new)  # the next free slot id
    s.backing = new
    return Target(new, 0, lambda: old.read(0, s.unit), f"old backing, slot {cur} moved to GPA {away:#x}")


INVALIDATIONS: dict[str, Callable[[Setup], Target]] = {
    "punch": _punch,
    "remap": _remap,
    "slot-readd": _slot_readd,
    "slot-move": _slot_move,
}


def _unit(kind: str) -> int:
    page = memory.kind(kind).page_size
    return UNIT_4K if page == PAGE_4K else page


def _skip_reason(kind: str, method: str) -> str | None:
    k = memory.kind(kind)
    if method == "slot-move" and k.supports(Feature.GUEST_MEMFD):
        return "KVM refuses KVM_MR_MOVE of a guest_memfd slot (EINVAL)"
    if method == "remap" and k.supports(Feature.GUEST_MEMFD):
        return ("a guest_memfd slot's memory is the fd at guest_memfd_offset, not what userspace_addr "
                "maps: remapping the host view is no invalidation of it upstream")
    if k.supports(Feature.DEVICE) and method in ("punch", "remap"):
        return (f"{kind} is a device's fixed memory: nothing to punch, and the remap method's file offsets "
                "0 and unit are not this backing's range of the device")
    if k.page_size == PAGE_1G and method != "punch":
        return "1 GiB kinds run the punch method only (the others need a second 1 GiB page)"
    return None


@pytest.fixture
def clock_setup(kvm, backings) -> Iterator[Callable[[str], Setup]]:
    made: list[Setup] = []
    vms: list[GuestVm] = []

    def make(kind: str) -> Setup:
        vm = GuestVm(kvm, "kvmclock", "long64")
        vms.append(vm)  # closed even if making its backing skips the case
        unit = _unit(kind)
        size = unit if memory.kind(kind).page_size == PAGE_1G else 2 * unit  # a spare unit for remap

        def new_backing() -> memory.Backing:
            return backings(kind, size, vm=vm)

        b = new_backing()
        b.write(0, bytes(8))  # fault it in from the host: a 1 GiB page's first touch takes seconds here
        s = Setup(vm, kind, unit, new_backing, b)
        made.append(s)
        vm.add_memslot(GPA, unit, slot=SLOT, backing=b)
        vm.map(GVA, GPA, unit, memory.PAGE_2M if unit >= memory.PAGE_2M else PAGE_4K)
        return s

    yield make
    try:
        for vm in vms:
            vm.close()  # before the host memory the slots point at goes
    finally:
        for s in made:
            for c in reversed(s.cleanup):
                c()


# ---- update triggers -------------------------------------------------------------------------------
def _migrate(fn: Callable[[], tuple[int, ...]]) -> tuple[int, ...]:
    """Run fn once from this thread pinned to one CPU, then from a new thread pinned to another:
    the vCPU is loaded on a different physical CPU by a different task (kvm_arch_vcpu_load)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"vCPU migration needs two CPUs, this process may use {cpus}")
    a, b = cpus[0], cpus[1]
    prev = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {a})  # pid 0: this thread only
        fn()
    finally:
        os.sched_setaffinity(0, prev)
    out: dict[str, object] = {}

    def body() -> None:
        try:
            os.sched_setaffinity(0, {b})
            out["r"] = fn()
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=body, name="kvmclock-migrated-vcpu")
    t.start()
    t.join(30)
    if "e" in out:
        raise out["e"]  # type: ignore[misc]
    return out["r"]  # type: ignore[return-value]


TRIGGERS = ("set_clock", "kvmclock_ctrl", "migrate")


def _check_round(s: Setup, c: Clock, method: str, trigger: str, rnd: int, kvmclock_ctrl_ok: bool) -> dict:
    vm = s.vm
    t = s.invalidate(method)
    old_before = t.read_old() if t.read_old else None
    # seed the page mapped now: a random page with a marker pvclock at PV_OFF
    rng = random.Random(f"{s.kind}/{method}/{trigger}/{rnd}")
    seed_v = SEED_BASE * (rnd + 1)
    page = bytearray(rng.randbytes(PAGE_4K))
    page[PV_OFF:PV_OFF + PVCLOCK_SIZE] = Pvclock(seed_v, 0, 0, 0, 0, 0).pack()
    t.write_now(bytes(page))

    want_flags = 0
    lo, clock_flags = vm.get_clock_data()
    stable = bool(clock_flags & KVM_CLOCK_TSC_STABLE)  # master clock: no update on a CPU change
    if trigger == "set_clock":
        lo += 1_000_000_000  # jump ahead: a stale struct would show the old system_time
        vm.set_clock(lo)
        args = c.cmd(2)
    elif trigger == "kvmclock_ctrl":
        if not kvmclock_ctrl_ok:
            pytest.skip("KVM_CAP_KVMCLOCK_CTRL is 0 on this kernel")
        vm.vcpu.kvmclock_ctrl()
        want_flags = PVCLOCK_GUEST_STOPPED
        args = c.cmd(2)
    else:
        args = _migrate(lambda: c.cmd(2))
    hi = vm.get_clock()

    now_page = t.read_now(PAGE_4K)
    host = Pvclock.parse(now_page[PV_OFF:])
    guest = Pvclock.from_sync(args)
    where = (f"backing {s.kind}, invalidation {method}, trigger {trigger}, round {rnd}, pvclock at GPA "
             f"{GPA + PV_OFF:#x} ({t.backing.kind}+{t.offset + PV_OFF:#x})")
    probs: list[str] = []
    updated = host.version != seed_v
    if trigger == "migrate" and not stable and not updated:
        probs.append("no clock update after the vCPU moved to another CPU, though KVM_GET_CLOCK does not "
                     "report KVM_CLOCK_TSC_STABLE (without a master clock a CPU change asks for one)")
    if trigger == "migrate" and not updated:
        # with a master clock KVM skips the update on a CPU change: nothing may have been written
        if now_page != bytes(page):
            probs.append("no clock update after migration, yet the page mapped now changed")
    else:
        slack = 50_000_000 if trigger == "set_clock" else 10**18  # ctrl / migrate do not move time
        probs += pvclock_update(seed_v, host, clock_lo=lo if trigger == "set_clock" else None,
                                clock_hi=hi, slack_ns=slack, want_flags=want_flags).problems
        outside = now_page[:PV_OFF] + now_page[PV_OFF + PVCLOCK_SIZE:]
        want_outside = bytes(page[:PV_OFF] + page[PV_OFF + PVCLOCK_SIZE:])
        if outside != want_outside:
            probs.append("bytes outside the 32-byte struct changed in the page mapped now")
    # KVM may update again on its own (e.g. the vCPU thread moved CPUs): the guest's reading must be
    # from the page mapped now (above the seed, even), and not newer than what the host sees after.
    # Migrating with a master clock asks for no update; one that came anyway (the loaded machine moved
    # the vCPU thread mid-run: vcpu_load) may land after the guest's read, which then shows the seed:
    # still the page mapped now (a stale page could not hold this round's seed), so that is no failure.
    late = trigger == "migrate" and stable and updated and guest.version == seed_v
    if late:
        print(f"{where}: an update the migration did not ask for landed after the guest's read (it read the seed)")
    if updated and not late and not (seed_v < guest.version <= host.version and not guest.version & 1):
        probs.append(f"the guest reads {guest.describe()} through its mapping, the host sees {host.describe()} "
                     f"in the page mapped now (seeded {seed_v})")
    if not updated and guest.version != seed_v:
        probs.append(f"the guest reads {guest.describe()}, the page mapped now still holds the seed {seed_v}")
    if updated and not late and args[5] == 0:
        probs.append("the guest never read a consistent (even, stable) version")
    if updated and not late:
        probs += guest_time(guest, args[4], lo, hi).problems
    if t.read_old is not None:
        probs += untouched_page(old_before, t.read_old(), base=GPA, what=f"old page ({t.old_where})").problems
    assert not probs, f"{where}:\n  " + "\n  ".join(probs) + f"\n  host view: {host.describe()}"
    return {"updated": updated, "version": host.version}


def _params() -> list:
    out = []
    for kind in memory.names():
        for method in INVALIDATIONS:
            why = _skip_reason(kind, method)
            marks = [pytest.mark.skip(reason=why)] if why else []
            out.append(pytest.param(kind, method, id=f"{kind}-{method}", marks=marks))
    return out


@pytest.mark.parametrize(("kind", "method"), _params())
@pytest.mark.kvm_timeout(60)
def test_kvmclock_after_invalidation(kvm, clock_setup, kernel_health, case_property, kind, method):
    """For each trigger (KVM_SET_CLOCK, KVM_KVMCLOCK_CTRL, vCPU migration): invalidate the pvclock
    page, seed the page mapped now, ask for a clock update, check both pages and the guest's view."""
    s = clock_setup(kind)
    c = Clock(s.vm)
    c.cmd(1)  # enable kvmclock
    first = Pvclock.parse(s.backing.read(PV_OFF, PVCLOCK_SIZE))
    assert first.version and not first.version & 1 and first.mul, f"kvmclock enable wrote {first.describe()}"
    ctrl_ok = kvm.check_extension(Cap.KVMCLOCK_CTRL) > 0
    # each punch of a 1 GiB page costs a fresh 1 GiB page (seconds to zero here): one round
    triggers = TRIGGERS[:1] if s.unit == PAGE_1G else TRIGGERS
    for rnd, trigger in enumerate(triggers):
        r = _check_round(s, c, method, trigger, rnd, ctrl_ok)
        case_property(f"{trigger}_updated", r["updated"])
    c.done()
    kernel_health.assert_healthy(f"{kind}/{method}")


# ---- races ----------------------------------------------------------------------------------------
class Swapper:
    """Replaces the unit's host mapping with fresh memory over and over, keeping every old unit
    alive in a pool and checking, when a pool entry is reused and at the end, that nothing wrote
    it after it was unmapped."""

    POOL = 16

    def __init__(self, s: Setup) -> None:
        self.s = s
        b = s.backing
        self.fd_kind = b.supports(Feature.FD)
        self.unit = s.unit
        self.snap: dict[int, bytes] = {}
        self.problems: list[str] = []
        self.swaps = 0
        if self.fd_kind:
            # file offsets 0..POOL-1 units; the mapping shows entry `cur`
            os.ftruncate(b.fd, self.POOL * self.unit)
            self.view = hostmem.Mapping(self.POOL * self.unit, flags=hostmem.MAP_SHARED, fd=b.fd)
            s.cleanup.append(self.view.close)
            self.cur = 0
        else:
            self.keep = hostmem.Mapping(self.POOL * self.unit)
            s.cleanup.append(self.keep.close)
            self.next = 0

    def _read(self, k: int) -> bytes:
        base = self.view.addr if self.fd_kind else self.keep.addr
        return bytes(hostmem.view(base + k * self.unit, PAGE_4K))

    def _check(self, k: int) -> None:
        if k in self.snap:
            self.problems += untouched_page(self.snap[k], self._read(k), base=GPA,
                                            what=f"old unit {k} (swap {self.swaps})").problems

    def swap(self) -> None:
        b = self.s.backing
        if self.fd_kind:
            old, new = self.cur, (self.cur + 1) % self.POOL
            self._check(new)  # about to be mapped again: it must be as we left it
            hostmem.mmap(self.unit, hostmem.PROT_READ | hostmem.PROT_WRITE,
                         hostmem.MAP_SHARED | hostmem.MAP_FIXED, b.fd, new * self.unit, b.addr)
            self.cur = new
            self.snap.pop(new, None)
            self.snap[old] = self._read(old)
        else:
            k = self.next
            self.next = (k + 1) % self.POOL
            self._check(k)
            mremap(b.addr, self.unit, self.keep.addr + k * self.unit, MREMAP_DONTUNMAP)
            self.snap[k] = self._read(k)
        self.swaps += 1

    def finish(self) -> None:
        for k in list(self.snap):
            self._check(k)


def _race_params() -> list:
    out = []
    for kind in ("anon", "anon-thp", "shmem", "file", "hugetlb-2m", "guest_memfd"):
        out.append(pytest.param(kind, "punch", id=f"{kind}-punch"))
        if kind not in ("guest_memfd",):
            out.append(pytest.param(kind, "swap", id=f"{kind}-swap"))
    return out


@pytest.mark.parametrize(("kind", "method"), _race_params())
def test_kvmclock_race(kvm, clock_setup, kernel_health, request, case_property, kind, method):
    """A host thread invalidates the pvclock unit over and over (punch, or swap in fresh memory
    keeping the old) while the vCPU rewrites MSR_KVM_SYSTEM_TIME_NEW in a loop, each write one
    clock update through the pfncache. Then one clean update must land in the page mapped now."""
    seed = options.seed(request.config)
    seconds = options.race_seconds(request.config, 0.8)
    early = options.race_until_goal(request.config)
    s = clock_setup(kind)
    if memory.kind(kind).supports(Feature.HUGETLB):
        # swap: the pool needs POOL units. punch: a punched hugetlb page gives its reservation
        # back, so the refault takes any free page: keep two spare so other workers cannot starve it
        # (an empty pool would show as an MMIO exit, a resource fault, not a KVM one)
        extra = Swapper.POOL if method == "swap" else 2
        request.getfixturevalue("hugepages").reserve(memory.kind(kind).page_size, extra)
    c = Clock(s.vm)
    c.cmd(1)
    swapper = Swapper(s) if method == "swap" else None
    rng = random.Random(seed)
    stop = threading.Event()
    err: list[BaseException] = []
    n = 0

    def host() -> None:
        nonlocal n
        try:
            while not stop.is_set():
                if swapper is not None:
                    swapper.swap()
                else:
                    s.backing.punch_hole(0, s.unit)
                n += 1
                if rng.random() < 0.1:
                    time.sleep(0)  # let the GIL go now and then: vary the interleaving
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=host, name="pfncache-invalidator")
    out: dict[str, tuple[int, ...]] = {}
    def stopper() -> None:
        # until both sides did enough to call it a race (under load it can take longer), then
        # `seconds` (a soak) or by default twice that much (at most `seconds`)
        end = time.monotonic() + seconds
        while time.monotonic() < end + 15 and not stop.is_set():
            writes = s.vm.read_u64(c.desc + 48)
            if n > 10 and writes > 100 and (time.monotonic() >= end or (early and n > 20 and writes > 200)):
                break
            time.sleep(0.02)
        c.stop()

    t.start()
    st = threading.Thread(target=stopper, name="pfncache-race-stopper")
    try:
        vals = (3, MSR_KVM_SYSTEM_TIME_NEW, GPA + PV_OFF, GVA + PV_OFF, 0, 0, 0)
        s.vm.write(c.desc, b"".join(v.to_bytes(8, "little") for v in vals))
        st.start()
        uc = s.vm.vcpu.run_until_ucall(seconds + 30)
        out["churn"] = uc.args
    finally:
        stop.set()
        t.join(10)
        if st.is_alive():
            st.join(5)
    assert not t.is_alive(), "the invalidating thread did not stop"
    if err:
        raise err[0]
    iters, odd, torn, maxv, _ = out["churn"]
    case_property("clock_updates", iters)
    case_property("max_version", maxv)
    case_property("invalidations", n)
    case_property("torn_reads", torn)
    where = f"{kind}/{method}, seed {seed}, {iters} guest clock updates vs {n} invalidations"
    assert iters > 100 and n > 10, f"the race did not race: {where}"
    assert odd == 0, f"the guest saw an odd (half-written) version {odd} times right after its own update ({where})"
    if swapper is not None:
        swapper.finish()
        assert not swapper.problems, f"{where}: writes through a stale pfn:\n  " + "\n  ".join(swapper.problems[:5])
    # one clean update lands in the page mapped now
    seed_v = 7 * SEED_BASE
    s.backing.write(PV_OFF, Pvclock(seed_v, 0, 0, 0, 0, 0).pack())
    lo = s.vm.get_clock() + 1_000_000_000
    s.vm.set_clock(lo)
    args = c.cmd(2)
    host_view = Pvclock.parse(s.backing.read(PV_OFF, PVCLOCK_SIZE))
    probs = list(pvclock_update(seed_v, host_view, clock_lo=lo, clock_hi=s.vm.get_clock()).problems)
    gv = Pvclock.from_sync(args).version
    if not seed_v < gv <= host_view.version:
        probs.append(f"the guest read version {gv}, the page mapped now holds {host_view.version} (seeded {seed_v})")
    assert not probs, f"{where}: after the race: {probs}"
    c.done()
    kernel_health.assert_healthy(where)


# ---- private memory (seed 003) ----------------------------------------------------------------------
# A SW-protected VM's kvmclock page on convertible memory (harness.memory.private): the gfn's
# attribute says which side the guest reads, the shared side (userspace_addr) or the guest_memfd.
# Whatever KVM writes must land on the side the guest reads now; a write into the side the page was
# converted away from (or into a punched private page the guest no longer has) is the kind of
# write the pfncache/guest_memfd invalidation patches are about.
PRIVATE_METHODS = ("to-private", "to-shared", "punch-private", "punch-shared")


def _private_clock(kvm, start_private: bool) -> tuple[GuestVm, PrivateMemory, Clock]:
    why = private_memory_reason(kvm)
    if why:
        raise Unsupported(why)
    vm = GuestVm(kvm, "kvmclock", "long64", vm_type=VmType.SW_PROTECTED)
    try:
        mem = PrivateMemory(vm, UNIT_4K)
        vm.own(mem)
        vm.add_memslot(GPA, UNIT_4K, slot=SLOT, backing=mem)
        vm.map(GVA, GPA, UNIT_4K, PAGE_4K)
        if start_private:
            vm.set_private(GPA, UNIT_4K)
        return vm, mem, Clock(vm)
    except BaseException:
        vm.close()
        raise


@pytest.mark.parametrize("method", PRIVATE_METHODS)
@pytest.mark.kvm_timeout(60)
def test_kvmclock_on_private_memory(kvm, kernel_health, method):
    """Enable kvmclock with its page on one side, then convert it (to-private, to-shared) or punch
    the side the guest reads (punch-private, punch-shared), then KVM_SET_CLOCK one second ahead and
    let the guest read its pvclock. The side the guest no longer reads (or the side it never read)
    must not change after the event; the guest must read either this update (even version, the new
    system_time) or, on a private page KVM cannot write, nothing newer than before - never a struct
    that KVM wrote elsewhere."""
    start_private = method in ("to-shared", "punch-private")
    vm, mem, c = _private_clock(kvm, start_private)
    with vm:
        c.cmd(1)  # enable: KVM_REQ_GLOBAL_CLOCK_UPDATE, written on the next entry
        before = Pvclock.from_sync(c.cmd(2))
        if method == "to-private":
            vm.set_private(GPA, UNIT_4K)
        elif method == "to-shared":
            vm.set_shared(GPA, UNIT_4K)
        elif method == "punch-private":
            mem.punch_hole(0, UNIT_4K)
        else:
            mem.punch_shared(0, UNIT_4K)
        private_now = method in ("to-private", "punch-private")
        shared_after_event = mem.read(0, PAGE_4K)
        lo = vm.get_clock() + 1_000_000_000
        vm.set_clock(lo)
        args = c.cmd(2)
        hi = vm.get_clock()
        guest = Pvclock.from_sync(args)
        shared_now = mem.read(0, PAGE_4K)
        host = Pvclock.parse(shared_now[PV_OFF:])
        where = (f"{method}: pvclock at GPA {GPA + PV_OFF:#x}, the guest reads the "
                 f"{'private (guest_memfd)' if private_now else 'shared'} side now")
        probs: list[str] = []
        if private_now:
            # the shared side is no longer the guest's: KVM must not write the update there
            v = untouched_page(shared_after_event, shared_now, base=GPA,
                               what="shared page (the side the guest no longer reads)")
            probs += [f"{p} (shared side now holds {host.describe()})" for p in v.problems]
            wrote = guest.version not in (0, before.version) or guest.system_time != before.system_time
            if wrote:
                probs += pvclock_update(0, guest, clock_lo=lo, clock_hi=hi).problems
        else:
            probs += pvclock_update(0, host, clock_lo=lo, clock_hi=hi).problems
            if (guest.version, guest.system_time) != (host.version, host.system_time):
                probs.append(f"the guest reads {guest.describe()}, the shared page it reads holds {host.describe()}")
        assert not probs, (f"{where}:\n  " + "\n  ".join(probs)
                           + f"\n  guest before: {before.describe()}\n  guest after: {guest.describe()}")
        c.done()
    kernel_health.assert_healthy(f"kvmclock on private memory, {method}")


def test_kvmclock_slot_move_refused_for_guest_memfd(kvm, clock_setup):
    """(documents the skip above) kvm_pvm and upstream refuse KVM_MR_MOVE of a guest_memfd slot."""
    s = clock_setup("guest_memfd")
    with pytest.raises(KvmError):
        s.vm.move_memslot(SLOT, GPA_AWAY)
