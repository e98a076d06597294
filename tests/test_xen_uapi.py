"""harness/x86/xen.py and the kvm_xen_* declarations against upstream's uapi (pure logic, no KVM).

Facts pinned by hand from upstream (the host's 6.1 headers are older): arch/x86/include/uapi/asm/
kvm.h (struct kvm_xen_hvm_attr, kvm_xen_vcpu_attr, KVM_XEN_HVM_CONFIG_*, KVM_XEN_ATTR_TYPE_*,
KVM_XEN_VCPU_ATTR_TYPE_*), include/uapi/linux/kvm.h (the ioctl numbers, struct
kvm_irq_routing_xen_evtchn, KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL), and the guest layouts
xen.c's BUILD_BUG_ONs assert (shared_info wc at 0xc00 / compat 0x900, wc_sec_hi at 0xc0c / 0x924,
vcpu_info.time at 0x20, vcpu_runstate_info 0x2c + 4 bytes). (Named test_xen_uapi.py, not test_xen.py:
tests/ and cases/ have no __init__.py, so two test_xen.py basenames cannot be collected together.)
"""

import struct

import pytest

from harness.kvm._cffi import ffi
from harness.kvm.errors import BadInput
from harness.kvm.ioctls import IOCTLS, ioc_dir, ioc_size
from harness.x86 import xen
from harness.x86.xen import HvmAttr, Runstate, RunstateState, VcpuAttr, Wallclock, XenConfig, XenVcpu, XenVm

SIZES = {
    "struct kvm_xen_hvm_config": 56,
    "struct kvm_xen_hvm_attr": 72,  # u16 type, u16 pad[3], union of u64 pad[8]
    "struct kvm_xen_vcpu_attr": 72,
    "struct kvm_irq_routing_xen_evtchn": 12,
}

NUMBERS = {
    "KVM_XEN_HVM_CONFIG": 0x4038AE7A,  # _IOW(KVMIO, 0x7a, struct kvm_xen_hvm_config)
    "KVM_XEN_HVM_GET_ATTR": 0xC048AEC8,  # _IOWR(KVMIO, 0xc8, struct kvm_xen_hvm_attr)
    "KVM_XEN_HVM_SET_ATTR": 0x4048AEC9,  # _IOW(KVMIO,  0xc9, struct kvm_xen_hvm_attr)
    "KVM_XEN_VCPU_GET_ATTR": 0xC048AECA,  # _IOWR(KVMIO, 0xca, struct kvm_xen_vcpu_attr)
    "KVM_XEN_VCPU_SET_ATTR": 0x4048AECB,  # _IOW(KVMIO,  0xcb, struct kvm_xen_vcpu_attr)
    "KVM_XEN_HVM_EVTCHN_SEND": 0x400CAED0,  # _IOW(KVMIO,  0xd0, struct kvm_irq_routing_xen_evtchn)
}

FDS = {"KVM_XEN_HVM_CONFIG": "vm", "KVM_XEN_HVM_GET_ATTR": "vm", "KVM_XEN_HVM_SET_ATTR": "vm",
       "KVM_XEN_VCPU_GET_ATTR": "vcpu", "KVM_XEN_VCPU_SET_ATTR": "vcpu", "KVM_XEN_HVM_EVTCHN_SEND": "vm"}


@pytest.mark.parametrize(("ctype", "size"), sorted(SIZES.items()))
def test_struct_size(ctype, size):
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize(("name", "number"), sorted(NUMBERS.items()))
def test_ioctl_number(name, number):
    io = IOCTLS[name]
    assert io.number == number, f"{name}: {io.number:#x} != {number:#x}"
    assert ioc_size(io.number) == ffi.sizeof(io.ctype)
    assert io.fd == FDS[name]


def test_get_is_read_write_set_is_write():
    for name in NUMBERS:
        want = 3 if "_GET_" in name else 1  # _IOWR / _IOW
        assert ioc_dir(IOCTLS[name].number) == want, name


def _off(ctype: str, path: str) -> int:
    """Offset of a nested member (cffi's offsetof takes one level; walk the rest)."""
    obj = ffi.new(ctype + " *")
    base = int(ffi.cast("uintptr_t", obj))
    cur = obj
    parts = path.split(".")
    for p in parts[:-1]:
        cur = getattr(cur, p)
    return int(ffi.cast("uintptr_t", ffi.addressof(cur, parts[-1]))) - base


