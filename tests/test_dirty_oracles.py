"""The dirty-tracking and write-back oracles (harness.oracles.dirty) fail on stale or missing data, and
the dirty-ring reader (harness.kvm.dirty) follows KVM's protocol — all without KVM."""

from __future__ import annotations

import mmap
import os
import random
import struct
from array import array

import pytest

from harness.kvm._cffi import ffi
from harness.kvm.caps import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_LOG_PAGE_OFFSET
from harness.kvm.dirty import (
    PAGE,
    DirtyRing,
    bitmap_page_array,
    bitmap_pages,
    dirty_value,
    page_array_bitmap,
    pages_bitmap,
    word_offset,
)
from harness.kvm.errors import HarnessError
from harness.oracles.dirty import (
    dirty_pages,
    disk_contents,
    first_writes,
    full_exit_repushes,
    migration_copy,
    ranges,
    repeats,
    ring_order,
)
from harness.oracles.verdict import OracleFailure


# ---- bitmaps ------------------------------------------------------------------------------------
def test_bitmap_round_trip():
    rng = random.Random(1)
    for npages in (1, 63, 64, 65, 1000, 262144):
        pages = set(rng.sample(range(npages), min(npages, 50)))
        bm = pages_bitmap(pages, npages)
        assert len(bm) == (npages + 63) // 64 * 8
        assert bitmap_pages(bm, npages) == pages


def test_bitmap_layout_is_kvms():
    # bit i of little-endian u64 word i // 64
    assert bitmap_pages(struct.pack("<QQ", 1 << 3, 1 << 63)) == {3, 127}
    assert pages_bitmap([0, 64], 128) == struct.pack("<QQ", 1, 1)
    assert bitmap_pages(struct.pack("<Q", 0b1011), npages=2) == {0, 1}  # bits past the slot ignored
    with pytest.raises(ValueError):
        pages_bitmap([128], 128)


def test_bitmap_walked_in_c_agrees_with_python():
    rng = random.Random(2)
    for npages in (1, 63, 64, 65, 1000, 8192, 262144):
        pages = set(rng.sample(range(npages), min(npages, rng.choice((0, 1, 50, npages)))))
        bm = pages_bitmap(pages, npages)
        got = bitmap_page_array(bm, npages)
        assert got.typecode == "I" and list(got) == sorted(pages)  # ascending, each once
        assert bytes(ffi.buffer(page_array_bitmap(got, npages))) == bm
    # bits past the slot's last page are not pages of the slot
    assert list(bitmap_page_array(struct.pack("<Q", 0b1011), 2)) == [0, 1]
    with pytest.raises(ValueError, match="page 128 is outside a slot of 128 pages"):
        page_array_bitmap(array("I", [3, 128]), 128)
    with pytest.raises(HarnessError, match="cannot hold"):
        bitmap_page_array(b"\0" * 8, 65)


def test_ranges():
    assert ranges([5, 1, 2, 3, 9]) == "1-3, 5, 9"
    assert ranges([]) == "none"
    assert "more pages" in ranges(range(0, 100, 2), limit=3)


# ---- exact-set oracle ------------------------------------------------------------------------------
def test_exact_set_passes_exact():
    v = dirty_pages([1, 2, 3], {3, 2, 1})
    assert v.ok and v.check() is v and v.facts["written"] == v.facts["reported"] == 3


def test_exact_set_names_missing_pages_and_gpa():
    v = dirty_pages([1, 2, 3, 70], [1, 3], gpa=1 << 40)
    assert not v.ok and v.facts["missing"] == (2, 70) and v.facts["extra"] == ()
    (msg,) = v.problems
    assert "NOT reported" in msg and "2, 70" in msg and "0x10000002000" in msg and "lost data" in msg
    with pytest.raises(OracleFailure) as ei:
        v.check("get round 2, seed 7")
    assert str(ei.value).startswith("dirty log: 1 problem") and "0x10000002000" in str(ei.value)
    assert "(get round 2, seed 7)" in str(ei.value)


def test_exact_set_flags_extra_unless_allowed():
    v = dirty_pages([1], [1, 5, 6])
    assert not v.ok and v.facts["extra"] == (5, 6) and "did not write" in v.problems[0]
    assert dirty_pages([1], [1, 5, 6], allowed_extra=[5, 6]).ok
    # an allowance never excuses a missing page
    assert not dirty_pages([1, 2], [1, 5], allowed_extra=[5]).ok


