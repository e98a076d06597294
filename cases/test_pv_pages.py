"""Steal time, PV EOI, async-PF data and the vAPIC word: more guest pages KVM writes, on invalidated
backings (issue 15, item 4).

Beside kvmclock (cases/test_pfncache.py), KVM writes four more areas of guest memory that the guest
names (harness/x86/pvmsr.py has the layouts and what makes KVM write what):

  steal_time  MSR_KVM_STEAL_TIME: struct kvm_steal_time, written by record_steal_time() on the entry
              after every vcpu_load (each KVM_RUN) and after each write of the MSR; preempted is set by
              kvm_steal_time_set_preempted() when the task is preempted in KVM_RUN.
  pv_eoi      MSR_KVM_PV_EOI_EN: one byte, written 1 when KVM injects an interrupt the guest may EOI by
              clearing it, read back and written 0 on the next exit. Needs an in-kernel LAPIC
              (KVM_CREATE_IRQCHIP) and an interrupt: the guest self-IPIs through its x2APIC.
  async_pf    MSR_KVM_ASYNC_PF_EN: the 'page ready' token at +4. Enabling it queues a broadcast wakeup
              that KVM delivers (token 0xffffffff, then the MSR_KVM_ASYNC_PF_INT vector) once the
              token slot reads free; a write of MSR_KVM_ASYNC_PF_ACK makes it look. The 'page not
              present' flags at +0 need a real asynchronous fault (a host page that must be waited for,
              e.g. userfaultfd): not exercised here.
  vapic       KVM_SET_VAPIC_ADDR (KVM_CAP_VAPIC, in-kernel LAPIC): the u32 TPR | ISR class << 8 |
              IRR << 24, written on each entry that processed KVM_REQ_EVENT (an injection, or
              KVM_SET_REGS), its TPR byte read back on every exit. This is the in-kernel APIC's page in
              guest memory; the VMX APIC-access page / AVIC backing is KVM-private memory userspace
              cannot name or observe (test_apic_access_page says why it skips).

None of these is a gfn_to_pfn_cache: all four are gfn_to_hva_caches (kvm_gfn_to_hva_cache_init,
kvm_{read,write}_guest_offset_cached; record_steal_time checks the memslot generation itself). They
keep the slot's host virtual address and compare the memslot generation on each use, so a punched or
remapped page is reached through the process's page tables as they are now, and a memslot change
(slot re-add, slot move) must make KVM resolve the GPA again. Each case makes KVM set its cache up
before the invalidation (the MSR write, KVM_SET_VAPIC_ADDR; async PF: the enable, with the token slot
held busy so the wakeup stays queued) and makes KVM write only after it, so the write goes through
the generation check.

A case (test_pv_area_after_invalidation[area-kind-method]) runs a baseline round on the page as it is,
then rounds of one invalidation of cases/test_pfncache.py (punch hole, MAP_FIXED remap keeping the old
memory, memslot delete + re-add on new memory, memslot move + a new slot at the GPA), imported, not
copied. Before each invalidation the host writes the round's seeded page into the current page (so the
old page holds a marker any KVM write changes), then seeds the page mapped now, makes KVM write, and
judges (harness/oracles/pvpages.py):
  - the page mapped now holds what only KVM writes (steal time: even version above the seed, steal
    grown by at most the vCPU task's run_delay, preempted cleared, flags untouched; PV EOI: the byte
    0x02 -> 0; async PF: token 0 -> 0xffffffff, flags untouched; vAPIC: 0xa5a5a500 -> the ISR/IRR
    summary), and no byte outside the fields KVM writes changed;
  - the guest reads the same through its mapping (steal time read with the version protocol; the
    interrupt handler's read of the PV EOI byte, the token, the vAPIC word; one interrupt of the
    right vector, none left in service);
  - the old page, kept mapped by the harness, is byte-for-byte untouched;
  - no kernel splat (kernel_health).
test_steal_time_race lets a host thread punch, swap (fresh memory keeping every old unit) or bump the
memslot generation (add/delete an unrelated slot) over and over while the guest rewrites
MSR_KVM_STEAL_TIME in a loop and exits to the host each time (every KVM_RUN's vcpu_load asks for an
update; upstream the MSR write does too, kvm_pvm's does not); kept old units must stay untouched, the
guest must never see a half-written struct after its own update, and a clean round after the race
must pass the oracle above.

Every vCPU gets KVM_GET_SUPPORTED_CPUID as its CPUID (GuestVm does this); an area whose feature bit
(leaf 0x40000001: KVM_FEATURE_STEAL_TIME / PV_EOI / ASYNC_PF + ASYNC_PF_INT) or capability
(KVM_CAP_IRQCHIP, KVM_CAP_VAPIC, x2APIC in CPUID) is missing skips with that reason.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import test_pfncache as pfc  # the kvmclock cases' invalidations (cases/ is on sys.path for pytest)

from harness import backends, memory
from harness.kvm._cffi import ffi
from harness.kvm.caps import Cap
from harness.kvm.exits import Io
from harness.kvm.ioctl import kvm_ioctl, raw_ioctl
from harness.kvm.system import Kvm
from harness.lib.guestvm import GuestVm
from harness.lib.ucall import DONE, SYNC
from harness.memory import PAGE_4K, Feature, hostmem
from harness.oracles.pvpages import (
    apf_wakeup_round,
    combine,
    interrupt_taken,
    only_spans_changed,
    pv_eoi_round,
    steal_time_guest,
    steal_time_update,
    untouched,
    vapic_round,
)
from harness.oracles.verdict import Verdict
from harness.pytest import options
from harness.unsupported import Unsupported
from harness.x86 import pvmsr
from harness.x86.pvmsr import ApfData, StealTime

SLOT, GPA, GVA = pfc.SLOT, pfc.GPA, pfc.GVA
KINDS = ("anon", "shmem", "guest_memfd")
AREAS = ("steal_time", "pv_eoi", "async_pf", "vapic")
OFF = {"steal_time": 0x40, "pv_eoi": 0x84, "async_pf": 0xC0, "vapic": 0x104}  # inside the slot's first page
ROUNDS = 2  # invalidation rounds per case, after the baseline round
PV_VEC = 0xEC  # the self-IPI
APF_VEC = 0xED  # MSR_KVM_ASYNC_PF_INT
SEED_BASE = 1000
PV_EOI_SEED = 0x02  # KVM writes the PV EOI byte whole, 0 or 1
APF_BUSY = 0x5A5A5A5A  # a token that holds the slot: KVM keeps 'page ready' queued
VAPIC_SEED = 0xA5A5A500  # TPR byte 0 (KVM reads it back as the TPR), the rest overwritten by KVM
RACE_SLOT, RACE_GPA = 100, 1 << 42  # test_steal_time_race's unrelated slot (generation churn)
KICK_PORT = 0x1001  # the churn's exit to the host each iteration (guests/payloads/pvpages.c)

# KVM_SET_VAPIC_ADDR = _IOW(KVMIO, 0x93, struct kvm_vapic_addr { __u64 vapic_addr; }): not in the binding
KVM_SET_VAPIC_ADDR = (1 << 30) | (8 << 16) | (0xAE << 8) | 0x93
X2APIC_ECX_BIT = 1 << 21  # CPUID.1:ECX


# ---- what this KVM offers ---------------------------------------------------------------------------
NEED = {
    "steal_time": pvmsr.KVM_FEATURE_STEAL_TIME,
    "pv_eoi": pvmsr.KVM_FEATURE_PV_EOI,
    "async_pf": pvmsr.KVM_FEATURE_ASYNC_PF | pvmsr.KVM_FEATURE_ASYNC_PF_INT,
    "vapic": 0,
}


def _apicv_reason() -> str | None:
    """PV EOI is inert with APICv/AVIC: KVM keeps no highest-ISR cache then and never sets the byte."""
    for mod, param in (("kvm_intel", "enable_apicv"), ("kvm_amd", "avic")):
        v = backends.module_param(mod, param)
        if v is not None and v.upper() in ("Y", "1"):
            return (f"{mod}.{param} = {v}: with APIC virtualization KVM injects through the hardware and keeps no "
                    "in-service cache, so it never writes the PV EOI byte (apic_sync_pv_eoi_to_guest)")
    return None


def area_reason(kvm: Kvm, area: str) -> str | None:
    """Why `area` cannot be exercised on this KVM, or None."""
    why = pvmsr.missing_features(pvmsr.pv_features(kvm.supported_cpuid), NEED[area])
    if why:
        return why
    if area == "steal_time":
        return None
    if kvm.check_extension(Cap.IRQCHIP) < 1:
        return "KVM_CAP_IRQCHIP is 0: no in-kernel LAPIC, which PV EOI, async PF and the vAPIC need"
    leaf1 = kvm.supported_cpuid.get(1)
    if leaf1 is None or not leaf1.ecx & X2APIC_ECX_BIT:
        return "KVM_GET_SUPPORTED_CPUID has no x2APIC (CPUID.1:ECX bit 21): the guest self-IPIs through it"
    if area == "pv_eoi":
        return _apicv_reason()
    if area == "vapic" and kvm.check_extension(pvmsr.KVM_CAP_VAPIC) < 1:
        return ("KVM_CAP_VAPIC is 0: this KVM accelerates the TPR itself (cpu_has_accelerated_tpr) and tells "
                "userspace not to set a vAPIC address")
    return None


def _run_delay() -> int:
    """The calling thread's run_delay (ns spent runnable, waiting for a CPU): what steal time adds up."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1])