@pytest.mark.parametrize(("ctype", "path", "offset"), [
    ("struct kvm_xen_hvm_config", "flags", 0),
    ("struct kvm_xen_hvm_config", "msr", 4),
    ("struct kvm_xen_hvm_config", "blob_addr_32", 8),
    ("struct kvm_xen_hvm_config", "blob_size_64", 25),
    ("struct kvm_xen_hvm_attr", "type", 0),
    ("struct kvm_xen_hvm_attr", "u", 8),
    ("struct kvm_xen_hvm_attr", "u.long_mode", 8),
    ("struct kvm_xen_hvm_attr", "u.shared_info.gfn", 8),
    ("struct kvm_xen_hvm_attr", "u.shared_info.hva", 8),
    ("struct kvm_xen_hvm_attr", "u.evtchn.flags", 16),
    ("struct kvm_xen_hvm_attr", "u.evtchn.deliver.port.priority", 28),
    ("struct kvm_xen_hvm_attr", "u.xen_version", 8),
    ("struct kvm_xen_vcpu_attr", "u.gpa", 8),
    ("struct kvm_xen_vcpu_attr", "u.hva", 8),
    ("struct kvm_xen_vcpu_attr", "u.runstate.state", 8),
    ("struct kvm_xen_vcpu_attr", "u.runstate.state_entry_time", 16),
    ("struct kvm_xen_vcpu_attr", "u.runstate.time_offline", 48),
    ("struct kvm_xen_vcpu_attr", "u.timer.expires_ns", 16),
    ("struct kvm_xen_vcpu_attr", "u.vector", 8),
    ("struct kvm_irq_routing_xen_evtchn", "priority", 8),
])
def test_member_offset(ctype, path, offset):
    assert _off(ctype, path) == offset


def test_uapi_constants():
    assert {f.name: f.value for f in XenConfig} == {
        "HYPERCALL_MSR": 1, "INTERCEPT_HCALL": 2, "SHARED_INFO": 4, "RUNSTATE": 8, "EVTCHN_2LEVEL": 0x10,
        "EVTCHN_SEND": 0x20, "RUNSTATE_UPDATE_FLAG": 0x40, "PVCLOCK_TSC_UNSTABLE": 0x80,
        "SHARED_INFO_HVA": 0x100, "WRITE_HYPERCALL_PAGE": 0x200}
    assert {a.name: a.value for a in HvmAttr} == {
        "LONG_MODE": 0, "SHARED_INFO": 1, "UPCALL_VECTOR": 2, "EVTCHN": 3, "XEN_VERSION": 4,
        "RUNSTATE_UPDATE_FLAG": 5, "SHARED_INFO_HVA": 6}
    assert {a.name: a.value for a in VcpuAttr} == {
        "VCPU_INFO": 0, "VCPU_TIME_INFO": 1, "RUNSTATE_ADDR": 2, "RUNSTATE_CURRENT": 3, "RUNSTATE_DATA": 4,
        "RUNSTATE_ADJUST": 5, "VCPU_ID": 6, "TIMER": 7, "UPCALL_VECTOR": 8, "VCPU_INFO_HVA": 9}
    assert not hasattr(VcpuAttr, "RUNSTATE_HVA")  # upstream has none: the runstate area is by GPA only
    assert [s.value for s in RunstateState] == [0, 1, 2, 3]
    assert xen.KVM_XEN_INVALID_GFN == xen.KVM_XEN_INVALID_GPA == 2**64 - 1
    assert xen.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL == 0xFFFFFFFF  # ((__u32)(-1))
    assert xen.XEN_RUNSTATE_UPDATE >> 56 == 0x80  # xen.c: BUILD_BUG_ON((XEN_RUNSTATE_UPDATE >> 56) != 0x80)
    assert xen.KVM_XEN_MSR_MIN_INDEX <= xen.XEN_HYPERCALL_MSR <= xen.KVM_XEN_MSR_MAX_INDEX


def test_guest_layouts():
    # xen.c BUILD_BUG_ONs and xen/interface/xen.h
    assert (xen.SHINFO_WC, xen.SHINFO_WC_SEC_HI) == (0xC00, 0xC0C)
    assert (xen.COMPAT_SHINFO_WC, xen.COMPAT_SHINFO_WC_SEC_HI) == (0x900, 0x924)
    assert (xen.SHINFO_EVTCHN_PENDING, xen.SHINFO_EVTCHN_MASK) == (32 * 64, 32 * 64 + 64 * 8)
    assert (xen.VCPU_INFO_SIZE, xen.VCPU_INFO_TIME) == (64, 0x20)
    assert (xen.RUNSTATE_SIZE, xen.COMPAT_RUNSTATE_SIZE) == (0x2C + 4, 0x2C)
    assert xen.wallclock_span() == ((0xC00, 0xC0C), (0xC0C, 0xC10))
    assert xen.wallclock_span(False) == ((0x900, 0x90C), (0x924, 0x928))


