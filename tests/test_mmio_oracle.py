"""The MMIO oracle (harness.oracles.mmio) rejects every wrong report, with a message that says how.

Synthetic exits only (no KVM): the matrix's GPAs reported truncated to 32 bits or to MAXPHYADDR-1
bits, wrong lengths, directions, data, missing/extra/reordered exits, and coalesced ring entries.
"""

from __future__ import annotations

import mmap

import pytest

from harness.kvm._cffi import ffi
from harness.kvm.caps import KVM_COALESCED_MMIO_PAGE_OFFSET as COALESCED_MMIO_PAGE_OFFSET
from harness.kvm.exits import CoalescedMmio, Mmio
from harness.kvm.vcpu import Vcpu
from harness.lib.failures import Livelock
from harness.oracles.mmio import (
    Access,
    MmioDevice,
    MmioMismatch,
    explain_address,
    matrix_gpas,
    mmio_exit,
    mmio_exits,
    pattern,
    pattern_byte,
    read,
    split_access,
    straddle_pairs,
    truncations,
    write,
)
from harness.oracles.verdict import OracleFailure

MAXPHYADDRS = (36, 39, 46, 48, 52)


def _mmio(gpa: int, n: int, is_write: bool, data: bytes = b"") -> Mmio:
    return Mmio(gpa, data.ljust(8, b"\0"), n, is_write)


def _trunc32(gpa: int) -> int:
    return gpa & 0xFFFF_FFFF


def _trunc_m1(gpa: int, m: int) -> int:
    return gpa & ((1 << (m - 1)) - 1)


def _all_gpas(m: int) -> list[int]:
    """Every GPA an exit of the matrix carries: the access GPAs and both sides of each straddle."""
    out = list(matrix_gpas(m))
    for a, b in straddle_pairs(m):
        out += [a + 0xFFC, a + 0xFF8, b, b + 4]
    return out


# ---- truncated addresses ---------------------------------------------------------------------------
@pytest.mark.parametrize("m", MAXPHYADDRS)
@pytest.mark.parametrize("is_write", [False, True], ids=["read", "write"])
def test_truncated_to_32_bits_is_rejected_and_named(m: int, is_write: bool) -> None:
    caught = 0
    for gpa in _all_gpas(m):
        bad = _trunc32(gpa)
        if bad == gpa:
            continue  # below 4 GiB: truncation to 32 bits is no change
        data = b"\x11\x22\x33\x44\x55\x66\x77\x88" if is_write else b""
        want = Access(gpa, 8, is_write, data if is_write else None)
        mmio_exit(_mmio(gpa, 8, is_write, data), want, maxphyaddr=m).check()  # the exact exit passes
        with pytest.raises(MmioMismatch) as ei:
            mmio_exit(_mmio(bad, 8, is_write, data), want, maxphyaddr=m).check("probe")
        msg = str(ei.value)
        assert "truncated to 32 bits" in msg, msg
        assert f"{bad:#x}" in msg and f"{gpa:#x}" in msg and "(probe)" in msg, msg
        assert len(ei.value.problems) == 1, ei.value.problems  # only the address is wrong
        caught += 1
    assert caught >= 4, "the matrix must have GPAs above 4 GiB"


@pytest.mark.parametrize("m", MAXPHYADDRS)
def test_truncated_to_maxphyaddr_minus_1_bits_is_rejected_and_named(m: int) -> None:
    caught = 0
    for gpa in _all_gpas(m):
        bad = _trunc_m1(gpa, m)
        if bad == gpa:
            continue  # bit MAXPHYADDR-1 clear: that truncation is no change
        want = read(gpa, 4)
        with pytest.raises(MmioMismatch) as ei:
            mmio_exit(_mmio(bad, 4, False), want, maxphyaddr=m).check()
        msg = str(ei.value)
        assert f"truncated to MAXPHYADDR-1 = {m - 1} bits" in msg, msg
        assert f"bit {m - 1} lost" in msg, msg
        caught += 1
    # the last page below MAXPHYADDR (and the straddle into it) have bit MAXPHYADDR-1 set
    assert caught >= 3