# ---- the guest ---------------------------------------------------------------------------------------
class Pv:
    """A GuestVm running guests/payloads/pvpages.c with its descriptor in scratch memory."""

    WORDS = 10  # struct pv_desc: cmd, a, b, gva, vector, mode, stop, done, count, seq

    def __init__(self, vm: GuestVm) -> None:
        self.vm = vm
        self.desc = vm.alloc(8 * self.WORDS, 64)
        vm.vcpu.set_args(self.desc)
        self.rd_cmd_start = _run_delay()  # run_delay at the start of the last command
        self.rd_prev_cmd_start = self.rd_cmd_start

    def cmd(self, cmd: int, a: int = 0, b: int = 0, gva: int = 0, vector: int = 0, mode: int = 0,
            timeout: float | None = None) -> tuple[int, ...]:
        vals = (cmd, a, b, gva, vector, mode, 0, 0, 0, 0)
        self.vm.write(self.desc, b"".join(v.to_bytes(8, "little") for v in vals))
        self.rd_prev_cmd_start, self.rd_cmd_start = self.rd_cmd_start, _run_delay()
        uc = self.vm.vcpu.run_until_ucall(timeout)
        assert uc.cmd == SYNC, f"pvpages answered {uc!r} to cmd {cmd}"
        return uc.args

    def wrmsr(self, msr: int, value: int) -> bool:
        """The guest writes the MSR; True when KVM took it (False: #GP)."""
        _, gp, _ = self.cmd(1, msr, value)
        return not gp

    def enable(self, msr: int, value: int, what: str) -> None:
        assert self.wrmsr(msr, value), f"KVM refused {what} (#GP on wrmsr({msr:#x}, {value:#x}))"

    def stop(self) -> None:
        self.vm.write_u64(self.desc + 48, 1)

    def done(self) -> None:
        self.vm.write(self.desc, bytes(8 * self.WORDS))
        assert self.vm.vcpu.run_until_ucall().cmd == DONE