def test_wallclock_round_trip_and_epoch():
    page = bytearray(4096)
    wc = Wallclock(6, 0x1234_5678, 999_999_999, 2)
    wc.pack_into(page)
    assert page[0xC00:0xC04] == (6).to_bytes(4, "little")
    assert page[0xC0C:0xC10] == (2).to_bytes(4, "little")
    assert Wallclock.parse(bytes(page)) == wc
    assert wc.epoch_ns == ((2 << 32) | 0x1234_5678) * 10**9 + 999_999_999
    compat = bytearray(4096)
    wc.pack_into(compat, long_mode=False)
    assert compat[0x900:0x904] == (6).to_bytes(4, "little") and Wallclock.parse(bytes(compat), False) == wc
    assert Wallclock.parse(bytes(compat)) != wc  # the 64-bit offsets read something else
    with pytest.raises(ValueError):
        Wallclock.parse(bytes(0xC0F))


def test_runstate_layouts():
    rs = Runstate(RunstateState.BLOCKED, xen.XEN_RUNSTATE_UPDATE | 100, (10, 20, 30, 40))
    raw = rs.pack()
    assert len(raw) == 48
    assert struct.unpack_from("<I", raw, 0)[0] == 2 and raw[4:8] == bytes(4)  # 64-bit: padding after state
    assert struct.unpack_from("<Q", raw, 8)[0] == xen.XEN_RUNSTATE_UPDATE | 100
    assert struct.unpack_from("<4Q", raw, 16) == (10, 20, 30, 40)
    assert raw[15] == 0x80  # the update flag is the last byte of state_entry_time
    assert Runstate.parse(raw) == rs and rs.updating and rs.entered == 100
    c = rs.pack(long_mode=False)
    assert len(c) == 44 and struct.unpack_from("<Q", c, 4)[0] == xen.XEN_RUNSTATE_UPDATE | 100
    assert Runstate.parse(c, long_mode=False) == rs
    assert "RUNSTATE_blocked" in rs.describe() and "UPDATE" in rs.describe()
    assert "not a runstate" in Runstate(0xA5A5A5A5, 0, (0, 0, 0, 0)).describe()


def test_runstate_from_attr():
    a = ffi.new("struct kvm_xen_vcpu_attr *")
    a.type = VcpuAttr.RUNSTATE_DATA
    r = a.u.runstate
    r.state, r.state_entry_time = 1, 66
    r.time_running, r.time_runnable, r.time_blocked, r.time_offline = 11, 22, 0, 33
    assert Runstate.from_attr(a) == Runstate(1, 66, (11, 22, 0, 33))


def test_missing_says_what_is_missing():
    assert "KVM_CAP_XEN_HVM is 0" in xen.missing(0, XenConfig.SHARED_INFO)
    assert xen.missing(0x1FF, XenConfig.SHARED_INFO | XenConfig.SHARED_INFO_HVA) is None
    why = xen.missing(0x7, XenConfig.SHARED_INFO | XenConfig.RUNSTATE | XenConfig.SHARED_INFO_HVA)
    assert why == ("KVM_CAP_XEN_HVM = 0x7 on this kernel lacks KVM_XEN_HVM_CONFIG_RUNSTATE (0x8) | "
                   "KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA (0x100)")


class _NoFd:
    fd = -1  # any ioctl would fail with EBADF: a BadInput must come first


@pytest.mark.parametrize(("call", "arg"), [
    (lambda: XenVm(_NoFd()).set_shared_info_gfn(-1), "gfn"),
    (lambda: XenVm(_NoFd()).set_shared_info_hva(1 << 64), "hva"),
    (lambda: XenVm(_NoFd()).configure(msr=1 << 32), "msr"),
    (lambda: XenVm(_NoFd()).evtchn_send(-1), "port"),
    (lambda: XenVcpu(_NoFd()).set_vcpu_info_gpa(1 << 64), "gpa"),
    (lambda: XenVcpu(_NoFd()).set_vcpu_info_hva(-4096), "hva"),
    (lambda: XenVcpu(_NoFd()).set_runstate_current(4), "state"),
    (lambda: XenVcpu(_NoFd()).runstate_adjust(times=(-1, 0, 0, 0)), "times"),
])
def test_bad_values_refused_before_the_ioctl(call, arg):
    with pytest.raises(BadInput) as ei:
        call()
    assert ei.value.arg == arg