def test_stale_log_from_an_earlier_round_fails():
    """A log that still shows round 1's pages (never cleared) when round 2 wrote others."""
    r1, r2 = [1, 2, 3], [7, 8]
    v = dirty_pages(r2, set(r1))
    assert v.facts["missing"] == (7, 8) and v.facts["extra"] == (1, 2, 3) and len(v.problems) == 2


# ---- ring order ----------------------------------------------------------------------------------------
def test_ring_order_exact():
    v = ring_order([5, 1, 9, 5], [5, 1, 9])
    assert v.ok and v.facts == {"entries": 3, "repeats": 0, "repushes": 0}
    assert first_writes([3, 1, 3, 2, 1]) == [3, 1, 2]


def test_ring_order_missing_and_extra():
    p = ring_order([5, 1, 9], [5, 9, 4], gpa=0x1000).problems
    assert any("never pushed" in x and "1" in x for x in p)
    assert any("did not write" in x and "4" in x for x in p)


def test_ring_order_reordered():
    v = ring_order([5, 1, 9], [1, 5, 9])
    (msg,) = v.problems
    assert "out of order" in msg and "[1, 5, 9]" in msg
    with pytest.raises(OracleFailure, match="dirty ring order: 1 problem"):
        v.check("round 1")


def test_ring_repeats_bounded_by_writes():
    # a page rewritten while dirty may come again, as often as it was written, never more
    v = ring_order([5, 1, 5], [5, 1, 5])
    assert v.ok and v.facts["repeats"] == 1
    (msg,) = ring_order([5, 1], [5, 1, 5]).problems
    assert "more often than allowed" in msg and "page 5: 2 entries for 1 guest writes" in msg
    (msg,) = ring_order([5, 1, 5], [5, 1, 5], allow_repeats=False).problems
    assert "repeats not allowed" in msg
    assert repeats([5, 1, 5, 5]) == 2


# ---- live-migration oracle -------------------------------------------------------------------------------
def test_migration_oracle_passes_equal_copies():
    src = bytes(random.Random(2).randbytes(8 * PAGE))
    v = migration_copy(src, bytearray(src))
    assert v.ok and v.facts == {"pages": 8, "differing": 0}


def test_migration_oracle_names_the_page_with_a_lost_write():
    src = bytearray(8 * PAGE)
    dst = bytearray(src)
    o = 5 * PAGE + word_offset(5)
    src[o:o + 8] = dirty_value(3, 5).to_bytes(8, "little")  # written, never copied
    v = migration_copy(bytes(src), bytes(dst), gpa=1 << 40)
    (msg,) = v.problems
    head, detail = msg.split("\n")
    assert "1 pages differ" in head and "pages 5" in head and v.facts["differing"] == 1
    assert f"GPA {(1 << 40) + 5 * PAGE:#x}" in detail and f"+{word_offset(5):#x}" in detail
    assert f"{dirty_value(3, 5):#x}" in detail
    with pytest.raises(OracleFailure) as ei:
        v.check("seed 9")
    assert f"{dirty_value(3, 5):#x}" in str(ei.value) and "(seed 9)" in str(ei.value)


def test_migration_oracle_shows_at_most_limit_pages():
    src, dst = bytes(8 * PAGE), bytes([1]) * (8 * PAGE)
    (msg,) = migration_copy(src, dst, limit=2).problems
    assert "8 pages differ" in msg and len(msg.split("\n")) == 3
    assert "bytes" in migration_copy(src, dst[:PAGE]).problems[0]


def test_migration_oracle_stale_copy_of_older_round():
    src = bytearray(4 * PAGE)
    dst = bytearray(4 * PAGE)
    for rnd, d in ((2, src), (1, dst)):  # the copy holds round 1, the guest wrote round 2
        for pg in range(4):
            o = pg * PAGE + word_offset(pg)
            d[o:o + 8] = dirty_value(rnd, pg).to_bytes(8, "little")
    assert "4 pages differ" in migration_copy(bytes(src), bytes(dst)).problems[0]


