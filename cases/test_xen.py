"""Xen shared_info / vcpu_info / runstate through KVM's gfn_to_pfn_cache, on invalidated backings.

KVM writes three Xen structures into guest memory through gfn_to_pfn_caches (harness/x86/xen.py has
the layouts and what makes KVM write what): the shared_info page (wallclock at 0xc00, event-channel
bits at 0x800), vcpu_info (a pvclock at +0x20) and the runstate area. Each case puts one of them in
the first page of a test slot on one backing, names it to KVM by guest address (GFN/GPA) or by host
virtual address (where KVM offers KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA), then, round after round,
invalidates what the address maps (punch hole, MAP_FIXED remap, memslot move / delete + re-add /
delete; and, in a SW-protected VM, conversion of the page to private) with the invalidations of
cases/test_pfncache.py, seeds the page mapped now with random bytes
and a marker struct, and makes KVM write the structure:

  shared_info  KVM_SET_CLOCK (+1000 s), then KVM_XEN_ATTR_TYPE_LONG_MODE set again (rewrites the
               wallclock); KVM_XEN_HVM_EVTCHN_SEND to a masked port (sets its pending bit only)
  vcpu_info    KVM_SET_CLOCK (+1000 s), then KVM_RUN (KVM_REQ_CLOCK_UPDATE writes vcpu_info.time)
  runstate     KVM_RUN (every entry marks RUNSTATE_running); KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_CURRENT
               = blocked (a host-side write, the non-atomic path)

Oracles, after each round:
  - the page the address maps now holds the new struct: wallclock/pvclock version even and above the
    seed, wallclock = CLOCK_REALTIME - kvmclock after KVM_SET_CLOCK (within 1 s, the selftest's bound;
    a stale epoch is 1000 s off), pvclock system_time between the clock set and KVM_GET_CLOCK after;
    runstate equal to what KVM says it holds (KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA), its times adding
    up to state_entry_time and advancing round to round; and only the struct's bytes changed;
  - the guest reads the same through its mapping (kvmclock payload, cmd 2): the new version, its own
    kvmclock time in bounds, RUNSTATE_running while it runs;
  - the old page, kept mapped by the harness (as the kvmclock cases do), is byte-for-byte untouched;
  - a GPA-addressed struct whose memslot was deleted is written nowhere (shared_info's rewrite fails
    with EFAULT), and after the slot is re-added the next write lands there;
  - an HVA-addressed cache does not go through memslots (pfncache.c: no memslot lookup without a
    GPA): after a slot move / delete / re-add the write lands at the HVA (the old memory), the memory
    the GPA maps now stays untouched;
  - no kernel splat (kernel_health).
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import test_pfncache as pfc  # the kvmclock cases' invalidations (cases/ is on sys.path for pytest)

from harness import memory
from harness.kvm._cffi import ffi
from harness.kvm.caps import VmType
from harness.kvm.errors import KvmError
from harness.kvm.ioctl import kvm_ioctl
from harness.lib.guestvm import GuestVm
from harness.lib.ucall import DONE, SYNC
from harness.memory import PAGE_4K, Feature
from harness.memory.private import private_memory_reason
from harness.oracles.kvmclock import guest_time, pvclock_update, untouched_page
from harness.unsupported import Unsupported
from harness.x86 import xen
from harness.x86.kvmclock import PVCLOCK_SIZE, Pvclock
from harness.x86.xen import Runstate, RunstateState, Wallclock, XenConfig, XenVcpu, XenVm

SLOT, GPA, GVA = pfc.SLOT, pfc.GPA, pfc.GVA
KINDS = ("anon", "shmem", "guest_memfd")
STRUCTS = ("shared_info", "vcpu_info", "runstate")
OFFSET = {"shared_info": 0x0, "vcpu_info": 0x40, "runstate": 0x80}  # inside the slot's first page
JUMP_NS = 1000 * 10**9  # each KVM_SET_CLOCK jumps ahead: a stale wallclock epoch is this far off
WALLCLOCK_SLACK_NS = 10**9  # the selftest's bound on |wallclock epoch - (CLOCK_REALTIME - kvmclock)|
PVCLOCK_SLACK_NS = 50_000_000
EVTCHN_PORT = 7  # masked in the seeded page: a send sets its pending bit and nothing else
SEED_BASE = 1000
RS_MARK = Runstate(0xA5A5A5A5, 0xA5A5A5A5A5A5A5A5, (0xA5A5A5A5A5A5A5A5,) * 4)


# ---- the guest: the kvmclock payload's cmd 2 reads 32 bytes at a GVA with the version protocol ------
class Guest:
    def __init__(self, vm: GuestVm) -> None:
        self.vm = vm
        self.desc = vm.alloc(64, 64)
        self.scratch = vm.alloc(64, 64)  # zeroes: an entry that reads no test memory
        vm.vcpu.set_args(self.desc)

    def read(self, gva: int) -> tuple[int, ...]:
        """Enter the guest and have it read the struct at gva: (version, system_time, tsc_timestamp,
        mul | shift << 32 | flags << 40, its kvmclock now, tries); the first 32 bytes read as a pvclock."""
        vals = (2, 0, 0, gva, 0, 0, 0)
        self.vm.write(self.desc, b"".join(v.to_bytes(8, "little") for v in vals))
        uc = self.vm.vcpu.run_until_ucall()
        assert uc.cmd == SYNC, f"kvmclock payload answered {uc!r} to a read of {gva:#x}"
        return uc.args

    def enter(self) -> None:
        self.read(self.scratch)

    def done(self) -> None:
        self.vm.write(self.desc, bytes(56))
        assert self.vm.vcpu.run_until_ucall().cmd == DONE


# ---- one case's set-up -----------------------------------------------------------------------------
@dataclass
class Xen:
    s: pfc.Setup
    struct: str
    addressing: str  # "gpa" or "hva"
    caps: XenConfig
    xvm: XenVm
    xvcpu: XenVcpu
    guest: Guest
    prev_rs: Runstate | None = None
    named: memory.Backing | None = None  # the backing whose mapping the struct's HVA is in
    rounds: list[str] = field(default_factory=list)

    @property
    def off(self) -> int:
        return OFFSET[self.struct]

    @property
    def gva(self) -> int:
        """Where the guest reads the struct (vcpu_info: its pvclock)."""
        return GVA + self.off + (xen.VCPU_INFO_TIME if self.struct == "vcpu_info" else 0)

    def name(self) -> None:
        """Tell KVM where the struct is (each set writes it, or asks for a clock update)."""
        self.named = self.s.backing
        hva = self.named.addr + self.off
        if self.struct == "shared_info":
            if self.addressing == "hva":
                self.xvm.set_shared_info_hva(hva)
            else:
                self.xvm.set_shared_info_gfn(GPA >> 12)
        elif self.struct == "vcpu_info":
            if self.addressing == "hva":
                self.xvcpu.set_vcpu_info_hva(hva)
            else:
                self.xvcpu.set_vcpu_info_gpa(GPA + self.off)
        else:
            self.xvcpu.set_runstate_addr(GPA + self.off)


def _needs(struct: str, addressing: str) -> XenConfig:
    need = XenConfig.SHARED_INFO | XenConfig.HYPERCALL_MSR
    if struct == "runstate":
        need |= XenConfig.RUNSTATE
    if addressing == "hva":
        need |= XenConfig.SHARED_INFO_HVA
    return need


@pytest.fixture
def xen_setup(kvm, backings) -> Iterator[Callable[[str, str, str], Xen]]:
    made: list[pfc.Setup] = []
    vms: list[GuestVm] = []

    def make(kind: str, struct: str, addressing: str) -> Xen:
        caps = xen.xen_caps(kvm)
        why = xen.missing(caps, _needs(struct, addressing))
        if why:
            raise Unsupported(why)
        vm_type = VmType.DEFAULT
        if memory.kind(kind).supports(Feature.PRIVATE):  # convertible memory: a SW-protected VM
            why = private_memory_reason(kvm)
            if why:
                raise Unsupported(why)
            vm_type = VmType.SW_PROTECTED
        vm = GuestVm(kvm, "kvmclock", "long64", vm_type=vm_type)
        vms.append(vm)
        unit = pfc._unit(kind)

        def new_backing() -> memory.Backing:
            return backings(kind, 2 * unit, vm=vm)  # a spare unit for remap of fd kinds

        b = new_backing()
        b.write(0, bytes(8))
        s = pfc.Setup(vm, kind, unit, new_backing, b)
        made.append(s)
        vm.add_memslot(GPA, unit, slot=SLOT, backing=b)
        vm.map(GVA, GPA, unit, PAGE_4K)
        x = Xen(s, struct, addressing, caps, XenVm(vm), XenVcpu(vm.vcpu), Guest(vm))
        # the Xen MSR makes every entry update the runstate (kvm_xen_msr_enabled); EVTCHN_SEND lets
        # KVM_XEN_HVM_EVTCHN_SEND write shared_info
        x.xvm.configure(xen.XEN_HYPERCALL_MSR, int(caps & XenConfig.EVTCHN_SEND))
        x.xvm.set_long_mode(True)
        if struct == "runstate" and caps & XenConfig.RUNSTATE_UPDATE_FLAG:
            x.xvm.set_runstate_update_flag(True)
        return x

    yield make
    try:
        for vm in vms:
            vm.close()
    finally:
        for s in made:
            for c in reversed(s.cleanup):
                c()


# ---- where KVM must write, and what must stay untouched ----------------------------------------------
@dataclass
class Expect:
    now: Callable[[], bytes] | None  # the struct's page where the address points now (None: nowhere)
    seed: Callable[[bytes], None] | None
    now_where: str
    keep: Callable[[], bytes] | None  # memory that must not change (the old page, or the GPA's page)
    keep_where: str
    guest_sees_now: bool  # the guest's GVA -> GPA reaches the page KVM writes


def _slot_delete(s: pfc.Setup) -> pfc.Target:
    """KVM_MR_DELETE of the slot, nothing at the GPA after it; the old backing is kept mapped."""
    old = s.backing
    if s.vm.memslots.get(SLOT) is not None:
        s.vm.delete_memslot(SLOT)
    return pfc.Target(old, 0, lambda: old.read(0, s.unit), f"old backing {old.kind} at {old.addr:#x}")


def _none(s: pfc.Setup) -> pfc.Target:
    return pfc.Target(s.backing, 0)


INVALIDATIONS: dict[str, Callable[[pfc.Setup], pfc.Target]] = {
    **pfc.INVALIDATIONS, "slot-delete": _slot_delete, "none": _none}


def _page(b: memory.Backing, off: int = 0) -> tuple[Callable[[], bytes], Callable[[bytes], None]]:
    return (lambda: b.read(off, PAGE_4K)), (lambda data: b.write(off, data))


def _invalidate(x: Xen, method: str) -> Expect:
    s = x.s
    t = INVALIDATIONS[method](s)
    slot_change = method.startswith("slot-")
    if x.addressing == "hva" and slot_change:
        # the cache holds the HVA: KVM keeps writing the memory mapped there (the backing the struct
        # was named in, which the harness keeps mapped), never the memory the GPA maps now
        named = x.named
        assert named is not None
        now, seed = _page(named)
        keep = None if method == "slot-delete" else (lambda: t.backing.read(0, s.unit))
        return Expect(now, seed, f"the HVA {named.addr:#x} (the first backing, {named.kind}, still mapped)", keep,
                      f"the memory GPA {GPA:#x} maps now ({t.backing.kind} at {t.backing.addr:#x}; to KVM's "
                      "HVA-addressed cache this page is unmapped)", False)
    if method == "slot-delete":
        return Expect(None, None, f"nothing (memslot {SLOT} deleted)", t.read_old, t.old_where, False)
    now, seed = _page(t.backing, t.offset)
    # a guest_memfd slot's guest view is the fd at its offset: an HVA remapped elsewhere is not it
    sees = not (x.addressing == "hva" and method == "remap" and t.backing.supports(Feature.GUEST_MEMFD))
    return Expect(now, seed, f"{t.backing.kind}+{t.offset:#x} (mapped at {t.backing.addr:#x})", t.read_old,
                  t.old_where, sees)


# ---- triggers and their oracles ----------------------------------------------------------------------
@dataclass
class Round:
    x: Xen
    exp: Expect
    trigger: str
    seed_v: int
    page: bytes  # as seeded
    span: list[tuple[int, int]]  # byte ranges KVM may write in the page
    probs: list[str] = field(default_factory=list)
    error: KvmError | None = None

    def now_page(self) -> bytes | None:
        return self.exp.now() if self.exp.now else None

    def outside_unchanged(self, now: bytes) -> None:
        keep = bytearray(now)
        want = bytearray(self.page)
        for a, b in self.span:
            keep[a:b] = bytes(b - a)
            want[a:b] = bytes(b - a)
        if keep != want:
            first = next(i for i in range(PAGE_4K) if keep[i] != want[i])
            self.probs.append(f"bytes outside the struct changed in the page mapped now (first at +{first:#x}: "
                              f"{want[first]:#04x} -> {keep[first]:#04x})")


def _clock_data(vm: GuestVm) -> tuple[int, int, int]:
    """KVM_GET_CLOCK bracketed by CLOCK_REALTIME: (realtime before, kvmclock, realtime after)."""
    c = ffi.new("struct kvm_clock_data *")
    rt0 = time.clock_gettime_ns(time.CLOCK_REALTIME)
    kvm_ioctl(vm.fd, "KVM_GET_CLOCK", c, "")
    rt1 = time.clock_gettime_ns(time.CLOCK_REALTIME)
    return rt0, c.clock, rt1


def _seed(x: Xen, exp: Expect, rnd: int, rng: random.Random) -> tuple[bytes, int]:
    """Random bytes with a marker struct (and, for shared_info, port EVTCHN_PORT masked, not pending)
    into the page the address maps now; returns the page and the marker version."""
    seed_v = SEED_BASE * (rnd + 1)
    page = bytearray(rng.randbytes(PAGE_4K))
    off = x.off
    if x.struct == "shared_info":
        Wallclock(seed_v, 0, 0, 0).pack_into(page)
        word, bit = divmod(EVTCHN_PORT, 64)
        pend = xen.SHINFO_EVTCHN_PENDING + 8 * word
        mask = xen.SHINFO_EVTCHN_MASK + 8 * word
        page[pend:pend + 8] = (int.from_bytes(page[pend:pend + 8], "little") & ~(1 << bit)).to_bytes(8, "little")
        page[mask:mask + 8] = (int.from_bytes(page[mask:mask + 8], "little") | (1 << bit)).to_bytes(8, "little")
    elif x.struct == "vcpu_info":
        t = off + xen.VCPU_INFO_TIME
        page[t:t + PVCLOCK_SIZE] = Pvclock(seed_v, 0, 0, 0, 0, 0).pack()
    else:
        page[off:off + xen.RUNSTATE_SIZE] = RS_MARK.pack()
    if exp.seed:
        exp.seed(bytes(page))
    return bytes(page), seed_v


def _shared_info_round(r: Round) -> None:
    x, vm = r.x, r.x.s.vm
    if r.trigger == "wallclock":
        r.span = [(a, b) for a, b in xen.wallclock_span()]
        vm.set_clock(vm.get_clock() + JUMP_NS)
        try:
            x.xvm.set_long_mode(True)
        except KvmError as e:
            r.error = e
        rt0, clk, rt1 = _clock_data(vm)
        if r.exp.now is None:
            if r.error is None or r.error.errno != errno.EFAULT:
                r.probs.append(f"re-setting LONG_MODE with shared_info's memslot deleted answered "
                               f"{r.error or 'success'}, expected EFAULT (kvm_gpc_refresh finds no memslot)")
            return
        if r.error is not None:
            r.probs.append(f"re-setting LONG_MODE (rewrites the wallclock) failed: {r.error}")
            return
        now = r.now_page()
        assert now is not None
        wc = Wallclock.parse(now)
        if wc.version & 1:
            r.probs.append(f"wallclock version {wc.version} is odd: an update was left half-written")
        if wc.version <= r.seed_v:
            r.probs.append(f"wallclock version {wc.version} is not above the {r.seed_v} seeded in the page mapped "
                           "now: no update reached it (stale gfn_to_pfn_cache?)")
        lo, hi = rt0 - clk, rt1 - clk
        if not lo - WALLCLOCK_SLACK_NS <= wc.epoch_ns <= hi + WALLCLOCK_SLACK_NS:
            r.probs.append(f"wallclock {wc.describe()} is not CLOCK_REALTIME - kvmclock after KVM_SET_CLOCK "
                           f"({lo / 1e9:.3f}..{hi / 1e9:.3f} s, slack {WALLCLOCK_SLACK_NS / 1e9:g} s)")
        if wc.nsec >= 10**9:
            r.probs.append(f"wallclock nsec {wc.nsec} is not below 10^9")
        r.outside_unchanged(now)
        if r.exp.guest_sees_now:
            g = x.guest.read(GVA + xen.SHINFO_WC)  # read as a pvclock: version, then nsec | sec_hi << 32
            if g[0] != wc.version or g[2] != (wc.sec_hi << 32 | wc.nsec):
                r.probs.append(f"the guest reads wallclock version {g[0]}, nsec|sec_hi {g[2]:#x} through its "
                               f"mapping; the page mapped now holds {wc.describe()}")
    else:  # evtchn
        word, bit = divmod(EVTCHN_PORT, 64)
        pend = xen.SHINFO_EVTCHN_PENDING + 8 * word
        r.span = [(pend, pend + 8)]
        try:
            x.xvm.evtchn_send(EVTCHN_PORT)
        except KvmError as e:
            r.error = e
        if r.exp.now is None:
            if r.error is None or r.error.errno != errno.EFAULT:
                r.probs.append(f"KVM_XEN_HVM_EVTCHN_SEND with shared_info's memslot deleted answered "
                               f"{r.error or 'success'}, expected EFAULT (kvm_gpc_refresh finds no memslot)")
            return
        if r.error is not None:
            r.probs.append(f"KVM_XEN_HVM_EVTCHN_SEND to masked port {EVTCHN_PORT} failed: {r.error}")
            return
        now = r.now_page()
        assert now is not None
        got = int.from_bytes(now[pend:pend + 8], "little")
        want = int.from_bytes(r.page[pend:pend + 8], "little") | (1 << bit)
        if got != want:
            r.probs.append(f"evtchn_pending word {word} is {got:#018x}, expected {want:#018x} (the seed with bit "
                           f"{bit} set: port {EVTCHN_PORT} raised, masked)")
        r.outside_unchanged(now)


def _vcpu_info_round(r: Round) -> None:
    x, vm = r.x, r.x.s.vm
    t = x.off + xen.VCPU_INFO_TIME
    r.span = [(t, t + PVCLOCK_SIZE)]
    lo = vm.get_clock() + JUMP_NS
    vm.set_clock(lo)
    args = x.guest.read(x.gva) if r.exp.guest_sees_now else None
    if args is None:
        x.guest.enter()
    hi = vm.get_clock()
    now = r.now_page()
    if now is None:
        return
    host = Pvclock.parse(now[t:])
    r.probs += pvclock_update(r.seed_v, host, clock_lo=lo, clock_hi=hi, slack_ns=PVCLOCK_SLACK_NS).problems
    r.outside_unchanged(now)
    if args is not None:
        g = Pvclock.from_sync(args)
        if not (r.seed_v < g.version <= host.version and not g.version & 1):
            r.probs.append(f"the guest reads {g.describe()} through its mapping, the page mapped now holds "
                           f"{host.describe()} (seeded {r.seed_v})")
        elif args[5] == 0:
            r.probs.append("the guest never read a consistent (even, stable) version")
        else:
            r.probs += guest_time(g, args[4], lo, hi, PVCLOCK_SLACK_NS).problems


def _runstate_round(r: Round) -> None:
    x, vm = r.x, r.x.s.vm
    off = x.off
    r.span = [(off, off + xen.RUNSTATE_SIZE)]
    args = None
    if r.trigger == "entry":
        if r.exp.guest_sees_now:
            args = x.guest.read(x.gva)
        else:
            x.guest.enter()
    else:
        x.xvcpu.set_runstate_current(RunstateState.BLOCKED)
    clk = vm.get_clock()
    kvm_rs = x.xvcpu.runstate_data()
    prev, x.prev_rs = x.prev_rs, kvm_rs
    # KVM's own account, whatever the memory: state, times adding up, advancing
    if r.trigger == "entry" and kvm_rs.state not in (RunstateState.RUNNING, RunstateState.RUNNABLE):
        r.probs.append(f"after KVM_RUN KVM holds {kvm_rs.describe()}: expected running (or runnable: preempted "
                       "on the way out)")
    if r.trigger == "blocked" and kvm_rs.state != RunstateState.BLOCKED:
        r.probs.append(f"after RUNSTATE_CURRENT = blocked KVM holds {kvm_rs.describe()}")
    if sum(kvm_rs.times) % (1 << 64) != kvm_rs.entry_time:
        r.probs.append(f"KVM's runstate times do not add up to state_entry_time: {kvm_rs.describe()}")
    if kvm_rs.entry_time > clk:
        r.probs.append(f"KVM's state_entry_time {kvm_rs.entry_time} is after KVM_GET_CLOCK {clk}")
    if prev is not None:
        if kvm_rs.entry_time <= prev.entry_time:
            r.probs.append(f"state_entry_time did not advance: {prev.entry_time} -> {kvm_rs.entry_time}")
        for i, (a, b) in enumerate(zip(prev.times, kvm_rs.times, strict=True)):
            if b < a:
                r.probs.append(f"time[{RunstateState(i).name.lower()}] went back: {a} -> {b}")
    now = r.now_page()
    if now is None:
        return
    page_rs = Runstate.parse(now[off:])
    if page_rs != kvm_rs:
        r.probs.append(f"the runstate area in the page mapped now holds {page_rs.describe()} "
                       f"(raw {now[off:off + 16].hex()}...), KVM holds {kvm_rs.describe()}"
                       + (" (the seeded marker: no write reached it)" if page_rs == RS_MARK else ""))
    r.outside_unchanged(now)
    if args is not None:
        # read as a pvclock: version = state, tsc_timestamp = state_entry_time, system_time = time[running]
        g_state, g_running, g_entry = args[0], args[1], args[2]
        if g_state != RunstateState.RUNNING:
            r.probs.append(f"the guest reads runstate state {g_state:#x} while it runs (expected RUNSTATE_running)")
        lo_entry = prev.entry_time if prev is not None else 0
        if not lo_entry < g_entry <= kvm_rs.entry_time or g_running > kvm_rs.times[0]:
            r.probs.append(f"the guest reads state_entry_time {g_entry}, time[running] {g_running} through its "
                           f"mapping; expected an entry after {lo_entry} and no later than what KVM holds after "
                           f"the exit ({kvm_rs.describe()})")


ROUNDS = {"shared_info": _shared_info_round, "vcpu_info": _vcpu_info_round, "runstate": _runstate_round}


def _triggers(x: Xen) -> list[str]:
    if x.struct == "shared_info":
        return ["wallclock"] + (["evtchn"] if x.caps & XenConfig.EVTCHN_SEND else [])
    if x.struct == "vcpu_info":
        return ["set_clock"]
    return ["entry", "blocked", "entry"]


def _round(x: Xen, method: str, trigger: str, rnd: int) -> None:
    s = x.s
    exp = _invalidate(x, method)
    keep_before = exp.keep() if exp.keep else None
    rng = random.Random(f"{s.kind}/{x.struct}/{x.addressing}/{method}/{trigger}/{rnd}")
    page, seed_v = _seed(x, exp, rnd, rng)
    r = Round(x, exp, trigger, seed_v, page, [])
    ROUNDS[x.struct](r)
    if exp.keep is not None and keep_before is not None:
        r.probs += untouched_page(keep_before, exp.keep(), base=GPA, what=exp.keep_where).problems
    x.rounds.append(f"{method}/{trigger}")
    where = (f"{x.struct} by {x.addressing.upper()} at {GPA + x.off:#x} on {s.kind}, invalidation {method}, "
             f"trigger {trigger}, round {rnd}; KVM must write {exp.now_where}")
    assert not r.probs, f"{where}:\n  " + "\n  ".join(r.probs)


def _first_write(x: Xen) -> None:
    """Zero the page, name the struct to KVM and enter once: KVM's first write must be there."""
    b, off = x.s.backing, x.off
    b.write(0, bytes(PAGE_4K))
    x.name()  # shared_info and runstate: written now; vcpu_info: at the next entry
    x.guest.enter()
    page = b.read(0, PAGE_4K)
    if x.struct == "shared_info":
        wc = Wallclock.parse(page)
        ok, got = wc.version and not wc.version & 1, wc.describe()
    elif x.struct == "vcpu_info":
        pv = Pvclock.parse(page[off + xen.VCPU_INFO_TIME:])
        ok, got = pv.version and not pv.version & 1 and pv.mul, pv.describe()
    else:
        x.prev_rs = x.xvcpu.runstate_data()
        rs = Runstate.parse(page[off:])
        ok, got = rs == x.prev_rs, f"{rs.describe()} (KVM holds {x.prev_rs.describe()})"
    assert ok, f"{x.struct} by {x.addressing.upper()}: KVM's first write is not in the page: {got}"


