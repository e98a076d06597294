"""The binding's layouts and ioctl numbers against the kernel's uapi (values pinned by hand from
include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h)."""

import struct

import pytest

from harness.kvm._cffi import ffi
from harness.kvm.ioctls import IOCTLS, ioc_dir, ioc_size

# Sizes the uapi documents or implies.
SIZES = {
    "struct kvm_run": 2352,
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_msr_list": 4,
    "struct kvm_enable_cap": 104,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_userspace_memory_region2": 160,
    "struct kvm_create_guest_memfd": 64,
    "struct kvm_memory_attributes": 32,
    "struct kvm_pre_fault_memory": 64,
    "struct kvm_dirty_log": 16,
    "struct kvm_clear_dirty_log": 24,
    "struct kvm_dirty_gfn": 16,
    "struct kvm_ioeventfd": 64,
    "struct kvm_irqfd": 32,
    "struct kvm_coalesced_mmio_zone": 16,
    "struct kvm_coalesced_mmio": 24,
    "struct kvm_coalesced_mmio_ring": 8,
    "struct kvm_translation": 24,
    "struct kvm_clock_data": 48,
    "struct kvm_mp_state": 4,
    "struct kvm_vcpu_events": 64,
    "struct kvm_xen_hvm_config": 56,
    "struct kvm_stats_header": 24,
    "struct kvm_stats_desc": 16,
    "struct kvm_debug_exit_arch": 32,
}

# Full ioctl numbers as the kernel computes them (pinned, not derived from our table).
NUMBERS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_REGISTER_COALESCED_MMIO": 0x4010AE67,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_KVMCLOCK_CTRL": 0xAEAD,
}


@pytest.mark.parametrize("ctype,size", sorted(SIZES.items()))
def test_struct_size(ctype, size):
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_size_field_matches_struct(name):
    io = IOCTLS[name]
    assert ioc_size(io.number) == (ffi.sizeof(io.ctype) if io.ctype else 0)
    assert (io.number >> 8) & 0xFF == 0xAE
    # _IO carries no data; every struct-carrying ioctl has a direction
    assert (ioc_dir(io.number) == 0) == (io.ctype is None)


@pytest.mark.parametrize("name,number", sorted(NUMBERS.items()))
def test_ioctl_number_pinned(name, number):
    assert IOCTLS[name].number == number, f"{name}: {IOCTLS[name].number:#x} != {number:#x}"


def test_numbers_unique():
    nums = [io.number for io in IOCTLS.values()]
    assert len(nums) == len(set(nums))


@pytest.mark.parametrize(
    "field,offset",
    [
        ("request_interrupt_window", 0), ("immediate_exit", 1), ("exit_reason", 8),
        ("ready_for_interrupt_injection", 12), ("if_flag", 13), ("flags", 14), ("cr8", 16),
        ("apic_base", 24), ("io", 32), ("mmio", 32), ("memory_fault", 32), ("kvm_valid_regs", 288),
        ("kvm_dirty_regs", 296), ("s", 304),
    ],
)
def test_kvm_run_offsets(field, offset):
    assert ffi.offsetof("struct kvm_run", field) == offset


def test_exit_union_member_layouts():
    run = ffi.new("struct kvm_run *")
    base = int(ffi.cast("uintptr_t", run))

    def off(p):
        return int(ffi.cast("uintptr_t", p)) - base

    assert off(ffi.addressof(run.io, "data_offset")) == 40
    assert off(ffi.addressof(run.mmio, "data")) == 40
    assert off(ffi.addressof(run.mmio, "len")) == 48
    assert off(ffi.addressof(run.mmio, "is_write")) == 52
    assert off(ffi.addressof(run.memory_fault, "gpa")) == 40
    assert off(ffi.addressof(run.memory_fault, "size")) == 48
    assert off(ffi.addressof(run.internal, "data")) == 40
    assert off(ffi.addressof(run.system_event, "data")) == 40


def test_region2_guest_memfd_fields():
    assert ffi.offsetof("struct kvm_userspace_memory_region2", "guest_memfd_offset") == 32
    assert ffi.offsetof("struct kvm_userspace_memory_region2", "guest_memfd") == 40
    assert ffi.offsetof("struct kvm_sregs", "cr0") == 224
    assert ffi.offsetof("struct kvm_sregs", "interrupt_bitmap") == 280


def test_vcpu_mmap_page_offsets():
    # arch/x86/include/uapi/asm/kvm.h: page 1 of the vCPU mapping is PIO data, page 2 the MMIO ring
    from harness.kvm.caps import KVM_COALESCED_MMIO_PAGE_OFFSET, KVM_PIO_PAGE_OFFSET

    assert (KVM_PIO_PAGE_OFFSET, KVM_COALESCED_MMIO_PAGE_OFFSET) == (1, 2)


def test_vcpu_fast_io_decode_matches_kvm_run_layout():
    # Vcpu.run() unpacks the PIO exit with a struct.Struct instead of cffi field reads
    from harness.kvm.vcpu import KVM_RUN_IO_HEAD

    base = ffi.offsetof("struct kvm_run", "io")
    io = ffi.new("struct kvm_run *").io
    want = [ffi.offsetof("struct kvm_run", "exit_reason")] + [
        base + ffi.offsetof(ffi.typeof(io), f) for f in ("direction", "size", "port", "count", "data_offset")]
    have, pos = [], 0
    for code in ("8x", "I", "20x", "B", "B", "H", "I", "Q"):
        if code.endswith("x"):
            pos += int(code[:-1])
            continue
        have.append(pos)
        pos += struct.calcsize("<" + code)
    assert have == want and KVM_RUN_IO_HEAD.size == pos