def set_vapic_addr(vm: GuestVm, gpa: int) -> None:
    p = ffi.new("uint64_t *", gpa)
    raw_ioctl(vm.vcpu.fd, KVM_SET_VAPIC_ADDR, p, "KVM_SET_VAPIC_ADDR")


# ---- one case's set-up -----------------------------------------------------------------------------
@dataclass
class PvSetup:
    s: pfc.Setup
    area: str
    pv: Pv
    facts: dict[str, Any] = field(default_factory=dict)  # recorded as the case's properties

    @property
    def off(self) -> int:
        return OFF[self.area]

    @property
    def gpa(self) -> int:
        return GPA + self.off

    @property
    def gva(self) -> int:
        return GVA + self.off


@pytest.fixture
def pv_setup(kvm, backings) -> Iterator[Callable[[str, str], PvSetup]]:
    made: list[pfc.Setup] = []
    vms: list[GuestVm] = []

    def make(kind: str, area: str) -> PvSetup:
        why = area_reason(kvm, area)
        if why:
            raise Unsupported(why)
        irqchip = area != "steal_time"
        vm = GuestVm(kvm, "pvpages", "long64", nr_vcpus=0 if irqchip else 1)
        vms.append(vm)  # closed even if making its backing skips the case
        if irqchip:
            kvm_ioctl(vm.fd, "KVM_CREATE_IRQCHIP", 0)  # before the vCPU: its LAPIC is in the kernel
            vm.add_vcpu()  # CPUID = KVM_GET_SUPPORTED_CPUID
        unit = pfc._unit(kind)

        def new_backing() -> memory.Backing:
            return backings(kind, 2 * unit, vm=vm)  # a spare unit for remap of fd kinds

        b = new_backing()
        b.write(0, bytes(8))
        s = pfc.Setup(vm, kind, unit, new_backing, b)
        made.append(s)
        vm.add_memslot(GPA, unit, slot=SLOT, backing=b)
        vm.map(GVA, GPA, unit, PAGE_4K)
        px = PvSetup(s, area, Pv(vm))
        _enable(px)
        return px

    yield make
    try:
        for vm in vms:
            vm.close()  # before the host memory the slots point at goes
    finally:
        for s in made:
            for c in reversed(s.cleanup):
                c()