@pytest.mark.parametrize("m", MAXPHYADDRS)
def test_matrix_is_sensitive_to_both_truncations(m: int) -> None:
    """Every GPA above 4 GiB changes under 32-bit truncation; the top ones under MAXPHYADDR-1."""
    gpas = matrix_gpas(m)
    top = 1 << m
    fixed = [g for g in (0xFFFF_FFF8, 1 << 32, 1 << 36, 1 << 40) if g < top - 0x1000]
    assert gpas == [*fixed, top - 0x1000, top - 8]
    assert all(g + 8 <= top for g in gpas), "no matrix GPA reaches past MAXPHYADDR"
    assert [g for g in gpas if _trunc32(g) == g] == [0xFFFF_FFF8]
    assert [g for g in gpas if _trunc_m1(g, m) != g] == [top - 0x1000, top - 8]
    for a, b in straddle_pairs(m):
        assert b == a + 0x1000 and (b % (1 << 32) == 0 or b == top - 0x1000 or b in (1 << 36, 1 << 40))


def test_truncated_coalesced_entry_is_rejected() -> None:
    gpa = (1 << 48) - 0x1000 + 8
    data = (0xCAFE).to_bytes(8, "little")
    good = CoalescedMmio(gpa, 4, data)
    mmio_exits([good], [write(gpa, 0xCAFE, 4)], maxphyaddr=48).check()
    for bad in (_trunc32(gpa), _trunc_m1(gpa, 48)):
        with pytest.raises(MmioMismatch) as ei:
            mmio_exits([CoalescedMmio(bad, 4, data)], [write(gpa, 0xCAFE, 4)], maxphyaddr=48).check(
                "coalesced MMIO ring entries")
        assert "truncated to" in str(ei.value) and "coalesced MMIO ring entries" in str(ei.value)


def test_device_answers_differ_for_truncated_addresses() -> None:
    """A read reported at a truncated GPA gets other bytes, so the guest's own check fails too."""
    for m in MAXPHYADDRS:
        for gpa in _all_gpas(m):
            for bad in {_trunc32(gpa), _trunc_m1(gpa, m)} - {gpa}:
                for n in (1, 2, 4, 8):
                    assert pattern(gpa, n) != pattern(bad, n), (hex(gpa), hex(bad), n)


@pytest.mark.parametrize("gpa", [0, 0xFFFF_F000, 0xFFFF_FFFF_F000, (1 << 64) - 5, 0x5A5A_0000_1234_5000])
def test_pattern_in_c_is_the_reference(gpa: int) -> None:
    """pattern() (C, kh_pattern_bytes) is pattern_byte() (the splitmix64 reference) byte for byte,
    across the 2^64 wrap too."""
    n = 4096 + 3
    want = bytes(pattern_byte((gpa + i) & ((1 << 64) - 1)) for i in range(n))
    assert pattern(gpa, n) == want
    assert pattern(gpa, 0) == b""


# ---- wrong length, direction, data ---------------------------------------------------------------
GPA = 0xFFFF_FFFF_F000


@pytest.mark.parametrize("got_len", [1, 2, 4])
def test_wrong_len_is_rejected(got_len: int) -> None:
    with pytest.raises(MmioMismatch) as ei:
        mmio_exit(_mmio(GPA, got_len, False), read(GPA, 8), maxphyaddr=48).check()
    assert f"len {got_len} != 8" in str(ei.value)
    assert "phys_addr" not in str(ei.value).split("got:")[1].split("\n", 1)[1]


def test_write_reported_as_read_and_read_as_write_are_rejected() -> None:
    with pytest.raises(MmioMismatch) as ei:
        mmio_exit(_mmio(GPA, 4, False), write(GPA, 0x1234, 4), maxphyaddr=48).check()
    assert "KVM reported a read where the guest made a write" in str(ei.value)
    with pytest.raises(MmioMismatch) as ei:
        mmio_exit(_mmio(GPA, 4, True, b"\1\2\3\4"), read(GPA, 4), maxphyaddr=48).check()
    assert "KVM reported a write where the guest made a read" in str(ei.value)


