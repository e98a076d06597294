"""Xen HVM emulation in KVM (KVM_CAP_XEN_HVM): the uapi as a small typed API, and the layouts of the
guest structures KVM writes for a Xen guest.

KVM writes three Xen structures into guest memory, each through a gfn_to_pfn_cache (arch/x86/kvm/
xen.c): the shared_info page (its wallclock, and event-channel bits), the per-vCPU vcpu_info (a
pvclock_vcpu_time_info at +0x20, and event-channel bits) and the per-vCPU runstate area. The VMM names
each by guest-physical address (KVM_XEN_ATTR_TYPE_SHARED_INFO by GFN, KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO
and _RUNSTATE_ADDR by GPA) or, where KVM offers KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA, the first two by
host virtual address (KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA, KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO_HVA): a cache
set by HVA does not go through a memslot at all. The runstate area has no HVA form upstream (there is
no KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_HVA; api.rst 4.127 lists them all).

What makes KVM write what (upstream xen.c / x86.c):
  - shared_info wallclock (`struct pvclock_wall_clock` at 0xc00 in long mode, wc_sec_hi at 0xc0c):
    kvm_xen_shared_info_init(), called when the shared_info attribute is set and when
    KVM_XEN_ATTR_TYPE_LONG_MODE is set (again) while shared_info is active. It holds the kvmclock
    epoch in wall time (CLOCK_REALTIME - kvmclock), so a KVM_SET_CLOCK moves it at the next rewrite.
    The version goes (v + 1) | 1, then + 1, from what it finds in the page.
  - vcpu_info.time: kvm_guest_time_update() on KVM_REQ_CLOCK_UPDATE, i.e. on the next KVM_RUN after
    KVM_SET_CLOCK or after the vcpu_info attribute is set; same version protocol as kvmclock
    (harness.x86.kvmclock), flags PVCLOCK_GUEST_STOPPED kept from the page.
  - runstate: kvm_xen_update_runstate() on every vCPU entry once the Xen hypercall MSR is configured
    (KVM_XEN_HVM_CONFIG.msr != 0: vcpu_load asks KVM_REQ_STEAL_UPDATE, record_steal_time() sets
    RUNSTATE_running), on KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_CURRENT / _ADJUST, and when the task is
    preempted in KVM_RUN (RUNSTATE_runnable; that path runs atomic and skips the write if the cache
    is invalid). state_entry_time is kvmclock ns and equals the sum of the four times.

Plain values (layouts, Wallclock, Runstate) are pure; XenVm / XenVcpu issue the ioctls on anything
with an `fd` (harness.kvm Vm / Vcpu). tests/test_xen_uapi.py pins sizes, offsets and numbers.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from harness.kvm._cffi import ffi
from harness.kvm.caps import Cap
from harness.kvm.checks import check_uint
from harness.kvm.errors import BadInput, KvmError
from harness.kvm.ioctl import kvm_ioctl

U64_MAX = (1 << 64) - 1
KVM_XEN_INVALID_GFN = U64_MAX
KVM_XEN_INVALID_GPA = U64_MAX

# The Xen hypercall MSR for KVM_XEN_HVM_CONFIG: KVM restricts it to 0x40000000..0x4fffffff
# (KVM_XEN_MSR_MIN_INDEX..MAX); 0x40000200 stays clear of Hyper-V's 0x40000000-0x400000ff.
XEN_HYPERCALL_MSR = 0x40000200
KVM_XEN_MSR_MIN_INDEX = 0x40000000
KVM_XEN_MSR_MAX_INDEX = 0x4FFFFFFF


class XenConfig(enum.IntFlag):
    """KVM_CHECK_EXTENSION(KVM_CAP_XEN_HVM) bits: what this KVM's Xen emulation offers (also the
    KVM_XEN_HVM_CONFIG.flags a VMM may enable: INTERCEPT_HCALL, EVTCHN_SEND, PVCLOCK_TSC_UNSTABLE)."""

    HYPERCALL_MSR = 1 << 0
    INTERCEPT_HCALL = 1 << 1
    SHARED_INFO = 1 << 2
    RUNSTATE = 1 << 3
    EVTCHN_2LEVEL = 1 << 4
    EVTCHN_SEND = 1 << 5
    RUNSTATE_UPDATE_FLAG = 1 << 6
    PVCLOCK_TSC_UNSTABLE = 1 << 7
    SHARED_INFO_HVA = 1 << 8
    WRITE_HYPERCALL_PAGE = 1 << 9


class HvmAttr(enum.IntEnum):
    """KVM_XEN_ATTR_TYPE_* (KVM_XEN_HVM_SET_ATTR / GET_ATTR on the VM fd)."""

    LONG_MODE = 0x0
    SHARED_INFO = 0x1
    UPCALL_VECTOR = 0x2
    EVTCHN = 0x3
    XEN_VERSION = 0x4
    RUNSTATE_UPDATE_FLAG = 0x5
    SHARED_INFO_HVA = 0x6


class VcpuAttr(enum.IntEnum):
    """KVM_XEN_VCPU_ATTR_TYPE_* (KVM_XEN_VCPU_SET_ATTR / GET_ATTR on the vCPU fd)."""

    VCPU_INFO = 0x0
    VCPU_TIME_INFO = 0x1
    RUNSTATE_ADDR = 0x2
    RUNSTATE_CURRENT = 0x3
    RUNSTATE_DATA = 0x4
    RUNSTATE_ADJUST = 0x5
    VCPU_ID = 0x6
    TIMER = 0x7
    UPCALL_VECTOR = 0x8
    VCPU_INFO_HVA = 0x9


class RunstateState(enum.IntEnum):
    """vcpu_runstate_info.state (xen/interface/vcpu.h)."""

    RUNNING = 0
    RUNNABLE = 1
    BLOCKED = 2
    OFFLINE = 3


XEN_RUNSTATE_UPDATE = 1 << 63  # top bit of state_entry_time while KVM writes (RUNSTATE_UPDATE_FLAG)
KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL = 0xFFFFFFFF  # ((__u32)(-1)): the only priority KVM takes

# ---- guest layouts (xen/interface/xen.h, vcpu.h; BUILD_BUG_ONs in arch/x86/kvm/xen.c) -------------
PAGE_SIZE = 4096
VCPU_INFO_SIZE = 64
VCPU_INFO_TIME = 0x20  # struct pvclock_vcpu_time_info inside vcpu_info (64-bit and compat alike)
SHINFO_VCPU_INFO = 0x0  # shared_info.vcpu_info[32] (legacy per-vCPU slots, 64 bytes each)
SHINFO_EVTCHN_PENDING = 0x800  # long mode: 64 unsigned longs
SHINFO_EVTCHN_MASK = 0xA00
SHINFO_WC = 0xC00  # long mode: struct pvclock_wall_clock {u32 version, sec, nsec}
SHINFO_WC_SEC_HI = 0xC0C
COMPAT_SHINFO_WC = 0x900  # 32-bit guests
COMPAT_SHINFO_WC_SEC_HI = 0x924
WALLCLOCK_SIZE = 12
RUNSTATE_SIZE = 48  # long mode: int state, 4 bytes padding, u64 state_entry_time, u64 time[4]
COMPAT_RUNSTATE_SIZE = 44  # packed: no padding after state

_WC = struct.Struct("<III")
_RS64 = struct.Struct("<I4xQ4Q")
_RS32 = struct.Struct("<IQ4Q")
assert _WC.size == WALLCLOCK_SIZE and _RS64.size == RUNSTATE_SIZE and _RS32.size == COMPAT_RUNSTATE_SIZE


def wallclock_span(long_mode: bool = True) -> tuple[tuple[int, int], ...]:
    """The byte ranges [start, end) of shared_info that a wallclock update writes."""
    if long_mode:
        return ((SHINFO_WC, SHINFO_WC + WALLCLOCK_SIZE), (SHINFO_WC_SEC_HI, SHINFO_WC_SEC_HI + 4))
    return ((COMPAT_SHINFO_WC, COMPAT_SHINFO_WC + WALLCLOCK_SIZE),
            (COMPAT_SHINFO_WC_SEC_HI, COMPAT_SHINFO_WC_SEC_HI + 4))


@dataclass(frozen=True)
class Wallclock:
    """shared_info's wallclock: the kvmclock epoch in wall time, sec = sec_hi << 32 | sec."""

    version: int
    sec: int
    nsec: int
    sec_hi: int = 0

    @classmethod
    def parse(cls, shinfo: bytes, long_mode: bool = True) -> Wallclock:
        """From a whole shared_info page (or at least up to wc_sec_hi)."""
        (wc, wc_end), (hi, hi_end) = wallclock_span(long_mode)
        if len(shinfo) < hi_end:
            raise ValueError(f"shared_info needs {hi_end} bytes for the wallclock, got {len(shinfo)}")
        v, s, ns = _WC.unpack(shinfo[wc:wc_end])
        return cls(v, s, ns, int.from_bytes(shinfo[hi:hi_end], "little"))

    def pack_into(self, page: bytearray, long_mode: bool = True) -> None:
        (wc, _), (hi, hi_end) = wallclock_span(long_mode)
        _WC.pack_into(page, wc, self.version, self.sec, self.nsec)
        page[hi:hi_end] = self.sec_hi.to_bytes(4, "little")

    @property
    def epoch_ns(self) -> int:
        return ((self.sec_hi << 32) | self.sec) * 1_000_000_000 + self.nsec

    def describe(self) -> str:
        return (f"version={self.version} sec={(self.sec_hi << 32) | self.sec} nsec={self.nsec} "
                f"(epoch {self.epoch_ns / 1e9:.3f} s)")