def _enable(px: PvSetup) -> None:
    """Name the area to KVM once (async PF: its vector; the enable itself comes every round)."""
    pv = px.pv
    if px.area == "steal_time":
        pv.enable(pvmsr.MSR_KVM_STEAL_TIME, pvmsr.steal_time_value(px.gpa), "MSR_KVM_STEAL_TIME")
        px.facts["msr_write_updated"] = StealTime.parse(px.s.vm.read(px.gpa, 64)).version != 0
        # one more KVM_RUN: its vcpu_load makes KVM record once, so a round's update adds only the run_delay
        # since the previous command (the first record after the enable adds the task's whole run_delay;
        # whether the MSR write itself asks for a record differs: kvm_pvm does not)
        pv.cmd(2, gva=px.gva)
        return
    _, gp, base, svr = pv.cmd(4)
    assert not gp and base & (3 << 10) == 3 << 10 and svr & 0x100, (
        f"the guest could not switch its in-kernel LAPIC to x2APIC: #GP {gp}, IA32_APIC_BASE {base:#x}, SVR {svr:#x}")
    if px.area == "pv_eoi":
        pv.enable(pvmsr.MSR_KVM_PV_EOI_EN, pvmsr.pv_eoi_value(px.gpa), "MSR_KVM_PV_EOI_EN")
    elif px.area == "async_pf":
        pv.enable(pvmsr.MSR_KVM_ASYNC_PF_INT, pvmsr.async_pf_int_value(APF_VEC), "MSR_KVM_ASYNC_PF_INT")
    else:
        px.s.vm.write(px.gpa, VAPIC_SEED.to_bytes(4, "little"))
        set_vapic_addr(px.s.vm, px.gpa)


# ---- one round ----------------------------------------------------------------------------------------
def _seed_page(px: PvSetup, rnd: int, rng: random.Random) -> tuple[bytearray, Any]:
    """A random page with the area's marker struct at its offset; returns it and the marker."""
    page = bytearray(rng.randbytes(PAGE_4K))
    off = px.off
    marker: Any
    if px.area == "steal_time":
        marker = StealTime(steal=rng.getrandbits(40) << 8, version=SEED_BASE * (rnd + 1),
                           flags=rng.getrandbits(32), preempted=0x80)
        marker.pack_into(page, off)
    elif px.area == "pv_eoi":
        marker = PV_EOI_SEED
        page[off] = PV_EOI_SEED
    elif px.area == "async_pf":
        marker = ApfData(0, 0)
        page[off:off + 8] = bytes(8)
    else:
        marker = VAPIC_SEED
        page[off:off + 4] = VAPIC_SEED.to_bytes(4, "little")
    return page, marker


def _spans(px: PvSetup) -> list[tuple[int, int]]:
    """The bytes KVM may write in this area: (offset in the page, size)."""
    off = px.off
    if px.area == "steal_time":
        return [(off + o, n) for o, n in pvmsr.ST_WRITTEN]
    if px.area == "pv_eoi":
        return [(off, 1)]
    if px.area == "async_pf":
        return [(off + pvmsr.APF_TOKEN, 4)]
    return [(off, pvmsr.VAPIC_SIZE)]