@pytest.mark.parametrize("data,why", [
    (bytes.fromhex("8877665544332211"), "byte-swapped"),
    (bytes(8), "all zero"),
    (bytes.fromhex("1122334455667789"), "bytes [7] differ"),
])
def test_wrong_write_data_is_rejected(data: bytes, why: str) -> None:
    want = write(GPA, bytes.fromhex("1122334455667788"))
    with pytest.raises(MmioMismatch) as ei:
        mmio_exit(_mmio(GPA, 8, True, data), want, maxphyaddr=48).check()
    msg = str(ei.value)
    assert why in msg and data.hex() in msg and "1122334455667788" in msg, msg


def test_only_len_bytes_of_data_count() -> None:
    """Bytes of kvm_run.mmio.data beyond len are stale: they must not decide the verdict."""
    assert mmio_exit(Mmio(GPA, b"\xaa\xbb\xff\xff\xff\xff\xff\xff", 2, True), write(GPA, 0xBBAA, 2),
                     maxphyaddr=48).ok


def test_other_address_errors_are_explained() -> None:
    assert explain_address(GPA + 8, GPA, 48) == "differs in bit 3; same page, wrong offset"
    assert "right page offset, wrong page frame" in explain_address(GPA - 0x1000, GPA, 48)
    assert "beyond MAXPHYADDR 48" in explain_address(GPA | 1 << 50, GPA, 48)
    assert "the page frame (offset lost)" in explain_address(GPA, GPA + 0x10, 48)
    assert truncations(GPA, 48)["32 bits"] == 0xFFFF_F000


# ---- sequences ---------------------------------------------------------------------------------
def _seq(gpa: int) -> list[Access]:
    return [read(gpa, 4), write(gpa, 5, 4)]


def test_sequence_missing_extra_and_reordered_exits_are_rejected() -> None:
    good = [_mmio(GPA, 4, False), _mmio(GPA, 4, True, b"\5\0\0\0")]
    v = mmio_exits(good, _seq(GPA), maxphyaddr=48)
    assert v.check() is v and v.facts == {"exits": 2, "accesses": 2}
    with pytest.raises(MmioMismatch) as ei:
        mmio_exits(good[:1], _seq(GPA), maxphyaddr=48).check("add")
    assert "1 exits where the guest's accesses need 2" in str(ei.value) and "(add)" in str(ei.value)
    with pytest.raises(MmioMismatch) as ei:
        mmio_exits([*good, good[1]], _seq(GPA), maxphyaddr=48).check()
    assert "3 exits" in str(ei.value) and ei.value.verdict.facts == {"exits": 3, "accesses": 2}
    with pytest.raises(MmioMismatch) as ei:
        mmio_exits(good[::-1], _seq(GPA), maxphyaddr=48).check()
    assert "exit #0: is_write True != False" in str(ei.value)
    assert mmio_exits([], [], maxphyaddr=48).check().ok
    with pytest.raises(MmioMismatch) as ei:
        mmio_exits(good, [], maxphyaddr=48).check("RAM store")
    assert "(no exit)" in str(ei.value) and "RAM store" in str(ei.value)


def test_mismatch_is_an_oracle_failure_that_shows_both_sides() -> None:
    """MmioMismatch is the OracleFailure of an MMIO verdict: the message lists the guest's accesses
    and KVM's exits before the problems, and a guest failure that followed is kept after them."""
    want = [read(GPA, 4)]
    v = mmio_exits([_mmio(GPA + 8, 4, False)], want, maxphyaddr=48)
    with pytest.raises(OracleFailure) as ei:
        v.check("load")
    assert isinstance(ei.value, MmioMismatch) and ei.value.problems == list(v.problems)
    lines = str(ei.value).split("\n")
    assert lines[0] == "MMIO exits: 1 problem"
    assert lines[1:5] == ["  expected:", f"    #0 read of 4 bytes at {GPA:#x}", "  got:",
                          f"    #0 read of 4 bytes at {GPA + 8:#x}"]
    assert lines[5].startswith("  - exit #0: phys_addr") and lines[6] == "  (load)"
    e = MmioMismatch(v, "load", then="  and then the guest failed:\n    GUEST_ASSERT at guest.c:12")
    assert str(e).startswith(str(ei.value)) and str(e).endswith("GUEST_ASSERT at guest.c:12")
    assert e.problems == list(v.problems)