# ---- the cases ---------------------------------------------------------------------------------------
METHODS = ("punch", "remap", "slot-move", "slot-readd", "slot-delete")


def _skip_reason(kind: str, method: str, addressing: str) -> str | None:
    if method == "remap" and addressing == "hva":
        return None  # remapping the HVA is an invalidation of an HVA cache, guest_memfd or not
    if method == "slot-delete":
        return None
    return pfc._skip_reason(kind, method)


def _params() -> list:
    out = []
    for struct in STRUCTS:
        for addressing in ("gpa", "hva"):
            if struct == "runstate" and addressing == "hva":
                continue  # no KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_HVA upstream: the runstate area is by GPA only
            for kind in KINDS:
                for method in METHODS:
                    why = _skip_reason(kind, method, addressing)
                    marks = [pytest.mark.skip(reason=why)] if why else []
                    out.append(pytest.param(struct, addressing, kind, method,
                                            id=f"{struct}-{addressing}-{kind}-{method}", marks=marks))
    return out


@pytest.mark.parametrize(("struct", "addressing", "kind", "method"), _params())
@pytest.mark.kvm_timeout(60)
def test_xen_struct_after_invalidation(xen_setup, kernel_health, case_property, struct, addressing, kind,
                                       method):
    """Name the struct to KVM, check KVM's first write, then per trigger: invalidate, seed the page
    mapped now, make KVM write, check the page mapped now, the old page and the guest's view."""
    x = xen_setup(kind, struct, addressing)
    s = x.s
    _first_write(x)
    triggers = _triggers(x)
    for rnd, trigger in enumerate(triggers):
        _round(x, method, trigger, rnd)
    if method == "slot-delete":
        # the same memory back at the GPA: the next write lands there
        old = s.backing
        s.vm.add_memslot(GPA, s.unit, slot=SLOT, backing=old)
        _round(x, "none", triggers[0], len(triggers))
    x.guest.done()
    case_property("rounds", ",".join(x.rounds))
    kernel_health.assert_healthy(f"{struct}/{addressing}/{kind}/{method}")