@dataclass(frozen=True)
class Runstate:
    """vcpu_runstate_info: the state, when it was entered (kvmclock ns, top bit XEN_RUNSTATE_UPDATE
    while KVM writes) and the ns spent in each state (running, runnable, blocked, offline)."""

    state: int
    entry_time: int
    times: tuple[int, int, int, int]

    @classmethod
    def parse(cls, raw: bytes, long_mode: bool = True) -> Runstate:
        lay = _RS64 if long_mode else _RS32
        if len(raw) < lay.size:
            raise ValueError(f"runstate needs {lay.size} bytes, got {len(raw)}")
        st, entry, *times = lay.unpack(raw[:lay.size])
        return cls(st, entry, (times[0], times[1], times[2], times[3]))

    @classmethod
    def from_attr(cls, a: Any) -> Runstate:
        """From struct kvm_xen_vcpu_attr's u.runstate (KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA)."""
        r = a.u.runstate
        return cls(r.state, r.state_entry_time, (r.time_running, r.time_runnable, r.time_blocked, r.time_offline))

    def pack(self, long_mode: bool = True) -> bytes:
        return (_RS64 if long_mode else _RS32).pack(self.state, self.entry_time, *self.times)

    @property
    def updating(self) -> bool:
        return bool(self.entry_time & XEN_RUNSTATE_UPDATE)

    @property
    def entered(self) -> int:
        """state_entry_time without the XEN_RUNSTATE_UPDATE bit."""
        return self.entry_time & ~XEN_RUNSTATE_UPDATE

    def state_name(self) -> str:
        try:
            return f"RUNSTATE_{RunstateState(self.state).name.lower()}"
        except ValueError:
            return f"state {self.state:#x} (not a runstate)"

    def describe(self) -> str:
        upd = " UPDATE" if self.updating else ""
        return (f"{self.state_name()} entered at {self.entered}{upd}, running={self.times[0]} "
                f"runnable={self.times[1]} blocked={self.times[2]} offline={self.times[3]}")


