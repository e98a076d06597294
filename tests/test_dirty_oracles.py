"""The dirty-tracking and write-back oracles (harness.kvm.dirty) fail on stale or missing data, and the
dirty-ring reader follows KVM's protocol — all without KVM."""

from __future__ import annotations

import mmap
import os
import random
import struct

import pytest

from harness.kvm.caps import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_LOG_PAGE_OFFSET
from harness.kvm.dirty import (
    PAGE,
    DirtyRing,
    bitmap_pages,
    check_exact,
    dirty_value,
    disk_problems,
    first_writes,
    migration_problems,
    pages_bitmap,
    ranges,
    repeats,
    ring_order_problems,
    word_offset,
)
from harness.kvm.errors import HarnessError


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


def test_ranges():
    assert ranges([5, 1, 2, 3, 9]) == "1-3, 5, 9"
    assert ranges([]) == "none"
    assert "more pages" in ranges(range(0, 100, 2), limit=3)


# ---- exact-set oracle ------------------------------------------------------------------------------
def test_exact_set_passes_exact():
    assert check_exact([1, 2, 3], {3, 2, 1}).ok


def test_exact_set_names_missing_pages_and_gpa():
    v = check_exact([1, 2, 3, 70], [1, 3], gpa=1 << 40)
    assert not v.ok and v.missing == {2, 70}
    (msg,) = v.problems()
    assert "NOT reported" in msg and "2, 70" in msg and "0x10000002000" in msg and "lost data" in msg


def test_exact_set_flags_extra_unless_allowed():
    v = check_exact([1], [1, 5, 6])
    assert not v.ok and v.extra == {5, 6} and "did not write" in v.problems()[0]
    assert check_exact([1], [1, 5, 6], allowed_extra=[5, 6]).ok
    # an allowance never excuses a missing page
    assert not check_exact([1, 2], [1, 5], allowed_extra=[5]).ok


def test_stale_log_from_an_earlier_round_fails():
    """A log that still shows round 1's pages (never cleared) when round 2 wrote others."""
    r1, r2 = [1, 2, 3], [7, 8]
    v = check_exact(r2, set(r1))
    assert v.missing == {7, 8} and v.extra == {1, 2, 3}


# ---- ring order ----------------------------------------------------------------------------------------
def test_ring_order_exact():
    assert ring_order_problems([5, 1, 9, 5], [5, 1, 9]) == []
    assert first_writes([3, 1, 3, 2, 1]) == [3, 1, 2]


def test_ring_order_missing_and_extra():
    p = ring_order_problems([5, 1, 9], [5, 9, 4], gpa=0x1000)
    assert any("never pushed" in x and "1" in x for x in p)
    assert any("did not write" in x and "4" in x for x in p)


def test_ring_order_reordered():
    (msg,) = ring_order_problems([5, 1, 9], [1, 5, 9])
    assert "out of order" in msg and "[1, 5, 9]" in msg


def test_ring_repeats_bounded_by_writes():
    # a page rewritten while dirty may come again, as often as it was written, never more
    assert ring_order_problems([5, 1, 5], [5, 1, 5]) == []
    (msg,) = ring_order_problems([5, 1], [5, 1, 5])
    assert "more often than allowed" in msg and "page 5: 2 entries for 1 guest writes" in msg
    (msg,) = ring_order_problems([5, 1, 5], [5, 1, 5], allow_repeats=False)
    assert "repeats not allowed" in msg
    assert repeats([5, 1, 5, 5]) == 2


# ---- live-migration oracle -------------------------------------------------------------------------------
def test_migration_oracle_passes_equal_copies():
    src = bytes(random.Random(2).randbytes(8 * PAGE))
    assert migration_problems(src, bytearray(src)) == []


def test_migration_oracle_names_the_page_with_a_lost_write():
    src = bytearray(8 * PAGE)
    dst = bytearray(src)
    o = 5 * PAGE + word_offset(5)
    src[o:o + 8] = dirty_value(3, 5).to_bytes(8, "little")  # written, never copied
    p = migration_problems(bytes(src), bytes(dst), gpa=1 << 40)
    assert "1 pages differ" in p[0] and "pages 5" in p[0]
    assert f"GPA {(1 << 40) + 5 * PAGE:#x}" in p[1] and f"+{word_offset(5):#x}" in p[1]
    assert f"{dirty_value(3, 5):#x}" in p[1]


