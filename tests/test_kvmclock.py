"""The pvclock layout (harness.x86.kvmclock) and the kvmclock oracles (harness.oracles.kvmclock) fail
on stale, half-written or insane data — without KVM."""

from __future__ import annotations

import random

import pytest

from harness.oracles.kvmclock import guest_time, pvclock_update, untouched_page
from harness.oracles.verdict import OracleFailure
from harness.x86.kvmclock import (
    MSR_KVM_SYSTEM_TIME_NEW,
    PVCLOCK_GUEST_STOPPED,
    PVCLOCK_SIZE,
    Pvclock,
    enable_value,
    scale_delta,
)

GOOD = Pvclock(version=1002, tsc_timestamp=0x10DDF834640, system_time=5_000_000_000, mul=0xC53792B0,
               shift=-1, flags=1)


def test_layout_round_trip():
    raw = GOOD.pack()
    assert len(raw) == PVCLOCK_SIZE == 32
    assert Pvclock.parse(raw) == GOOD
    # msr.rst offsets: version @0, tsc_timestamp @8, system_time @16, mul @24, shift @28, flags @29
    assert raw[0:4] == (1002).to_bytes(4, "little")
    assert raw[16:24] == (5_000_000_000).to_bytes(8, "little")
    assert raw[28] == 0xFF and raw[29] == 1
    assert MSR_KVM_SYSTEM_TIME_NEW == 0x4B564D01


def test_from_sync_unpacks_the_guest_report():
    packed = GOOD.mul | (GOOD.shift & 0xFF) << 32 | GOOD.flags << 40
    p = Pvclock.from_sync((GOOD.version, GOOD.system_time, GOOD.tsc_timestamp, packed, 0, 1))
    assert p == GOOD


def test_scale_delta_matches_msr_rst():
    assert scale_delta(1000, 1 << 31, 0) == 500  # mul 0.5
    assert scale_delta(1000, 1 << 31, 1) == 1000
    assert scale_delta(1000, 1 << 31, -1) == 250
    assert GOOD.time_at(GOOD.tsc_timestamp) == GOOD.system_time


def _guest_scale(delta: int, mul: int, shift: int) -> int:
    """guests/payloads/kvmclock.c's split multiply (no __int128 on i386), mirrored."""
    delta = (delta << shift if shift >= 0 else delta >> -shift) & (2**64 - 1)
    return ((delta >> 32) * mul + (((delta & 0xFFFFFFFF) * mul) >> 32)) & (2**64 - 1)


def test_guest_split_multiply_equals_exact():
    rng = random.Random(4)
    for _ in range(2000):
        d, m, s = rng.getrandbits(48), rng.getrandbits(32), rng.randint(-8, 8)
        assert _guest_scale(d, m, s) == scale_delta(d, m, s)


def test_enable_value():
    assert enable_value(0x1000_0040) == 0x1000_0041
    with pytest.raises(ValueError):
        enable_value(0x1002)


# ---- update oracle -------------------------------------------------------------------------------------
def test_update_good():
    v = pvclock_update(1000, GOOD, clock_lo=5_000_000_000, clock_hi=5_100_000_000)
    assert v.ok and v.facts == {"seeded": 1000, "version": 1002, "system_time": 5_000_000_000}


def test_update_stale_page_not_newer():
    """The page mapped now still holds the host's seed: the update went elsewhere (stale pfn)."""
    stale = Pvclock(1000, 0, 0, 0, 0, 0)
    v = pvclock_update(1000, stale)
    assert any("not newer than the 1000" in x and "stale" in x for x in v.problems)
    assert any("never filled" in x for x in v.problems)
    with pytest.raises(OracleFailure) as ei:
        v.check("backing anon, round 2")
    msg = str(ei.value)
    assert msg.startswith("pvclock update: 2 problems") and "never filled" in msg and "(backing anon, round 2)" in msg


def test_update_older_version_fails():
    assert any("not newer" in x for x in pvclock_update(2000, GOOD).problems)


def test_update_half_written():
    half = Pvclock(1003, GOOD.tsc_timestamp, GOOD.system_time, GOOD.mul, GOOD.shift, GOOD.flags)
    assert any("odd" in x for x in pvclock_update(1000, half).problems)


def test_update_time_outside_the_host_clock():
    old_time = Pvclock(1002, GOOD.tsc_timestamp, 1_000, GOOD.mul, GOOD.shift, GOOD.flags)
    assert any("before the clock" in x for x in pvclock_update(1000, old_time, clock_lo=5_000_000_000).problems)
    assert any("after the clock" in x for x in pvclock_update(1000, GOOD, clock_hi=1_000_000).problems)


def test_update_wants_guest_stopped_after_kvmclock_ctrl():
    p = pvclock_update(1000, GOOD, want_flags=PVCLOCK_GUEST_STOPPED).problems
    assert any("lack 0x2" in x for x in p)
    stopped = Pvclock(1002, GOOD.tsc_timestamp, GOOD.system_time, GOOD.mul, GOOD.shift, 3)
    assert pvclock_update(1000, stopped, want_flags=PVCLOCK_GUEST_STOPPED).ok


# ---- old page oracle ------------------------------------------------------------------------------------------
def test_untouched_old_page():
    page = random.Random(5).randbytes(4096)
    v = untouched_page(page, page)
    assert v.ok and v.facts["changed_words"] == 0


def test_write_into_the_old_page_is_named():
    before = bytearray(4096)
    after = bytearray(before)
    after[0x40:0x60] = GOOD.pack()  # a pvclock landed in the unmapped page
    v = untouched_page(bytes(before), bytes(after), base=1 << 40, what="old page")
    (msg,) = v.problems
    assert "changed after it was unmapped" in msg and "+0x40" in msg and "0x10000000000" in msg
    assert v.facts["changed_words"] == 4
    assert "version=1002" in msg


def test_untouched_length_change():
    assert "length changed" in untouched_page(b"\0" * 8, b"\0" * 16).problems[0]


# ---- guest time oracle ------------------------------------------------------------------------------------------
def test_guest_time_within_host_readings():
    assert guest_time(GOOD, 5_000_000_100, 5_000_000_000, 5_000_001_000, slack_ns=0).ok


def test_guest_time_outside_host_readings():
    assert any("before KVM_GET_CLOCK" in x for x in guest_time(GOOD, 10, 5_000_000_000, 6_000_000_000).problems)
    assert any("after KVM_GET_CLOCK" in x
               for x in guest_time(GOOD, 9_000_000_000, 5_000_000_000, 6_000_000_000).problems)