# ---- the ioctls ------------------------------------------------------------------------------------
class HasFd(Protocol):
    fd: int


def xen_caps(kvm: Any) -> XenConfig:
    """KVM_CAP_XEN_HVM on this system (or VM) fd: 0 when there is no Xen emulation."""
    return XenConfig(kvm.check_extension(Cap.XEN_HVM))


def missing(caps: int, need: XenConfig) -> str | None:
    """The reason a case needing `need` cannot run with `caps` (KVM_CAP_XEN_HVM), or None."""
    if not caps:
        return "KVM_CAP_XEN_HVM is 0 on this kernel: no Xen HVM emulation (CONFIG_KVM_XEN off or not offered)"
    lack = XenConfig(need & ~caps)
    if not lack:
        return None
    names = " | ".join(f"KVM_XEN_HVM_CONFIG_{f.name} ({f.value:#x})" for f in XenConfig if f & lack)
    return f"KVM_CAP_XEN_HVM = {caps:#x} on this kernel lacks {names}"


def _hvm_attr(kind: HvmAttr) -> Any:
    a = ffi.new("struct kvm_xen_hvm_attr *")
    a.type = kind
    return a


def _vcpu_attr(kind: VcpuAttr) -> Any:
    a = ffi.new("struct kvm_xen_vcpu_attr *")
    a.type = kind
    return a


def _addr(where: str, name: str, value: int | None, invalid: int) -> int:
    return invalid if value is None else check_uint(where, name, value, 64)


