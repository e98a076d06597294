"""Dirty tracking: bitmap and dirty-ring helpers. The oracles that judge what KVM reported are in
harness.oracles.dirty.

    ring = DirtyRing(vcpu, entries)          # after vm.enable_dirty_ring(); mmaps the vCPU's ring
    got = ring.harvest()                     # [(slot, page offset), ...] in ring order, marked RESET
    slots, offsets = ring.harvest_arrays()   # the same, as two arrays, walked in C (no per-entry Python)
    vm.reset_dirty_rings()                   # KVM re-protects the harvested pages
"""

from __future__ import annotations

import mmap
import sys
from array import array
from collections.abc import Iterable
from typing import Any

from harness.kvm._cffi import ffi, lib
from harness.kvm.caps import KVM_DIRTY_LOG_PAGE_OFFSET
from harness.kvm.errors import HarnessError
from harness.kvm.ioctl import HasFd

PAGE = 4096
DIRTY_GFN_SIZE = 16  # struct kvm_dirty_gfn
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


# ---- bitmaps -------------------------------------------------------------------------------------
def bitmap_page_array(bitmap: Any, npages: int) -> array:
    """array('I') of the page numbers whose bit is set, ascending, from a KVM bitmap (a
    `uint64_t[]` cdata or bytes of whole u64 words), walked in C."""
    bm = bitmap if isinstance(bitmap, ffi.CData) else ffi.from_buffer("uint64_t[]", bitmap)
    if ffi.sizeof(bm) * 8 < npages:
        raise HarnessError(f"a bitmap of {ffi.sizeof(bm)} bytes cannot hold {npages} pages")
    out = ffi.new("uint32_t[]", max(npages, 1))
    n = lib.kh_bitmap_pages(bm, npages, out)
    a = array("I")
    a.frombytes(ffi.buffer(out, 4 * n))
    return a


def page_array_bitmap(pages: array, npages: int) -> Any:
    """A zeroed `uint64_t[]` bitmap for a slot of npages with `pages` (array('I')) set, in C."""
    bm = ffi.new("uint64_t[]", (npages + 63) // 64 or 1)
    src = ffi.from_buffer("uint32_t[]", pages) if len(pages) else ffi.NULL
    rc = lib.kh_pages_bitmap(src, len(pages), npages, bm)
    if rc < 0:
        raise ValueError(f"page {pages[-rc - 1]} is outside a slot of {npages} pages")
    return bm


def bitmap_pages(bitmap: bytes, npages: int | None = None) -> set[int]:
    """Page numbers whose bit is set (KVM's layout: little-endian u64 words, bit i = page i)."""
    n = len(bitmap) * 8 if npages is None else npages
    whole = len(bitmap) // 8 * 8
    words = array("Q", bitmap[:whole])
    if sys.byteorder != "little":
        words.byteswap()
    out = set()
    for wi, word in enumerate(words):
        if not word:
            continue
        base = wi * 64
        while word:
            low = word & -word
            out.add(base + low.bit_length() - 1)
            word ^= low
    for bi in range(whole, len(bitmap)):  # a trailing partial word (not KVM's layout, but valid input)
        for b in range(8):
            if bitmap[bi] >> b & 1:
                out.add(bi * 8 + b)
    return {p for p in out if p < n} if n < len(bitmap) * 8 else out


def pages_bitmap(pages: Iterable[int], npages: int) -> bytes:
    """The bitmap KVM would report for `pages` in a slot of npages (u64-word padded)."""
    # a bytearray, not one growing int: `val |= 1 << p` copies the whole int per page (quadratic)
    out = bytearray((npages + 63) // 64 * 8)
    for p in pages:
        if not 0 <= p < npages:
            raise ValueError(f"page {p} is outside a slot of {npages} pages")
        out[p >> 3] |= 1 << (p & 7)
    return bytes(out)


# ---- the guest's write pattern (guests/payloads/dirty_writer.c) -----------------------------------
def word_offset(page: int) -> int:
    return (page * 64) & (PAGE - 1)


def dirty_value(rnd: int, page: int) -> int:
    return ((rnd << 32) | page) & (2**64 - 1)


# ---- the dirty ring --------------------------------------------------------------------------------
class DirtyRing:
    """One vCPU's dirty ring, mmapped from its fd at KVM_DIRTY_LOG_PAGE_OFFSET pages.

    harvest() walks entries from the fetch index while their flags say DIRTY, marks each RESET
    (x86 is TSO: a plain store after the load is the release the ACQ_REL variant asks for) and
    returns them; Vm.reset_dirty_rings() then lets KVM re-protect them and reuse the slots."""

    def __init__(self, vcpu: HasFd, entries: int) -> None:
        if entries <= 0 or entries & (entries - 1):
            raise HarnessError(f"dirty ring entries {entries} is not a power of two")
        self.vcpu = vcpu
        self.entries = entries
        self.size = entries * DIRTY_GFN_SIZE
        self._mm: mmap.mmap | None = mmap.mmap(vcpu.fd, self.size, mmap.MAP_SHARED,
                                               mmap.PROT_READ | mmap.PROT_WRITE,
                                               offset=KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self._buf = ffi.from_buffer(self._mm)
        self._gfns = ffi.cast("struct kvm_dirty_gfn *", self._buf)
        self.fetch = 0  # free-running index of the next entry to look at
        self.harvested = 0

    def peek(self, index: int) -> tuple[int, int, int]:
        e = self._gfns[index % self.entries]
        return e.flags, e.slot, e.offset

    def harvest(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Entries KVM published since the last harvest, in ring order, each marked RESET."""
        slots, offsets = self.harvest_arrays(limit)
        return list(zip(slots, offsets, strict=True))

    def harvest_arrays(self, limit: int | None = None) -> tuple[array, array]:
        """harvest() as (array('I') of slots, array('Q') of page offsets), the walk done in C: from
        the fetch index while entries are DIRTY, each marked RESET (a store-release after the
        load-acquire of its flags)."""
        if self._mm is None:
            raise HarnessError("the dirty ring is closed")
        cap = self.entries if limit is None else max(0, min(limit, self.entries))
        slots = ffi.new("uint32_t[]", max(cap, 1))
        offs = ffi.new("uint64_t[]", max(cap, 1))
        n = lib.kh_ring_harvest(self._gfns, self.entries, self.fetch, cap, slots, offs)
        if n < 0:
            bad = self.fetch - n - 1
            flags = self.peek(bad)[0]
            raise HarnessError(f"dirty ring entry {bad} has flags {flags:#x}: DIRTY|RESET, "
                               "KVM published an entry userspace had not handed back")
        self.fetch += n
        self.harvested += n
        a, b = array("I"), array("Q")
        a.frombytes(ffi.buffer(slots, 4 * n))
        b.frombytes(ffi.buffer(offs, 8 * n))
        return a, b

    def close(self) -> None:
        if self._mm is not None:
            self._gfns = self._buf = None
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None

    def __enter__(self) -> DirtyRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