def _decode(px: PvSetup) -> Callable[[bytes], str]:
    if px.area == "steal_time":
        return lambda raw: StealTime.parse(raw).describe()
    if px.area == "async_pf":
        return lambda raw: ApfData.parse(raw).describe()
    return lambda raw: f"{int.from_bytes(raw[:4], 'little'):#010x}"


INVALIDATIONS: dict[str, Callable[[pfc.Setup], pfc.Target]] = {
    "none": lambda s: pfc.Target(s.backing, 0), **pfc.INVALIDATIONS}


def one_round(px: PvSetup, method: str, rnd: int, *, seed: object = "") -> dict[str, Any]:
    """Prepare, invalidate by `method`, seed the page mapped now, make KVM write, judge both pages
    and the guest's view; raises OracleFailure with every problem, else returns the oracles' facts."""
    s, pv, off = px.s, px.pv, px.off
    rng = random.Random(f"{s.kind}/{px.area}/{method}/{rnd}/{seed}")
    page, marker = _seed_page(px, rnd, rng)
    # the current page gets this round's seed: after the invalidation the old page holds markers any KVM
    # write would change (a stale write of the value KVM wrote last round would otherwise go unseen)
    cur = pfc.Target(s.backing, 0)
    cur.write_now(bytes(page))
    if px.area == "async_pf":
        # hold the token slot busy, then enable: KVM (re)initializes its cache on the current slot and
        # queues the broadcast wakeup, which cannot be delivered while the slot reads busy
        busy = bytearray(page)
        busy[off + pvmsr.APF_TOKEN:off + pvmsr.APF_TOKEN + 4] = APF_BUSY.to_bytes(4, "little")
        cur.write_now(bytes(busy))
        pv.enable(pvmsr.MSR_KVM_ASYNC_PF_EN, pvmsr.async_pf_value(px.gpa), "MSR_KVM_ASYNC_PF_EN")
        held = ApfData.parse(cur.read_now(PAGE_4K)[off:])
        assert held.token == APF_BUSY, (
            f"the async-PF token {held.token:#x} changed while the slot was busy ({APF_BUSY:#x}): KVM delivered "
            "'page ready' into a slot the guest had not freed")
    t = INVALIDATIONS[method](s)
    old_before = t.read_old() if t.read_old else None
    t.write_now(bytes(page))

    where = (f"{px.area} at GPA {px.gpa:#x} (GVA {px.gva:#x}), backing {s.kind}, invalidation {method}, "
             f"round {rnd}, page now {t.backing.kind}+{t.offset:#x}")
    vs: list[Verdict] = []
    if px.area == "steal_time":
        assert isinstance(marker, StealTime)
        args = pv.cmd(2, gva=px.gva)  # KVM_RUN: vcpu_load asks for an update, written at entry
        now_page = t.read_now(PAGE_4K)
        host = StealTime.parse(now_page[off:])
        guest = StealTime.from_sync(args)
        bound = _run_delay() - pv.rd_prev_cmd_start  # the update adds run_delay since the previous one
        vs.append(steal_time_update(marker, host, max_steal_delta=bound))
        vs.append(steal_time_guest(guest, host, marker))
        if args[4] == 0:
            vs.append(Verdict.of("steal time as the guest reads it", [
                f"no consistent read in 1000 tries (last: {guest.describe()})"]))
    else:
        if px.area == "vapic" and rnd % 2:
            # KVM_SET_REGS makes KVM_REQ_EVENT: the next entry rewrites the word (nothing pending: 0)
            r = s.vm.vcpu.get_regs()
            s.vm.vcpu.set_regs(r)
            seen, _ = pv.cmd(6, gva=px.gva)
            now_page = t.read_now(PAGE_4K)
            host_w = int.from_bytes(now_page[off:off + 4], "little")
            vs.append(vapic_round(marker, [pvmsr.vapic_word(0, -1, -1)], seen & 0xFFFFFFFF, host_w))
        else:
            trigger = 1 if px.area == "async_pf" else 0  # ACK: KVM looks at its queue; else a self-IPI
            vector = APF_VEC if px.area == "async_pf" else PV_VEC
            mode = rnd % 2 if px.area == "pv_eoi" else 0  # PV EOI: alternate the guest's clear and an EOI write
            taken, seen, after, isr, irr, vec = pv.cmd(5, trigger, 0, px.gva, vector, mode)
            now_page = t.read_now(PAGE_4K)
            vs.append(interrupt_taken(taken, vec, vector, isr, irr, f"{px.area} round"))
            if px.area == "pv_eoi":
                vs.append(pv_eoi_round(marker, seen & 0xFF, now_page[off], after & 0xFF))
            elif px.area == "async_pf":
                vs.append(apf_wakeup_round(marker, ApfData.parse(now_page[off:]), seen >> 32))
            else:
                want = [pvmsr.vapic_word(0, PV_VEC, -1), pvmsr.vapic_word(0, -1, -1)]
                host_w = int.from_bytes(now_page[off:off + 4], "little")
                vs.append(vapic_round(marker, want, seen & 0xFFFFFFFF, host_w))
    vs.append(only_spans_changed(bytes(page), now_page, _spans(px)))
    if t.read_old is not None:
        assert old_before is not None
        vs.append(untouched(old_before, t.read_old(), base=GPA, what=f"old page ({t.old_where})",
                            decode=_decode(px), struct_off=off))
    total = combine(vs)
    total.check(where)
    return dict(total.facts)


