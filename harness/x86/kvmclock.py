"""kvmclock: MSR numbers, the pvclock struct KVM writes into guest memory, and the oracles that judge
an update (pure functions, so tests/test_kvmclock.py can feed them stale or missing data).

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


def update_problems(seeded: int, now: Pvclock, *, clock_lo: int | None = None,
                    clock_hi: int | None = None, slack_ns: int = 50_000_000,
                    want_flags: int = 0) -> list[str]:
    """What is wrong with the pvclock found in the page mapped now, after an update was asked for.

    seeded: the version the host put into that page before asking (its RMW starts there).
    clock_lo/clock_hi: kvmclock (KVM_GET_CLOCK / KVM_SET_CLOCK) bounds around the update: the
    struct's system_time must lie between them (with slack_ns for the backend's own clock steps).
    want_flags: PVCLOCK_* bits that must be set (e.g. GUEST_STOPPED after KVM_KVMCLOCK_CTRL).
    """
    out = []
    if now.version & 1:
        out.append(f"version {now.version} is odd: an update was left half-written")
    if now.version <= seeded:
        out.append(f"version {now.version} is not newer than the {seeded} the host seeded: no update "
                   "reached the page mapped now (stale gfn_to_pfn_cache?)")
    if now.mul == 0:
        out.append("tsc_to_system_mul is 0: the struct was never filled")
    if clock_lo is not None and now.system_time + slack_ns < clock_lo:
        out.append(f"system_time {now.system_time} is before the clock the host set/read ({clock_lo}, "
                   f"slack {slack_ns} ns)")
    if clock_hi is not None and now.system_time > clock_hi + slack_ns:
        out.append(f"system_time {now.system_time} is after the clock the host read afterwards ({clock_hi}, "
                   f"slack {slack_ns} ns)")
    if want_flags and (now.flags & want_flags) != want_flags:
        out.append(f"flags {now.flags:#x} lack {want_flags:#x}")
    return out


def untouched_problems(before: bytes, after: bytes, base: int = 0, what: str = "old page") -> list[str]:
    """Differences between a page the host kept (unmapped from the guest) and its content now: any
    change is a write through a stale translation. base is the page's GPA/offset for the message."""
    if len(before) != len(after):
        return [f"{what}: length changed {len(before)} -> {len(after)}"]
    diffs = [i for i in range(0, len(before), 8) if before[i:i + 8] != after[i:i + 8]]
    if not diffs:
        return []
    first = diffs[0]
    msg = (f"{what} at {base:#x} changed after it was unmapped: {len(diffs)} 8-byte words differ, first at "
           f"+{first:#x} ({before[first:first + 8].hex()} -> {after[first:first + 8].hex()})")
    if first + PVCLOCK_SIZE <= len(after):
        # a stale pvclock write starts with the version word: show the struct it would be
        msg += f"; from there it reads as pvclock {Pvclock.parse(after[first:first + PVCLOCK_SIZE]).describe()}"
    return [msg]


def guest_time_problems(guest: Pvclock, guest_now: int, host_lo: int, host_hi: int,
                        slack_ns: int = 50_000_000) -> list[str]:
    """The guest's own reading (kvmclock time computed from the struct and rdtsc) must fall between
    two KVM_GET_CLOCK readings taken before and after the guest ran."""
    out = []
    if guest_now + slack_ns < host_lo:
        out.append(f"guest kvmclock {guest_now} ns is {host_lo - guest_now} ns before KVM_GET_CLOCK "
                   f"before the run ({host_lo}); struct: {guest.describe()}")
    if guest_now > host_hi + slack_ns:
        out.append(f"guest kvmclock {guest_now} ns is {guest_now - host_hi} ns after KVM_GET_CLOCK "
                   f"after the run ({host_hi}); struct: {guest.describe()}")
    return out
