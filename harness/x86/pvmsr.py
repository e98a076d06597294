"""KVM's paravirtual MSRs whose guest areas KVM writes through a gfn_to_hva_cache: steal time, PV EOI,
async page faults (Documentation/virt/kvm/x86/msr.rst), and the in-kernel LAPIC's vAPIC word
(KVM_SET_VAPIC_ADDR, api.rst). MSR numbers, enable bits, alignment rules, struct layouts, and
pack/parse helpers; the oracles that judge what KVM wrote are in harness.oracles.pvpages.

What KVM writes, and when (upstream arch/x86/kvm/x86.c, lapic.c):
  - steal time (MSR_KVM_STEAL_TIME, 64-byte aligned GPA | enable): record_steal_time() on a vCPU
    entry after KVM_REQ_STEAL_UPDATE (every vcpu_load, i.e. each KVM_RUN and each reschedule of the
    vCPU task; upstream also each guest write of the MSR, kvm_pvm's MSR write asks for none). It
    reads the version from the page, makes it even, bumps it to odd, adds the task's run_delay growth
    to `steal` (read from the page), bumps the version to even again, and clears `preempted`.
    kvm_steal_time_set_preempted() writes preempted = 1 when the task is preempted in KVM_RUN (and
    skips the write when the cache's slot generation is stale). It never writes `flags` or the padding.
  - PV EOI (MSR_KVM_PV_EOI_EN, 4-byte aligned GPA | enable, bit 1 reserved): with an in-kernel LAPIC,
    on an entry that injected an interrupt when IRR is empty and the vector in service is not one an
    IOAPIC needs an EOI for, KVM writes the byte 1 (the guest may clear it instead of an EOI write);
    on the next exit KVM reads it back and writes 0 if the guest left it set. Whole-byte writes.
  - async PF (MSR_KVM_ASYNC_PF_EN, 64-byte aligned GPA | flags; bits 5:4 reserved): `flags` (+0) on a
    'page not present' injection, `token` (+4) on 'page ready'. Enabling it (with DELIVERY_AS_INT,
    an in-kernel LAPIC) queues a broadcast 'wakeup all' completion, which KVM delivers on the next
    completion check (a write of MSR_KVM_ASYNC_PF_ACK) once the LAPIC is enabled and the token slot is
    free (token == 0): it writes token = 0xffffffff and injects the MSR_KVM_ASYNC_PF_INT vector.
  - vAPIC (KVM_SET_VAPIC_ADDR, needs an in-kernel LAPIC; KVM_CAP_VAPIC): on an entry that processed
    KVM_REQ_EVENT with the LAPIC enabled, KVM writes the u32 TPR | (highest ISR & 0xf0) << 8 |
    highest IRR << 24 (kvm_lapic_sync_to_vapic); on every exit it reads the TPR back from byte 0.

All four are gfn_to_hva_caches (kvm_gfn_to_hva_cache_init + kvm_{read,write}_guest_offset_cached, or
the explicit generation check in record_steal_time), not gfn_to_pfn_caches: they hold the host virtual
address of the slot's memory and compare the memslot generation on each use, so a punched or remapped
page is reached through the process's page tables as it is now, and a memslot change re-resolves the
GPA.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from harness.kvm.cpuid import Cpuid

# ---- MSRs (msr.rst) ----------------------------------------------------------------------------
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_STEAL_TIME = 0x4B564D03
MSR_KVM_PV_EOI_EN = 0x4B564D04
MSR_KVM_POLL_CONTROL = 0x4B564D05
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK = 0x4B564D07

KVM_MSR_ENABLED = 1 << 0

# ---- CPUID leaf 0x40000001 eax (KVM_CPUID_FEATURES) ----------------------------------------------
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_ASYNC_PF = 1 << 4
KVM_FEATURE_STEAL_TIME = 1 << 5
KVM_FEATURE_PV_EOI = 1 << 6
KVM_FEATURE_PV_TLB_FLUSH = 1 << 9
KVM_FEATURE_ASYNC_PF_VMEXIT = 1 << 10
KVM_FEATURE_ASYNC_PF_INT = 1 << 14

FEATURE_NAMES = {
    KVM_FEATURE_ASYNC_PF: "KVM_FEATURE_ASYNC_PF",
    KVM_FEATURE_STEAL_TIME: "KVM_FEATURE_STEAL_TIME",
    KVM_FEATURE_PV_EOI: "KVM_FEATURE_PV_EOI",
    KVM_FEATURE_PV_TLB_FLUSH: "KVM_FEATURE_PV_TLB_FLUSH",
    KVM_FEATURE_ASYNC_PF_VMEXIT: "KVM_FEATURE_ASYNC_PF_VMEXIT",
    KVM_FEATURE_ASYNC_PF_INT: "KVM_FEATURE_ASYNC_PF_INT",
}

# ---- steal time -----------------------------------------------------------------------------------
STEAL_TIME_ALIGN = 64
KVM_STEAL_RESERVED_MASK = 0x3E  # bits 5:1
KVM_VCPU_PREEMPTED = 1 << 0
KVM_VCPU_FLUSH_TLB = 1 << 1
STEAL_TIME_SIZE = 64
_STEAL = struct.Struct("<QIIB3x44x")  # steal, version, flags, preempted, u8_pad[3], pad[11]
assert _STEAL.size == STEAL_TIME_SIZE
ST_STEAL, ST_VERSION, ST_FLAGS, ST_PREEMPTED = 0, 8, 12, 16  # field offsets
ST_WRITTEN = ((ST_STEAL, 8), (ST_VERSION, 4), (ST_PREEMPTED, 1))  # what KVM may write: (offset, size)

# ---- PV EOI ---------------------------------------------------------------------------------------
PV_EOI_ALIGN = 4
PV_EOI_RESERVED = 1 << 1  # bit 1 of the MSR
PV_EOI_AREA = 4  # the guest's 4-byte area; KVM writes its first byte
KVM_PV_EOI_ENABLED = 1  # the byte's bit 0: "the guest may skip the EOI write"

# ---- async PF -------------------------------------------------------------------------------------
ASYNC_PF_ALIGN = 64
KVM_ASYNC_PF_ENABLED = 1 << 0
KVM_ASYNC_PF_SEND_ALWAYS = 1 << 1
KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT = 1 << 2
KVM_ASYNC_PF_DELIVERY_AS_INT = 1 << 3
ASYNC_PF_RESERVED = 0x30  # bits 5:4
KVM_PV_REASON_PAGE_NOT_PRESENT = 1  # apf 'flags'
APF_WAKEUP_ALL_TOKEN = 0xFFFFFFFF  # the broadcast 'page ready' token (kvm_arch_async_page_present)
APF_DATA_SIZE = 64
_APF = struct.Struct("<II56x")
assert _APF.size == APF_DATA_SIZE
APF_FLAGS, APF_TOKEN = 0, 4
APF_VEC_MASK = 0xFF  # MSR_KVM_ASYNC_PF_INT bits 7:0; 63:8 reserved

# ---- vAPIC (KVM_SET_VAPIC_ADDR) --------------------------------------------------------------------
KVM_CAP_VAPIC = 6
VAPIC_SIZE = 4  # the u32 KVM writes


def vapic_word(tpr: int, isr: int, irr: int) -> int:
    """The u32 kvm_lapic_sync_to_vapic writes: TPR, the highest in-service vector's priority class,
    the highest requested vector (-1 counts as 0)."""
    return (tpr & 0xFF) | ((max(isr, 0) & 0xF0) << 8) | ((max(irr, 0) & 0xFF) << 24)


# ---- enable values: the alignment rules, refused here as KVM refuses them --------------------------
def steal_time_value(gpa: int, enable: bool = True) -> int:
    """MSR_KVM_STEAL_TIME data: 64-byte aligned GPA | enable (bits 5:1 reserved)."""
    if gpa % STEAL_TIME_ALIGN:
        raise ValueError(f"steal time GPA {gpa:#x} is not {STEAL_TIME_ALIGN}-byte aligned")
    return gpa | (KVM_MSR_ENABLED if enable else 0)


def pv_eoi_value(gpa: int, enable: bool = True) -> int:
    """MSR_KVM_PV_EOI_EN data: 4-byte aligned GPA | enable (bit 1 reserved)."""
    if gpa % PV_EOI_ALIGN:
        raise ValueError(f"PV EOI GPA {gpa:#x} is not {PV_EOI_ALIGN}-byte aligned")
    return gpa | (KVM_MSR_ENABLED if enable else 0)


def async_pf_value(gpa: int, *, send_always: bool = True, as_int: bool = True, pf_vmexit: bool = False,
                   enable: bool = True) -> int:
    """MSR_KVM_ASYNC_PF_EN data: 64-byte aligned GPA in bits 63:6 | flags (bits 5:4 reserved)."""
    if gpa % ASYNC_PF_ALIGN:
        raise ValueError(f"async PF GPA {gpa:#x} is not {ASYNC_PF_ALIGN}-byte aligned")
    return (gpa | (KVM_ASYNC_PF_ENABLED if enable else 0) | (KVM_ASYNC_PF_SEND_ALWAYS if send_always else 0)
            | (KVM_ASYNC_PF_DELIVERY_AS_INT if as_int else 0)
            | (KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT if pf_vmexit else 0))


def async_pf_int_value(vector: int) -> int:
    """MSR_KVM_ASYNC_PF_INT data: the 'page ready' vector in bits 7:0."""
    if not 32 <= vector <= 255:
        raise ValueError(f"async PF vector {vector} is not an interrupt vector (32..255)")
    return vector


# ---- structs -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StealTime:
    """struct kvm_steal_time (64 bytes): steal @0, version @8, flags @12, preempted @16."""

    steal: int
    version: int
    flags: int = 0
    preempted: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> StealTime:
        if len(raw) < STEAL_TIME_SIZE:
            raise ValueError(f"kvm_steal_time needs {STEAL_TIME_SIZE} bytes, got {len(raw)}")
        steal, version, flags, preempted = _STEAL.unpack(raw[:STEAL_TIME_SIZE])
        return cls(steal, version, flags, preempted)

    @classmethod
    def from_sync(cls, args: tuple[int, ...]) -> StealTime:
        """The pvpages payload's cmd 2 report: (version, steal, flags, preempted, tries)."""
        return cls(args[1], args[0], args[2], args[3])

    def pack_into(self, buf: bytearray, off: int = 0) -> None:
        """Write the four fields at off, leaving the padding as it is in buf."""
        struct.pack_into("<QII", buf, off, self.steal, self.version, self.flags)
        buf[off + ST_PREEMPTED] = self.preempted

    def pack(self) -> bytes:
        return _STEAL.pack(self.steal, self.version, self.flags, self.preempted)

    def describe(self) -> str:
        return f"version={self.version} steal={self.steal} flags={self.flags:#x} preempted={self.preempted:#x}"