def _params() -> list:
    out = []
    for area in AREAS:
        for kind in KINDS:
            for method in pfc.INVALIDATIONS:
                why = pfc._skip_reason(kind, method)
                marks = [pytest.mark.skip(reason=why)] if why else []
                out.append(pytest.param(area, kind, method, id=f"{area}-{kind}-{method}", marks=marks))
    return out


@pytest.mark.parametrize(("area", "kind", "method"), _params())
@pytest.mark.kvm_timeout(60)
def test_pv_area_after_invalidation(pv_setup, kernel_health, case_property, area, kind, method):
    """A baseline round, then ROUNDS rounds of: invalidate the area's page, seed the page mapped now,
    make KVM write the area; the write must be in the page mapped now (and read so by the guest), the
    old page untouched."""
    px = pv_setup(kind, area)
    case_property("round_0", one_round(px, "none", 0))
    for rnd in range(1, ROUNDS + 1):
        case_property(f"round_{rnd}", one_round(px, method, rnd))
    for k, v in px.facts.items():
        case_property(k, v)
    px.pv.done()
    kernel_health.assert_healthy(f"{area}/{kind}/{method}")


# ---- the enable rules against KVM ------------------------------------------------------------------------
@pytest.mark.kvm_timeout(30)
def test_pv_msr_reserved_bits_refused(kvm, pv_setup):
    """KVM refuses (#GP) what harness.x86.pvmsr refuses: steal time bits 5:1, PV EOI bit 1, async PF
    bits 5:4, an async-PF vector above bits 7:0; and takes the aligned forms."""
    why = {a: area_reason(kvm, a) for a in ("steal_time", "pv_eoi", "async_pf")}
    if all(why.values()):
        pytest.skip("; ".join(f"{a}: {w}" for a, w in why.items()))
    for area, reason in why.items():
        if reason:
            continue
        px = pv_setup("anon", area)
        pv, gpa = px.pv, px.gpa
        bad: list[tuple[int, int, str]] = []
        if area == "steal_time":
            with pytest.raises(ValueError):
                pvmsr.steal_time_value(gpa + 8)
            bad += [(pvmsr.MSR_KVM_STEAL_TIME, gpa | 1 | bit, f"bit {bit.bit_length() - 1}")
                    for bit in (1 << 1, 1 << 3, 1 << 5)]
            good = [(pvmsr.MSR_KVM_STEAL_TIME, pvmsr.steal_time_value(gpa))]
        elif area == "pv_eoi":
            with pytest.raises(ValueError):
                pvmsr.pv_eoi_value(gpa + 2)
            bad.append((pvmsr.MSR_KVM_PV_EOI_EN, gpa | 1 | pvmsr.PV_EOI_RESERVED, "bit 1"))
            good = [(pvmsr.MSR_KVM_PV_EOI_EN, pvmsr.pv_eoi_value(gpa))]
        else:
            with pytest.raises(ValueError):
                pvmsr.async_pf_value(gpa + 0x20)
            bad += [(pvmsr.MSR_KVM_ASYNC_PF_EN, pvmsr.async_pf_value(gpa) | bit, f"bit {bit.bit_length() - 1}")
                    for bit in (1 << 4, 1 << 5)]
            bad.append((pvmsr.MSR_KVM_ASYNC_PF_INT, 0x100 | APF_VEC, "bit 8"))
            good = [(pvmsr.MSR_KVM_ASYNC_PF_INT, APF_VEC)]
        refused = [f"{msr:#x} = {val:#x} ({what})" for msr, val, what in bad if pv.wrmsr(msr, val)]
        assert not refused, f"{area}: KVM took reserved bits: {refused}"
        for msr, val in good:
            pv.enable(msr, val, f"{msr:#x} = {val:#x}")
        pv.done()