def test_migration_oracle_stale_copy_of_older_round():
    src = bytearray(4 * PAGE)
    dst = bytearray(4 * PAGE)
    for rnd, d in ((2, src), (1, dst)):  # the copy holds round 1, the guest wrote round 2
        for pg in range(4):
            o = pg * PAGE + word_offset(pg)
            d[o:o + 8] = dirty_value(rnd, pg).to_bytes(8, "little")
    assert "4 pages differ" in migration_problems(bytes(src), bytes(dst))[0]


# ---- write-back oracle ---------------------------------------------------------------------------------------
def test_disk_oracle_passes_what_was_written():
    data = random.Random(3).randbytes(4 * PAGE)
    assert disk_problems(data, data) == []


def test_disk_oracle_names_stale_pages():
    want = bytearray(4 * PAGE)
    want[2 * PAGE + 16:2 * PAGE + 24] = (0xABCD).to_bytes(8, "little")
    (msg,) = disk_problems(bytes(4 * PAGE), bytes(want), gpa=0x1000_0000, what="round 2")
    assert "round 2" in msg and "1 of 4 pages" in msg and "pages 2" in msg
    assert "file offset 0x2010" in msg and "GPA 0x10002010" in msg and "0xabcd" in msg


def test_disk_oracle_names_ranges_never_written():
    data = bytes(2 * PAGE)
    (msg,) = disk_problems(data, data, not_on_disk=[(PAGE, 2 * PAGE)], gpa=1 << 40)
    assert "no written extent" in msg and "0x1000-0x2000" in msg


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


def test_dirty_ring_refuses_dirty_and_reset():
    v = _FakeVcpu(256)
    ring = DirtyRing(v, 256)  # type: ignore[arg-type]
    try:
        struct.pack_into("<IIQ", v.mm, 0, KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET, 1, 0)
        with pytest.raises(HarnessError, match="DIRTY\\|RESET"):
            ring.harvest()
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
            assert any("no written extent" in p for p in disk_problems(disk, first, not_on_disk=missing))
            hostmem.msync(b.addr, size)
            disk, missing = read_on_disk(b.fd, b.path, 0, size)
            assert missing == [] and disk_problems(disk, first) == []
            second = bytearray(first)
            second[3 * PAGE:4 * PAGE] = bytes([2]) * PAGE
            b.write(0, bytes(second))  # dirty in the page cache only
            disk, _ = read_on_disk(b.fd, b.path, 0, size)
            (msg,) = disk_problems(disk, bytes(second))
            assert "pages 3" in msg and "1 of 16 pages" in msg
            hostmem.msync(b.addr, size)
            assert disk_problems(read_on_disk(b.fd, b.path, 0, size)[0], bytes(second)) == []
        finally:
            b.close()


def test_ring_full_exit_repush_only_right_after_the_reset():
    """The write a ring-full exit interrupted is pushed again as the first entry after the reset
    (KVM pushed it when the fault made the page writable; the write retires after the resume)."""
    from harness.kvm.dirty import full_exit_repushes

    harvested = [5, 1, 9, 9, 4]  # full exit after 3 entries; 9 comes again right after the reset
    assert full_exit_repushes(harvested, [3]) == [3]
    assert ring_order_problems([5, 1, 9, 4], harvested, resets=[3]) == []
    # the same repeat anywhere but at the reset, or of another page, is still a fault
    (msg,) = ring_order_problems([5, 1, 9, 4], harvested, resets=[2])
    assert "page 9: 2 entries for 1 guest writes" in msg
    (msg,) = ring_order_problems([5, 1, 9, 4], [5, 1, 9, 1, 4], resets=[3])
    assert "page 1: 2 entries" in msg
    assert full_exit_repushes(harvested, [0, 5]) == []  # no entry before / after
