"""kvmclock: MSR numbers and the pvclock struct KVM writes into guest memory (the oracles that judge
an update are in harness.oracles.kvmclock).

KVM writes `struct pvclock_vcpu_time_info` (Documentation/virt/kvm/x86/msr.rst) through a
gfn_to_pfn_cache into the page the guest named with MSR_KVM_SYSTEM_TIME_NEW. Each update bumps the
version to odd, writes the fields, bumps it to even again, starting from the version it finds *in
the page* (so a freshly mapped zero page restarts at 2). An update that reaches the page mapped now
therefore leaves there an even version above whatever the page held before; a stale cache writes
the old, unmapped page instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_CLOCKSOURCE = 1 << 0
KVM_FEATURE_CLOCKSOURCE2 = 1 << 3
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 1 << 24

PVCLOCK_TSC_STABLE_BIT = 1 << 0
PVCLOCK_GUEST_STOPPED = 1 << 1

# KVM_SET_CLOCK / KVM_GET_CLOCK flags (kvm_clock_data.flags)
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

PVCLOCK_SIZE = 32
_LAYOUT = struct.Struct("<IIQQIbBxx")
assert _LAYOUT.size == PVCLOCK_SIZE


@dataclass(frozen=True)
class Pvclock:
    version: int
    tsc_timestamp: int
    system_time: int
    mul: int
    shift: int
    flags: int

    @classmethod
    def parse(cls, raw: bytes) -> Pvclock:
        """The 32-byte struct as it sits in guest memory."""
        if len(raw) < PVCLOCK_SIZE:
            raise ValueError(f"pvclock needs {PVCLOCK_SIZE} bytes, got {len(raw)}")
        v, _pad, tsc, st, mul, shift, flags = _LAYOUT.unpack(raw[:PVCLOCK_SIZE])
        return cls(v, tsc, st, mul, shift, flags)

    @classmethod
    def from_sync(cls, args: tuple[int, ...]) -> Pvclock:
        """The guest's cmd 2 report (guests/payloads/kvmclock.c)."""
        v, st, tsc, packed = args[:4]
        shift = (packed >> 32) & 0xFF
        return cls(v, tsc, st, packed & 0xFFFFFFFF, shift - 256 if shift > 127 else shift, (packed >> 40) & 0xFF)

    def pack(self) -> bytes:
        return _LAYOUT.pack(self.version, 0, self.tsc_timestamp, self.system_time, self.mul, self.shift,
                            self.flags)

    def time_at(self, tsc: int) -> int:
        """kvmclock nanoseconds at `tsc` (msr.rst: scale the delta, add system_time)."""
        return self.system_time + scale_delta((tsc - self.tsc_timestamp) & (2**64 - 1), self.mul, self.shift)

    def describe(self) -> str:
        return (f"version={self.version} system_time={self.system_time} tsc_timestamp={self.tsc_timestamp:#x} "
                f"mul={self.mul:#x} shift={self.shift} flags={self.flags:#x}")


def scale_delta(delta: int, mul: int, shift: int) -> int:
    delta = delta << shift if shift >= 0 else delta >> -shift
    delta &= 2**64 - 1
    return (delta * mul) >> 32


def enable_value(gpa: int) -> int:
    """MSR_KVM_SYSTEM_TIME_NEW data: 4-byte aligned GPA | enable bit."""
    if gpa & 3:
        raise ValueError(f"pvclock GPA {gpa:#x} is not 4-byte aligned")
    return gpa | 1