def test_sequence_names_the_truncated_fragment() -> None:
    """A page straddle across 4 GiB: the second fragment reported at 0 (truncated) is named."""
    frags = split_access([(0xFFFF_FFFC, 4), (1 << 32, 4)], True, bytes(range(1, 9)))
    got = [_mmio(0xFFFF_FFFC, 4, True, bytes([1, 2, 3, 4])), _mmio(0, 4, True, bytes([5, 6, 7, 8]))]
    with pytest.raises(MmioMismatch) as ei:
        mmio_exits(got, frags, maxphyaddr=48).check()
    assert "exit #1: phys_addr 0x0 != 0x100000000: the GPA truncated to 32 bits" in str(ei.value)
    assert len(ei.value.problems) == 1


def test_access_rejects_data_of_the_wrong_length() -> None:
    with pytest.raises(ValueError):
        Access(GPA, 4, True, b"\1\2")


# ---- device model, coalesced ring, livelock report ---------------------------------------------
class _FakeVcpu:
    id = 0
    completed: list[bytes]

    def __init__(self) -> None:
        self.completed = []
        self.vm = type("V", (), {"guest": None})()

    def complete_mmio(self, data: bytes) -> None:
        self.completed.append(data)

    def dump_state(self) -> str:
        return "rip=0x200123 (fake)"


def test_device_answers_reads_from_the_reported_address_and_logs() -> None:
    v = _FakeVcpu()
    dev = MmioDevice()
    assert dev(v, _mmio(GPA, 8, False)) is True
    assert dev(v, _mmio(GPA, 2, True, b"\1\2")) is True
    assert dev(v, CoalescedMmio(GPA, 2, b"")) is False  # not an exit it handles
    assert v.completed == [pattern(GPA, 8)]
    assert [e.len for e in dev.take()] == [8, 2] and dev.log == []


def test_coalesced_ring_is_drained_in_order_across_the_wrap() -> None:
    """Vcpu.coalesced_mmio() on a synthetic vCPU mapping: entries first..last (wrapping at the
    ring's capacity) come out in order, and `first` is handed back to KVM."""
    page = mmap.PAGESIZE
    v = Vcpu.__new__(Vcpu)
    v.id = 0
    v._mm = bytearray((COALESCED_MMIO_PAGE_OFFSET + 1) * page)
    v._run_buf = ffi.from_buffer(v._mm)
    off = COALESCED_MMIO_PAGE_OFFSET * page
    ring = ffi.cast("struct kvm_coalesced_mmio_ring *", ffi.cast("char *", v._run_buf) + off)
    cap = (page - 8) // 24
    assert cap == 170
    for k, i in enumerate([cap - 2, cap - 1, 0]):
        e = ring.coalesced_mmio[i]
        e.phys_addr, e.len = GPA + 8 * k, 4
        ffi.memmove(e.data, bytes([k + 1] * 8), 8)
    ring.first, ring.last = cap - 2, 1
    got = v.coalesced_mmio()
    assert [(e.phys_addr, e.len, e.data[:4]) for e in got] == [
        (GPA + 8 * k, 4, bytes([k + 1] * 4)) for k in range(3)]
    assert ring.first == 1 and v.coalesced_mmio() == []


def test_livelock_message_names_rip_gpa_and_count() -> None:
    ex = _mmio(GPA + 0x20, 4, False)
    e = Livelock(_FakeVcpu(), 0x200123, 300, "detail here", gpa=GPA + 0x20, last_exit=ex)
    msg = str(e)
    assert "300 exits at rip=0x200123, gpa=0xfffffffff020 without progress (no ucall); detail here" in msg
    assert "last exit: MMIO(" in msg and "rip=0x200123 (fake)" in msg
    assert (e.rip, e.gpa, e.count) == (0x200123, GPA + 0x20, 300)