@pytest.mark.parametrize("struct", STRUCTS)
@pytest.mark.kvm_timeout(60)
def test_xen_struct_after_conversion(xen_setup, kernel_health, struct):
    """The conversion invalidation (seed 003): in a SW-protected VM, the struct's page (named by GPA)
    is converted to private after KVM's first write. The guest now reads the guest_memfd page there;
    the shared page (userspace_addr) is no longer the guest's, so KVM's next write (shared_info:
    LONG_MODE set again; vcpu_info: KVM_SET_CLOCK + entry; runstate: entry) must not land in it."""
    x = xen_setup("private", struct, "gpa")
    _first_write(x)
    vm, mem = x.s.vm, x.s.backing
    vm.set_private(GPA, x.s.unit)
    before = mem.read(0, PAGE_4K)
    err = None
    if struct == "shared_info":
        try:
            x.xvm.set_long_mode(True)
        except KvmError as e:  # refusing to write is fine; writing the shared page is not
            err = e
    elif struct == "vcpu_info":
        vm.set_clock(vm.get_clock() + JUMP_NS)
    x.guest.enter()
    v = untouched_page(before, mem.read(0, PAGE_4K), base=GPA,
                       what=f"shared page of the {struct} gfn (converted to private: no longer the guest's)")
    assert v.ok, "\n".join(v.problems) + (f"\n(re-setting LONG_MODE answered {err})" if err else "")
    x.guest.done()
    kernel_health.assert_healthy(f"{struct} after conversion to private")