class XenVm:
    """The VM-wide Xen ioctls of one VM: KVM_XEN_HVM_CONFIG and KVM_XEN_HVM_SET_ATTR / GET_ATTR."""

    def __init__(self, vm: HasFd) -> None:
        self.vm = vm

    def configure(self, msr: int = XEN_HYPERCALL_MSR, flags: int = 0) -> None:
        """KVM_XEN_HVM_CONFIG: the hypercall-page MSR (0 disables Xen MSR emulation; runstate
        updates on entry need it) and the flags to enable. No hypercall blobs."""
        w = "KVM_XEN_HVM_CONFIG"
        c = ffi.new("struct kvm_xen_hvm_config *")
        c.msr = check_uint(w, "msr", msr, 32)
        c.flags = check_uint(w, "flags", flags, 32)
        kvm_ioctl(self.vm.fd, w, c, lambda: f"msr={msr:#x}, flags={flags:#x}")

    def set_attr(self, a: Any, desc: str) -> None:
        kvm_ioctl(self.vm.fd, "KVM_XEN_HVM_SET_ATTR", a, desc)

    def get_attr(self, kind: HvmAttr) -> Any:
        a = _hvm_attr(kind)
        kvm_ioctl(self.vm.fd, "KVM_XEN_HVM_GET_ATTR", a, lambda: f"type={kind.name}")
        return a

    def set_long_mode(self, on: bool = True) -> None:
        """Also rewrites the shared_info wallclock when shared_info is set (kvm_xen_shared_info_init)."""
        a = _hvm_attr(HvmAttr.LONG_MODE)
        a.u.long_mode = int(bool(on))
        self.set_attr(a, f"type=LONG_MODE, long_mode={int(bool(on))}")

    def long_mode(self) -> bool:
        return bool(self.get_attr(HvmAttr.LONG_MODE).u.long_mode)

    def set_shared_info_gfn(self, gfn: int | None) -> None:
        """shared_info by GFN (None: KVM_XEN_INVALID_GFN, deactivate); KVM writes the wallclock."""
        a = _hvm_attr(HvmAttr.SHARED_INFO)
        a.u.shared_info.gfn = _addr("KVM_XEN_HVM_SET_ATTR(SHARED_INFO)", "gfn", gfn, KVM_XEN_INVALID_GFN)
        self.set_attr(a, f"type=SHARED_INFO, gfn={'INVALID' if gfn is None else hex(gfn)}")

    def shared_info_gfn(self) -> int | None:
        g = self.get_attr(HvmAttr.SHARED_INFO).u.shared_info.gfn
        return None if g == KVM_XEN_INVALID_GFN else g

    def set_shared_info_hva(self, hva: int) -> None:
        """shared_info by host virtual address (page aligned; 0 deactivates): no memslot involved."""
        a = _hvm_attr(HvmAttr.SHARED_INFO_HVA)
        a.u.shared_info.hva = check_uint("KVM_XEN_HVM_SET_ATTR(SHARED_INFO_HVA)", "hva", hva, 64)
        self.set_attr(a, f"type=SHARED_INFO_HVA, hva={hva:#x}")

    def shared_info_hva(self) -> int:
        return self.get_attr(HvmAttr.SHARED_INFO_HVA).u.shared_info.hva

    def set_runstate_update_flag(self, on: bool = True) -> None:
        a = _hvm_attr(HvmAttr.RUNSTATE_UPDATE_FLAG)
        a.u.runstate_update_flag = int(bool(on))
        self.set_attr(a, f"type=RUNSTATE_UPDATE_FLAG, {int(bool(on))}")

    def runstate_update_flag(self) -> bool:
        return bool(self.get_attr(HvmAttr.RUNSTATE_UPDATE_FLAG).u.runstate_update_flag)

    def evtchn_send(self, port: int, vcpu: int = 0,
                    priority: int = KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL) -> None:
        """KVM_XEN_HVM_EVTCHN_SEND (needs KVM_XEN_HVM_CONFIG_EVTCHN_SEND): raise event channel `port`
        on vCPU `vcpu`, written into shared_info (and vcpu_info) through their caches."""
        w = "KVM_XEN_HVM_EVTCHN_SEND"
        e = ffi.new("struct kvm_irq_routing_xen_evtchn *")
        e.port = check_uint(w, "port", port, 32)
        e.vcpu = check_uint(w, "vcpu", vcpu, 32)
        e.priority = check_uint(w, "priority", priority, 32)
        kvm_ioctl(self.vm.fd, w, e, lambda: f"port={port}, vcpu={vcpu}")