def test_apic_access_page(kvm):
    """The other 'in-kernel APIC page': the VMX APIC-access page (and AVIC's) is KVM-private memory."""
    mod = backends.name()
    offered = {"kvm_intel": ("flexpriority", "enable_apicv"), "kvm_amd": ("avic",)}.get(mod, ())
    on = [p for p in offered if (backends.module_param(mod, p) or "").upper() in ("Y", "1")]
    where = f"{mod} with {', '.join(f'{p}=Y' for p in on)}" if on else f"{mod} (no APIC virtualization offered)"
    pytest.skip(
        f"{where}: the APIC-access page exists only with VMX virtualize-APIC-accesses or AVIC, in a KVM-private "
        "memslot (APIC_ACCESS_PAGE_PRIVATE_MEMSLOT) at 0xfee00000 that userspace can neither name nor move, and "
        "KVM never writes guest-visible data into it (the CPU redirects the accesses to the vAPIC page, a kernel "
        "page read only through KVM_GET_LAPIC): there is no write to judge with the two-page oracle. The in-kernel "
        "APIC's page in guest memory is the vAPIC word (KVM_SET_VAPIC_ADDR), covered by the 'vapic' cases")


# ---- race -------------------------------------------------------------------------------------------------
def _race_params() -> list:
    out = []
    for kind in KINDS:
        methods = ("punch", "generation") if kind == "guest_memfd" else ("punch", "swap", "generation")
        out += [pytest.param(kind, m, id=f"{kind}-{m}") for m in methods]
    return out


class _GenerationChurn:
    """Add and delete an unrelated memslot: each ioctl bumps the memslot generation, so every use of a
    gfn_to_hva_cache after it must resolve its GPA again (to the same memory)."""

    def __init__(self, s: pfc.Setup) -> None:
        self.vm = s.vm
        self.mem = hostmem.Mapping(PAGE_4K)
        s.cleanup.append(self.mem.close)
        self.region = ffi.new("struct kvm_userspace_memory_region *")
        self.region.slot = RACE_SLOT
        self.region.guest_phys_addr = RACE_GPA
        self.region.userspace_addr = self.mem.addr

    def step(self) -> None:
        # the raw ioctl: Vm's slot table is read by the vCPU thread's ucall reads meanwhile
        for size in (PAGE_4K, 0):
            self.region.memory_size = size
            kvm_ioctl(self.vm.fd, "KVM_SET_USER_MEMORY_REGION", self.region, f"slot {RACE_SLOT} size {size:#x}")


def _kick(vcpu: Any, ex: Any) -> bool:
    """The churn's outb to KICK_PORT: enter again (a new KVM_RUN, so a new vcpu_load and update)."""
    return type(ex) is Io and ex.port == KICK_PORT