@dataclass(frozen=True)
class ApfData:
    """struct kvm_vcpu_pv_apf_data (64 bytes): flags @0, token @4."""

    flags: int
    token: int

    @classmethod
    def parse(cls, raw: bytes) -> ApfData:
        if len(raw) < 8:
            raise ValueError(f"kvm_vcpu_pv_apf_data needs 8 bytes, got {len(raw)}")
        flags, token = struct.unpack_from("<II", raw)
        return cls(flags, token)

    def pack(self) -> bytes:
        return _APF.pack(self.flags, self.token)

    def describe(self) -> str:
        return f"flags={self.flags:#x} token={self.token:#x}"


# ---- what this KVM offers -------------------------------------------------------------------------------
def pv_features(cpuid: Cpuid) -> int:
    """KVM_CPUID_FEATURES eax of a CPUID table (KVM_GET_SUPPORTED_CPUID), 0 without the KVM signature."""
    sig = cpuid.get(KVM_CPUID_SIGNATURE)
    if sig is None:
        return 0
    name = b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx))
    if name != KVM_SIGNATURE or sig.eax < KVM_CPUID_FEATURES:
        return 0
    leaf = cpuid.get(KVM_CPUID_FEATURES)
    return leaf.eax if leaf else 0


def missing_features(features: int, need: int) -> str | None:
    """None when every bit of need is in features, else the reason naming what is missing."""
    lack = need & ~features
    if not lack:
        return None
    names = [n for bit, n in FEATURE_NAMES.items() if lack & bit] or [f"{lack:#x}"]
    return (f"KVM_GET_SUPPORTED_CPUID leaf {KVM_CPUID_FEATURES:#x} eax = {features:#x} lacks "
            + ", ".join(names))
