"""kvmclock oracles: judge a pvclock update KVM made through its gfn_to_pfn_cache, the page it must
no longer write, and the time the guest reads (pure functions over Pvclock values and bytes, so
tests/test_kvmclock.py can feed them stale or missing data).

Each update bumps the version to odd, writes the fields, bumps it to even again, starting from the
version it finds *in the page* (harness.x86.kvmclock has the layout): an update that reaches the page
mapped now leaves there an even version above whatever the page held before; a stale cache writes
the old, unmapped page instead.
"""

from __future__ import annotations

from harness.oracles.verdict import Verdict
from harness.x86.kvmclock import PVCLOCK_SIZE, Pvclock


def pvclock_update(seeded: int, now: Pvclock, *, clock_lo: int | None = None, clock_hi: int | None = None,
                   slack_ns: int = 50_000_000, want_flags: int = 0) -> Verdict:
    """The pvclock found in the page mapped now, after an update was asked for.

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
    return Verdict.of("pvclock update", out, seeded=seeded, version=now.version, system_time=now.system_time)


def untouched_page(before: bytes, after: bytes, base: int = 0, what: str = "old page") -> Verdict:
    """A page the host kept (unmapped from the guest) must still hold what it held then: any change
    is a write through a stale translation. base is the page's GPA/offset for the message. Facts:
    the number of 8-byte words that changed."""
    oracle = "unmapped page untouched"
    if len(before) != len(after):
        return Verdict.of(oracle, [f"{what}: length changed {len(before)} -> {len(after)}"])
    if before == after:  # (the usual case: one compare in C instead of a slice pair per word)
        return Verdict.of(oracle, [], changed_words=0)
    diffs = [i for i in range(0, len(before), 8) if before[i:i + 8] != after[i:i + 8]]
    first = diffs[0]
    msg = (f"{what} at {base:#x} changed after it was unmapped: {len(diffs)} 8-byte words differ, first at "
           f"+{first:#x} ({before[first:first + 8].hex()} -> {after[first:first + 8].hex()})")
    if first + PVCLOCK_SIZE <= len(after):
        # a stale pvclock write starts with the version word: show the struct it would be
        msg += f"; from there it reads as pvclock {Pvclock.parse(after[first:first + PVCLOCK_SIZE]).describe()}"
    return Verdict.of(oracle, [msg], changed_words=len(diffs))


def guest_time(guest: Pvclock, guest_now: int, host_lo: int, host_hi: int,
               slack_ns: int = 50_000_000) -> Verdict:
    """The guest's own reading (kvmclock time computed from the struct and rdtsc) must fall between
    two KVM_GET_CLOCK readings taken before and after the guest ran."""
    out = []
    if guest_now + slack_ns < host_lo:
        out.append(f"guest kvmclock {guest_now} ns is {host_lo - guest_now} ns before KVM_GET_CLOCK "
                   f"before the run ({host_lo}); struct: {guest.describe()}")
    if guest_now > host_hi + slack_ns:
        out.append(f"guest kvmclock {guest_now} ns is {guest_now - host_hi} ns after KVM_GET_CLOCK "
                   f"after the run ({host_hi}); struct: {guest.describe()}")
    return Verdict.of("guest kvmclock time", out, guest_ns=guest_now, host_lo=host_lo, host_hi=host_hi)
