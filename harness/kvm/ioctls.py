"""KVM ioctl numbers, computed in one place from the _IO/_IOR/_IOW/_IOWR encoding.

Each entry names the struct the kernel's uapi gives it, so the size field of the number comes from
the same compiled layout the binding uses; tests/test_binding.py pins the resulting numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.kvm._cffi import ffi

KVMIO = 0xAE

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_SIZEMASK = (1 << 14) - 1


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    if size > _IOC_SIZEMASK:
        raise ValueError(f"ioctl size {size} does not fit the 14-bit size field")
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (typ << _IOC_TYPESHIFT) | nr


def ioc_size(number: int) -> int:
    """The size field encoded in an ioctl number."""
    return (number >> _IOC_SIZESHIFT) & _IOC_SIZEMASK


def ioc_dir(number: int) -> int:
    return (number >> _IOC_DIRSHIFT) & 3


@dataclass(frozen=True)
class Ioctl:
    name: str
    number: int
    fd: str  # which fd it is issued on: "system", "vm", "vcpu" (or several, "vm,vcpu")
    ctype: str | None  # the struct it carries, None for _IO

    @property
    def size(self) -> int:
        return ffi.sizeof(self.ctype) if self.ctype else 0


IOCTLS: dict[str, Ioctl] = {}


def _def(name: str, direction: int, nr: int, ctype: str | None, fd: str) -> None:
    size = ffi.sizeof(ctype) if ctype else 0
    IOCTLS[name] = Ioctl(name, _ioc(direction, KVMIO, nr, size), fd, ctype)


_R, _W, _RW = _IOC_READ, _IOC_WRITE, _IOC_READ | _IOC_WRITE

# system fd
_def("KVM_GET_API_VERSION", _IOC_NONE, 0x00, None, "system")
_def("KVM_CREATE_VM", _IOC_NONE, 0x01, None, "system")
_def("KVM_GET_MSR_INDEX_LIST", _RW, 0x02, "struct kvm_msr_list", "system")
_def("KVM_CHECK_EXTENSION", _IOC_NONE, 0x03, None, "system,vm")
_def("KVM_GET_VCPU_MMAP_SIZE", _IOC_NONE, 0x04, None, "system")
_def("KVM_GET_SUPPORTED_CPUID", _RW, 0x05, "struct kvm_cpuid2", "system")
_def("KVM_GET_EMULATED_CPUID", _RW, 0x09, "struct kvm_cpuid2", "system")
_def("KVM_GET_MSR_FEATURE_INDEX_LIST", _RW, 0x0A, "struct kvm_msr_list", "system")

# vm fd
_def("KVM_CREATE_VCPU", _IOC_NONE, 0x41, None, "vm")
_def("KVM_GET_DIRTY_LOG", _W, 0x42, "struct kvm_dirty_log", "vm")
_def("KVM_SET_USER_MEMORY_REGION", _W, 0x46, "struct kvm_userspace_memory_region", "vm")
_def("KVM_SET_TSS_ADDR", _IOC_NONE, 0x47, None, "vm")
_def("KVM_SET_IDENTITY_MAP_ADDR", _W, 0x48, "uint64_t", "vm")
_def("KVM_SET_USER_MEMORY_REGION2", _W, 0x49, "struct kvm_userspace_memory_region2", "vm")
_def("KVM_CREATE_IRQCHIP", _IOC_NONE, 0x60, None, "vm")
_def("KVM_REGISTER_COALESCED_MMIO", _W, 0x67, "struct kvm_coalesced_mmio_zone", "vm")
_def("KVM_UNREGISTER_COALESCED_MMIO", _W, 0x68, "struct kvm_coalesced_mmio_zone", "vm")
_def("KVM_IRQFD", _W, 0x76, "struct kvm_irqfd", "vm")
_def("KVM_IOEVENTFD", _W, 0x79, "struct kvm_ioeventfd", "vm")
_def("KVM_XEN_HVM_CONFIG", _W, 0x7A, "struct kvm_xen_hvm_config", "vm")
_def("KVM_SET_CLOCK", _W, 0x7B, "struct kvm_clock_data", "vm")
_def("KVM_GET_CLOCK", _R, 0x7C, "struct kvm_clock_data", "vm")
_def("KVM_ENABLE_CAP", _W, 0xA3, "struct kvm_enable_cap", "vm,vcpu")
_def("KVM_CLEAR_DIRTY_LOG", _RW, 0xC0, "struct kvm_clear_dirty_log", "vm")
_def("KVM_RESET_DIRTY_RINGS", _IOC_NONE, 0xC7, None, "vm")
_def("KVM_GET_STATS_FD", _IOC_NONE, 0xCE, None, "vm,vcpu")
_def("KVM_SET_MEMORY_ATTRIBUTES", _W, 0xD2, "struct kvm_memory_attributes", "vm")
_def("KVM_CREATE_GUEST_MEMFD", _RW, 0xD4, "struct kvm_create_guest_memfd", "vm")

# vcpu fd
_def("KVM_RUN", _IOC_NONE, 0x80, None, "vcpu")
_def("KVM_GET_REGS", _R, 0x81, "struct kvm_regs", "vcpu")
_def("KVM_SET_REGS", _W, 0x82, "struct kvm_regs", "vcpu")
_def("KVM_GET_SREGS", _R, 0x83, "struct kvm_sregs", "vcpu")
_def("KVM_SET_SREGS", _W, 0x84, "struct kvm_sregs", "vcpu")
_def("KVM_TRANSLATE", _RW, 0x85, "struct kvm_translation", "vcpu")
_def("KVM_GET_MSRS", _RW, 0x88, "struct kvm_msrs", "vcpu")
_def("KVM_SET_MSRS", _W, 0x89, "struct kvm_msrs", "vcpu")
_def("KVM_GET_FPU", _R, 0x8C, "struct kvm_fpu", "vcpu")
_def("KVM_SET_FPU", _W, 0x8D, "struct kvm_fpu", "vcpu")
_def("KVM_SET_CPUID2", _W, 0x90, "struct kvm_cpuid2", "vcpu")
_def("KVM_GET_CPUID2", _RW, 0x91, "struct kvm_cpuid2", "vcpu")
_def("KVM_GET_MP_STATE", _R, 0x98, "struct kvm_mp_state", "vcpu")
_def("KVM_SET_MP_STATE", _W, 0x99, "struct kvm_mp_state", "vcpu")
_def("KVM_GET_VCPU_EVENTS", _R, 0x9F, "struct kvm_vcpu_events", "vcpu")
_def("KVM_SET_VCPU_EVENTS", _W, 0xA0, "struct kvm_vcpu_events", "vcpu")
_def("KVM_KVMCLOCK_CTRL", _IOC_NONE, 0xAD, None, "vcpu")
_def("KVM_PRE_FAULT_MEMORY", _RW, 0xD5, "struct kvm_pre_fault_memory", "vcpu")

# ---- Xen HVM emulation (KVM_CAP_XEN_HVM; the typed API is harness/x86/xen.py) --------------------------
# A block of its own: added with the kvm_xen_* structs in _cdefs.py. KVM_XEN_HVM_CONFIG is above.
_def("KVM_XEN_HVM_GET_ATTR", _RW, 0xC8, "struct kvm_xen_hvm_attr", "vm")
_def("KVM_XEN_HVM_SET_ATTR", _W, 0xC9, "struct kvm_xen_hvm_attr", "vm")
_def("KVM_XEN_VCPU_GET_ATTR", _RW, 0xCA, "struct kvm_xen_vcpu_attr", "vcpu")
_def("KVM_XEN_VCPU_SET_ATTR", _W, 0xCB, "struct kvm_xen_vcpu_attr", "vcpu")
_def("KVM_XEN_HVM_EVTCHN_SEND", _W, 0xD0, "struct kvm_irq_routing_xen_evtchn", "vm")

globals().update({name: io.number for name, io in IOCTLS.items()})


def ioctl_name(number: int) -> str:
    for io in IOCTLS.values():
        if io.number == number:
            return io.name
    return f"ioctl({number:#x})"