# ---- write-back oracle ---------------------------------------------------------------------------------------
def test_disk_oracle_passes_what_was_written():
    data = random.Random(3).randbytes(4 * PAGE)
    v = disk_contents(data, data)
    assert v.ok and v.facts == {"pages": 4, "stale": 0, "not_on_disk": 0}


def test_disk_oracle_names_stale_pages():
    want = bytearray(4 * PAGE)
    want[2 * PAGE + 16:2 * PAGE + 24] = (0xABCD).to_bytes(8, "little")
    v = disk_contents(bytes(4 * PAGE), bytes(want), gpa=0x1000_0000, what="disk (O_DIRECT read)")
    (msg,) = v.problems
    assert "1 of 4 pages" in msg and "pages 2" in msg and v.facts["stale"] == 1
    assert "file offset 0x2010" in msg and "GPA 0x10002010" in msg and "0xabcd" in msg
    with pytest.raises(OracleFailure) as ei:
        v.check("round 2")
    assert str(ei.value).startswith("disk (O_DIRECT read): 1 problem") and "(round 2)" in str(ei.value)


def test_disk_oracle_names_ranges_never_written():
    data = bytes(2 * PAGE)
    (msg,) = disk_contents(data, data, not_on_disk=[(PAGE, 2 * PAGE)], gpa=1 << 40).problems
    assert "no written extent" in msg and "0x1000-0x2000" in msg
    assert "expected" in disk_contents(data, data[:PAGE]).problems[0]


# ---- the dirty ring reader -----------------------------------------------------------------------------------------
class _FakeVcpu:
    """A memfd standing in for the vCPU fd: the ring sits at KVM_DIRTY_LOG_PAGE_OFFSET pages."""

    def __init__(self, entries: int) -> None:
        self.fd = os.memfd_create("fake-vcpu")
        self.off = KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE
        os.ftruncate(self.fd, self.off + entries * 16)
        self.mm = mmap.mmap(self.fd, entries * 16, offset=self.off)
        self.entries = entries
        self.next = 0

    def push(self, slot: int, offset: int) -> None:
        """What KVM does: fill slot and offset, then publish flags = DIRTY."""
        i = self.next % self.entries
        struct.pack_into("<IIQ", self.mm, i * 16, 0, slot, offset)
        struct.pack_into("<I", self.mm, i * 16, KVM_DIRTY_GFN_F_DIRTY)
        self.next += 1

    def flags(self, i: int) -> int:
        return struct.unpack_from("<I", self.mm, (i % self.entries) * 16)[0]

    def reset(self, i: int) -> None:
        """KVM_RESET_DIRTY_RINGS: entries marked RESET become free again."""
        assert self.flags(i) == KVM_DIRTY_GFN_F_RESET
        struct.pack_into("<I", self.mm, (i % self.entries) * 16, 0)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


def test_dirty_ring_harvest_protocol():
    v = _FakeVcpu(256)
    ring = DirtyRing(v, 256)  # type: ignore[arg-type]
    try:
        assert ring.harvest() == []
        for o in (7, 3, 9):
            v.push(1, o)
        assert ring.harvest() == [(1, 7), (1, 3), (1, 9)]
        assert [v.flags(i) for i in range(3)] == [KVM_DIRTY_GFN_F_RESET] * 3  # handed back
        assert ring.harvest() == []  # RESET entries are not harvested twice
        for i in range(3):
            v.reset(i)
        # 300 more, harvested 100 at a time: the indexes wrap around the 256 entries
        since: list[tuple[int, int]] = []
        for k in range(300):
            v.push(2, k)
            since.append((2, k))
            if k % 100 == 99:
                assert ring.harvest() == since
                for i in range(ring.fetch - len(since), ring.fetch):
                    v.reset(i)
                since = []
        assert ring.harvested == 303
    finally:
        ring.close()
        v.close()


def test_dirty_ring_harvest_arrays_and_limit():
    v = _FakeVcpu(256)
    ring = DirtyRing(v, 256)  # type: ignore[arg-type]
    try:
        for o in range(10):
            v.push(3, 100 + o)
        slots, offs = ring.harvest_arrays(limit=4)
        assert (slots.typecode, offs.typecode) == ("I", "Q")
        assert list(slots) == [3] * 4 and list(offs) == [100, 101, 102, 103]
        assert v.flags(4) == KVM_DIRTY_GFN_F_DIRTY  # past the limit: untouched
        assert ring.harvest() == [(3, 100 + o) for o in range(4, 10)]
        assert ring.harvested == 10 and ring.fetch == 10
    finally:
        ring.close()
        v.close()