class XenVcpu:
    """The per-vCPU Xen ioctls of one vCPU: KVM_XEN_VCPU_SET_ATTR / GET_ATTR."""

    def __init__(self, vcpu: HasFd) -> None:
        self.vcpu = vcpu

    def set_attr(self, a: Any, desc: str) -> None:
        kvm_ioctl(self.vcpu.fd, "KVM_XEN_VCPU_SET_ATTR", a, desc)

    def get_attr(self, kind: VcpuAttr) -> Any:
        a = _vcpu_attr(kind)
        kvm_ioctl(self.vcpu.fd, "KVM_XEN_VCPU_GET_ATTR", a, lambda: f"type={kind.name}")
        return a

    def _set_gpa(self, kind: VcpuAttr, gpa: int | None) -> None:
        a = _vcpu_attr(kind)
        a.u.gpa = _addr(f"KVM_XEN_VCPU_SET_ATTR({kind.name})", "gpa", gpa, KVM_XEN_INVALID_GPA)
        self.set_attr(a, f"type={kind.name}, gpa={'INVALID' if gpa is None else hex(gpa)}")

    def _get_gpa(self, kind: VcpuAttr) -> int | None:
        g = self.get_attr(kind).u.gpa
        return None if g == KVM_XEN_INVALID_GPA else g

    def set_vcpu_info_gpa(self, gpa: int | None) -> None:
        """vcpu_info by GPA (64 bytes in one page; None deactivates); asks KVM_REQ_CLOCK_UPDATE."""
        self._set_gpa(VcpuAttr.VCPU_INFO, gpa)

    def vcpu_info_gpa(self) -> int | None:
        return self._get_gpa(VcpuAttr.VCPU_INFO)

    def set_vcpu_info_hva(self, hva: int) -> None:
        """vcpu_info by host virtual address (0 deactivates; needs KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA)."""
        a = _vcpu_attr(VcpuAttr.VCPU_INFO_HVA)
        a.u.hva = check_uint("KVM_XEN_VCPU_SET_ATTR(VCPU_INFO_HVA)", "hva", hva, 64)
        self.set_attr(a, f"type=VCPU_INFO_HVA, hva={hva:#x}")

    def vcpu_info_hva(self) -> int:
        return self.get_attr(VcpuAttr.VCPU_INFO_HVA).u.hva

    def set_vcpu_time_info_gpa(self, gpa: int | None) -> None:
        self._set_gpa(VcpuAttr.VCPU_TIME_INFO, gpa)

    def set_runstate_addr(self, gpa: int | None) -> None:
        """The runstate area by GPA (may cross a page; None deactivates); KVM writes it at once."""
        self._set_gpa(VcpuAttr.RUNSTATE_ADDR, gpa)

    def runstate_addr(self) -> int | None:
        """The runstate GPA, or None when none is set (KVM answers ENOENT then)."""
        try:
            return self._get_gpa(VcpuAttr.RUNSTATE_ADDR)
        except KvmError as e:
            if e.errno == errno.ENOENT:  # no runstate area active
                return None
            raise

    def set_runstate_current(self, state: int) -> None:
        """Move the vCPU to `state` now: KVM accounts the time and writes the runstate area (a
        RUNNABLE write is the atomic one and is skipped while the cache is invalid)."""
        if not 0 <= state <= RunstateState.OFFLINE:
            raise BadInput("KVM_XEN_VCPU_SET_ATTR(RUNSTATE_CURRENT)", "state", state, "must be a RunstateState")
        a = _vcpu_attr(VcpuAttr.RUNSTATE_CURRENT)
        a.u.runstate.state = state
        self.set_attr(a, f"type=RUNSTATE_CURRENT, state={RunstateState(state).name}")

    def runstate_current(self) -> int:
        return self.get_attr(VcpuAttr.RUNSTATE_CURRENT).u.runstate.state

    def runstate_data(self) -> Runstate:
        """What KVM holds (KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA): the runstate area must show this
        after the vCPU stopped."""
        return Runstate.from_attr(self.get_attr(VcpuAttr.RUNSTATE_DATA))

    def runstate_adjust(self, state: int | None = None, times: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        """KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADJUST: add `times` (entry time advances by their sum);
        state None keeps the state and just rewrites the area (the selftest's "trigger a write")."""
        a = _vcpu_attr(VcpuAttr.RUNSTATE_ADJUST)
        r = a.u.runstate
        r.state = U64_MAX if state is None else check_uint("RUNSTATE_ADJUST", "state", state, 64)
        r.time_running, r.time_runnable, r.time_blocked, r.time_offline = (
            check_uint("RUNSTATE_ADJUST", "times", t, 64) for t in times)
        r.state_entry_time = sum(times) & U64_MAX
        self.set_attr(a, f"type=RUNSTATE_ADJUST, state={'keep' if state is None else state}, times={times}")