@pytest.mark.parametrize(("kind", "method"), _race_params())
@pytest.mark.kvm_timeout(60)
def test_steal_time_race(pv_setup, kernel_health, request, case_property, kind, method):
    """A host thread punches / swaps / bumps the memslot generation over and over while the guest
    rewrites MSR_KVM_STEAL_TIME and exits to the host in a loop (each new KVM_RUN, and upstream each
    MSR write, one record_steal_time through the hva cache).
    Kept old units untouched, no half-written struct after the guest's own update, and a clean
    round after the race."""
    seed = options.seed(request.config)
    seconds = options.race_seconds(request.config, 0.8)
    early = options.race_until_goal(request.config)
    px = pv_setup(kind, "steal_time")
    s, pv = px.s, px.pv
    if memory.kind(kind).supports(Feature.HUGETLB):
        extra = pfc.Swapper.POOL if method == "swap" else 2
        request.getfixturevalue("hugepages").reserve(memory.kind(kind).page_size, extra)
    one_round(px, "none", 0)
    swapper = pfc.Swapper(s) if method == "swap" else None
    churn = _GenerationChurn(s) if method == "generation" else None
    rng = random.Random(seed)
    stop = threading.Event()
    err: list[BaseException] = []
    n = 0
    seq_gpa = pv.desc + 72

    def host() -> None:
        nonlocal n
        try:
            while not stop.is_set():
                if swapper is not None:
                    s.vm.write_u64(seq_gpa, 2 * n + 1)  # odd: the guest does not judge reads now
                    swapper.swap()
                    s.vm.write_u64(seq_gpa, 2 * n + 2)
                    # a swap (Python, with its checks) outlasts many guest iterations: leave gaps
                    # in which the guest's reads are judged (on one CPU there would be none)
                    time.sleep(rng.random() * 0.002)
                elif churn is not None:
                    churn.step()
                else:
                    s.backing.punch_hole(0, s.unit)
                n += 1
                if rng.random() < 0.1:
                    time.sleep(0)  # let the GIL go now and then: vary the interleaving
        except BaseException as e:
            err.append(e)

    def stopper() -> None:
        # as test_pfncache's kvmclock race: enough to call it a race, then `seconds` or the goal
        end = time.monotonic() + seconds
        while time.monotonic() < end + 15 and not stop.is_set():
            writes = s.vm.read_u64(pv.desc + 56)
            if n > 10 and writes > 100 and (time.monotonic() >= end or (early and n > 20 and writes > 200)):
                break
            time.sleep(0.02)
        pv.stop()

    t = threading.Thread(target=host, name="pv-pages-invalidator")
    st = threading.Thread(target=stopper, name="pv-pages-race-stopper")
    out: dict[str, tuple[int, ...]] = {}
    t.start()
    try:
        vals = (3, pvmsr.MSR_KVM_STEAL_TIME, pvmsr.steal_time_value(px.gpa), px.gva, 0, 0, 0, 0, 0, 0)
        s.vm.write(pv.desc, b"".join(v.to_bytes(8, "little") for v in vals))
        st.start()
        uc = s.vm.vcpu.run_until_ucall(seconds + 30, on_exit=_kick)
        assert uc.cmd == SYNC, f"pvpages answered {uc!r} to the churn"
        out["churn"] = uc.args
    finally:
        stop.set()
        t.join(10)
        if st.is_alive():
            st.join(5)
    assert not t.is_alive(), "the invalidating thread did not stop"
    if err:
        raise err[0]
    iters, odd, torn, maxv, pre, skipped = out["churn"]
    for k, v in (("updates", iters), ("invalidations", n), ("odd", odd), ("torn_reads", torn),
                 ("max_version", maxv), ("preempted_seen", pre), ("not_judged", skipped)):
        case_property(k, v)
    where = (f"steal time, {kind}/{method}, seed {seed}, {iters} guest updates vs {n} invalidations "
             f"({skipped} reads not judged: a swap overlapped them)")
    assert iters > 100 and n > 10, f"the race did not race: {where}"
    assert iters - skipped >= 10, f"no reads to judge: every read overlapped a swap ({where})"
    assert odd == 0, f"the guest saw an odd (half-written) version {odd} times right after its own update ({where})"
    assert pre == 0, f"the guest saw preempted set {pre} times right after its own update cleared it ({where})"
    if swapper is not None:
        swapper.finish()
        assert not swapper.problems, f"{where}: writes through a stale translation:\n  " + "\n  ".join(
            swapper.problems[:5])
    one_round(px, "none", 1, seed=seed)
    pv.done()
    kernel_health.assert_healthy(where)