def test_dirty_ring_refuses_dirty_and_reset():
    v = _FakeVcpu(256)
    ring = DirtyRing(v, 256)  # type: ignore[arg-type]
    try:
        struct.pack_into("<IIQ", v.mm, 0, KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET, 1, 0)
        v.push(1, 5)  # entry 0 is DIRTY|RESET (written below), entry 1 fine: the error names entry 0
        struct.pack_into("<IIQ", v.mm, 0, KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET, 1, 0)
        with pytest.raises(HarnessError, match="entry 0 has flags 0x3: DIRTY\\|RESET"):
            ring.harvest()
        assert ring.fetch == 0
    finally:
        ring.close()
        v.close()


def test_dirty_ring_size_must_be_power_of_two():
    v = _FakeVcpu(256)
    try:
        with pytest.raises(HarnessError):
            DirtyRing(v, 300)  # type: ignore[arg-type]
    finally:
        v.close()


# ---- the disk read behind the write-back oracle (needs root for the loop mount) ------------------------------
def test_disk_read_sees_unsynced_and_stale_data():
    """Through a real MAP_SHARED file on ext4-on-loop: data written but not synced is not on disk,
    a rewrite without sync leaves the old data on disk (the oracle names those pages), and after
    msync the disk matches. An O_DIRECT read of the file would have flushed instead."""
    import shutil

    from harness import memory
    from harness.memory import hostmem
    from harness.memory.loopfs import DiskReadUnavailable, read_on_disk
    from harness.memory.mounts import Mounts

    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
        pytest.skip("needs root, mkfs.ext4 and losetup for an ext4-on-loop mount")
    size = 16 * PAGE
    with Mounts() as m:
        try:
            b = memory.create("file", size, mounts=m)
        except memory.BackingUnavailable as e:
            pytest.skip(str(e))
        try:
            first = bytes([1]) * size
            b.write(0, first)
            try:
                disk, missing = read_on_disk(b.fd, b.path, 0, size)
            except DiskReadUnavailable as e:
                pytest.skip(str(e))
            assert missing == [(0, size)], "unsynced data already has a written extent"
            assert any("no written extent" in p for p in disk_contents(disk, first, not_on_disk=missing).problems)
            hostmem.msync(b.addr, size)
            disk, missing = read_on_disk(b.fd, b.path, 0, size)
            assert missing == [] and disk_contents(disk, first).ok
            second = bytearray(first)
            second[3 * PAGE:4 * PAGE] = bytes([2]) * PAGE
            b.write(0, bytes(second))  # dirty in the page cache only
            disk, _ = read_on_disk(b.fd, b.path, 0, size)
            (msg,) = disk_contents(disk, bytes(second)).problems
            assert "pages 3" in msg and "1 of 16 pages" in msg
            hostmem.msync(b.addr, size)
            assert disk_contents(read_on_disk(b.fd, b.path, 0, size)[0], bytes(second)).ok
        finally:
            b.close()


def test_ring_full_exit_repush_only_right_after_the_reset():
    """The write a ring-full exit interrupted is pushed again as the first entry after the reset
    (KVM pushed it when the fault made the page writable; the write retires after the resume)."""
    harvested = [5, 1, 9, 9, 4]  # full exit after 3 entries; 9 comes again right after the reset
    assert full_exit_repushes(harvested, [3]) == [3]
    v = ring_order([5, 1, 9, 4], harvested, resets=[3])
    assert v.ok and v.facts["repushes"] == 1 and v.facts["repeats"] == 1
    # the same repeat anywhere but at the reset, or of another page, is still a fault
    v = ring_order([5, 1, 9, 4], harvested, resets=[2])
    (msg,) = v.problems
    assert "page 9: 2 entries for 1 guest writes" in msg and v.facts["repushes"] == 0
    (msg,) = ring_order([5, 1, 9, 4], [5, 1, 9, 1, 4], resets=[3]).problems
    assert "page 1: 2 entries" in msg
    assert full_exit_repushes(harvested, [0, 5]) == []  # no entry before / after