def test_xen_attributes_read_back(xen_setup):
    """The typed API against the kernel: each address set reads back through GET_ATTR, and
    KVM_XEN_INVALID_GFN / _GPA (or HVA 0) deactivate."""
    x = xen_setup("anon", "shared_info", "gpa")
    xv, xc, b = x.xvm, x.xvcpu, x.s.backing
    assert xv.long_mode() is True
    xv.set_shared_info_gfn(GPA >> 12)
    assert xv.shared_info_gfn() == GPA >> 12
    xc.set_vcpu_info_gpa(GPA + 0x40)
    assert xc.vcpu_info_gpa() == GPA + 0x40
    if x.caps & XenConfig.RUNSTATE:
        xc.set_runstate_addr(GPA + 0x80)
        assert xc.runstate_addr() == GPA + 0x80
        xc.set_runstate_current(RunstateState.OFFLINE)
        assert xc.runstate_current() == RunstateState.OFFLINE
        xc.set_runstate_addr(None)
        assert xc.runstate_addr() is None
    if x.caps & XenConfig.SHARED_INFO_HVA:
        xv.set_shared_info_hva(b.addr)
        assert (xv.shared_info_hva(), xv.shared_info_gfn()) == (b.addr, None)
        xc.set_vcpu_info_hva(b.addr + 0x40)
        assert (xc.vcpu_info_hva(), xc.vcpu_info_gpa()) == (b.addr + 0x40, None)
        xv.set_shared_info_hva(0)
        assert xv.shared_info_hva() == 0
    xv.set_shared_info_gfn(None)
    xc.set_vcpu_info_gpa(None)
    assert (xv.shared_info_gfn(), xc.vcpu_info_gpa()) == (None, None)
