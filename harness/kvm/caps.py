"""KVM capability numbers (include/uapi/linux/kvm.h) as a named enum.

Only numbers we use or report are listed; `Kvm.check_extension` accepts any int as well.
"""

from __future__ import annotations

import enum


class Cap(enum.IntEnum):
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    IRQ_ROUTING = 25
    IRQFD = 32
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    XEN_HVM = 38
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    ENABLE_CAP = 54
    XSAVE = 55
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    SYNC_REGS = 74
    KVMCLOCK_CTRL = 76
    READONLY_MEM = 81
    CHECK_EXTENSION_VM = 105
    MULTI_ADDRESS_SPACE = 118
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    COALESCED_PIO = 162
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    X86_USER_SPACE_MSR = 188
    DIRTY_LOG_RING = 192
    EXIT_HYPERCALL = 201
    BINARY_STATS_FD = 203
    DIRTY_LOG_RING_ACQ_REL = 223
    DIRTY_LOG_RING_WITH_BITMAP = 225
    USER_MEMORY2 = 231
    MEMORY_FAULT_INFO = 232
    MEMORY_ATTRIBUTES = 233
    GUEST_MEMFD = 234
    VM_TYPES = 235
    PRE_FAULT_MEMORY = 236
    GUEST_MEMFD_FLAGS = 244


# KVM_CREATE_VM machine types on x86 (KVM_CAP_VM_TYPES is a bitmask of these).
class VmType(enum.IntEnum):
    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4
    TDX = 5


# memslot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# guest_memfd flags
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3


class MemoryAttributes(enum.IntFlag):
    """KVM_SET_MEMORY_ATTRIBUTES bits (KVM_CAP_MEMORY_ATTRIBUTES is the mask a VM supports)."""

    SHARED = 0  # no bit set: the gfn is shared, served from the slot's userspace_addr
    PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE  # served from the slot's guest_memfd

# ioeventfd flags
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

# dirty ring
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # x86, in pages of the vcpu mmap
KVM_PIO_PAGE_OFFSET = 1  # x86, in pages of the vcpu mmap
KVM_COALESCED_MMIO_PAGE_OFFSET = 2  # x86: page 0 kvm_run, 1 PIO data, 2 coalesced MMIO ring

KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
