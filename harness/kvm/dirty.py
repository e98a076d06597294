"""Dirty tracking: bitmap and dirty-ring helpers, and the oracles that judge what KVM reported.

A lost dirty bit is lost data in live migration, so the oracles are strict about missing pages and
say exactly which ones (page numbers and GPAs); extra pages pass only when the caller names them as
allowed (e.g. what KVM_DIRTY_LOG_INITIALLY_SET documents). The oracles are pure functions over page
numbers and bytes; tests/test_dirty_oracles.py feeds them stale or missing data.

    ring = DirtyRing(vcpu, entries)          # after vm.enable_dirty_ring(); mmaps the vCPU's ring
    got = ring.harvest()                     # [(slot, page offset), ...] in ring order, marked RESET
    vm.reset_dirty_rings()                   # KVM re-protects the harvested pages
"""

from __future__ import annotations

import mmap
import sys
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.kvm._cffi import ffi
from harness.kvm.caps import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_LOG_PAGE_OFFSET
from harness.kvm.errors import HarnessError

if TYPE_CHECKING:
    from harness.kvm.vcpu import Vcpu

PAGE = 4096
DIRTY_GFN_SIZE = 16  # struct kvm_dirty_gfn
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


# ---- bitmaps -------------------------------------------------------------------------------------
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
    val = 0
    for p in pages:
        if not 0 <= p < npages:
            raise ValueError(f"page {p} is outside a slot of {npages} pages")
        val |= 1 << p
    return val.to_bytes((npages + 63) // 64 * 8, "little")


def ranges(pages: Iterable[int], limit: int = 12) -> str:
    """`3, 7-9, 12 (+40 more)`: page numbers compressed into runs for messages."""
    ps = sorted(set(pages))
    runs: list[tuple[int, int]] = []
    for p in ps:
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    txt = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        txt += f" (+{sum(b - a + 1 for a, b in runs[limit:])} more pages)"
    return txt or "none"


# ---- oracles -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DirtyVerdict:
    """The comparison of the pages a guest wrote with the pages KVM reported dirty."""

    written: frozenset[int]
    reported: frozenset[int]
    allowed_extra: frozenset[int] = field(default_factory=frozenset)
    gpa: int = 0  # GPA of page 0 (for messages)
    what: str = "dirty log"

    @property
    def missing(self) -> set[int]:
        return set(self.written - self.reported)

    @property
    def extra(self) -> set[int]:
        return set(self.reported - self.written - self.allowed_extra)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra

    def problems(self) -> list[str]:
        out = []
        if self.missing:
            m = sorted(self.missing)
            out.append(f"{self.what}: {len(m)} of {len(self.written)} pages the guest wrote are NOT reported "
                       f"dirty (lost data in a migration): pages {ranges(m)}; first at GPA "
                       f"{self.gpa + m[0] * PAGE:#x}")
        if self.extra:
            e = sorted(self.extra)
            out.append(f"{self.what}: {len(e)} pages reported dirty that the guest did not write: pages "
                       f"{ranges(e)}; first at GPA {self.gpa + e[0] * PAGE:#x}")
        return out


def check_exact(written: Iterable[int], reported: Iterable[int], *, allowed_extra: Iterable[int] = (),
                gpa: int = 0, what: str = "dirty log") -> DirtyVerdict:
    return DirtyVerdict(frozenset(written), frozenset(reported), frozenset(allowed_extra), gpa, what)


def first_writes(order: Iterable[int]) -> list[int]:
    """The order in which pages were first written (later writes of a page dirty nothing new)."""
    seen: set[int] = set()
    out = []
    for p in order:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def full_exit_repushes(harvested: Sequence[int], resets: Sequence[int]) -> list[int]:
    """Indices in `harvested` of entries that repeat the write a ring-full exit interrupted.

    `resets` are the indices where a KVM_EXIT_DIRTY_RING_FULL's harvest + reset ended (the number
    of entries harvested so far at each such exit). KVM pushes a page when its write fault makes the
    page writable; the push that reaches the soft limit makes the vCPU exit before it re-enters the
    guest, so that write has not happened yet. The reset write-protects the page again, the resumed
    guest retries the write, faults and the page is pushed once more: as the first entry after the
    reset, equal to the last one before it (virt/kvm/dirty_ring.c kvm_dirty_ring_push/check_request;
    at every one of 2898 full exits on 7.3.4 under kvm_amd, docs/triage.md). Only that exact pattern."""
    return [i for i in resets if 0 < i < len(harvested) and harvested[i] == harvested[i - 1]]


def ring_order_problems(written_order: Sequence[int], harvested: Sequence[int], *, gpa: int = 0,
                        allow_repeats: bool = True, resets: Sequence[int] = ()) -> list[str]:
    """A dirty ring pushes an entry when a page becomes dirty, so one vCPU's entries for one slot
    come out in the order of its first writes: the pages in order of their first appearance in the
    ring must equal first_writes(written_order) (nothing missing, nothing extra, nothing reordered).

    A page written again while still dirty may be pushed again (api.rst promises no dedup; KVM's
    own writes push each time): with allow_repeats a page may appear up to as many times as the
    guest wrote it, never more. Without, every page must appear exactly once. `resets`: where
    ring-full exits reset the ring; the write each of them interrupted is pushed again right after
    it (full_exit_repushes), which is not a repeat of the guest's."""
    want = first_writes(written_order)
    drop = set(full_exit_repushes(harvested, resets))
    got = [p for i, p in enumerate(harvested) if i not in drop]
    out = []
    wrote = Counter(written_order)
    pushed = Counter(got)
    limit = wrote if allow_repeats else Counter(dict.fromkeys(wrote, 1))
    over = sorted(p for p, n in pushed.items() if p in wrote and n > limit[p])
    if over:
        p = over[0]
        out.append(f"dirty ring: pages {ranges(over)} pushed more often than allowed (page {p}: {pushed[p]} "
                   f"entries for {wrote[p]} guest writes{'' if allow_repeats else ', repeats not allowed'})")
    missing = set(want) - set(got)
    extra = set(got) - set(want)
    if missing:
        out.append(f"dirty ring: {len(missing)} written pages never pushed: {ranges(missing)} "
                   f"(first at GPA {gpa + min(missing) * PAGE:#x})")
    if extra:
        out.append(f"dirty ring: {len(extra)} pages pushed that the guest did not write: {ranges(extra)}")
    firsts = first_writes(got)
    if not missing and not extra and firsts != want:
        i = next(i for i, (a, b) in enumerate(zip(firsts, want, strict=True)) if a != b)
        out.append(f"dirty ring: entries out of order from the {i}th new page: ring has pages {firsts[i:i + 5]}, "
                   f"the guest first wrote {want[i:i + 5]}")
    return out


def repeats(harvested: Sequence[int]) -> int:
    """Entries beyond the first for each page (a measured fact of the backend, not a loss)."""
    return len(harvested) - len(set(harvested))


def migration_problems(source: bytes, dest: bytes, *, gpa: int = 0, page: int = PAGE,
                       limit: int = 4) -> list[str]:
    """The live-migration oracle: after the final round, the copy built only from pages reported
    dirty must equal the source. Each differing page is one whose dirty bit was lost."""
    if len(source) != len(dest):
        return [f"source has {len(source):#x} bytes, copy {len(dest):#x}"]
    bad = [i // page for i in range(0, len(source), page) if source[i:i + page] != dest[i:i + page]]
    if not bad:
        return []
    lines = [f"{len(bad)} pages differ between guest memory and the copy made from the dirty reports "
             f"(their writes were never reported): pages {ranges(bad)}"]
    for p in bad[:limit]:
        o = p * page
        s, d = source[o:o + page], dest[o:o + page]
        w = next(i for i in range(0, page, 8) if s[i:i + 8] != d[i:i + 8])
        lines.append(f"  page {p} (GPA {gpa + o:#x}) +{w:#x}: guest has {int.from_bytes(s[w:w + 8], 'little'):#x}, "
                     f"copy has {int.from_bytes(d[w:w + 8], 'little'):#x}")
    return lines


def disk_problems(disk: bytes, expected: bytes, *, not_on_disk: Sequence[tuple[int, int]] = (),
                  gpa: int = 0, page: int = PAGE, what: str = "disk") -> list[str]:
    """The write-back oracle: the file's bytes as the disk holds them (after a sync) must equal what
    the guest wrote. Pages that differ, and ranges with no written extent at all, are named with
    their file offsets and GPAs (gpa = GPA of file offset 0)."""
    out = []
    if not_on_disk:
        out.append(f"{what}: file ranges with no written extent on disk: "
                   + ", ".join(f"{lo:#x}-{hi:#x} (GPA {gpa + lo:#x})" for lo, hi in list(not_on_disk)[:5]))
    if len(disk) != len(expected):
        return [*out, f"{what}: {len(disk):#x} bytes read, {len(expected):#x} expected"]
    stale = [i // page for i in range(0, len(disk), page) if disk[i:i + page] != expected[i:i + page]]
    if stale:
        o = stale[0] * page
        w = next(i for i in range(o, o + page, 8) if disk[i:i + 8] != expected[i:i + 8])
        out.append(f"{what}: {len(stale)} of {len(disk) // page} pages on disk are not what the guest wrote "
                   f"(pages {ranges(stale)}); first at file offset {w:#x} (GPA {gpa + w:#x}): disk has "
                   f"{int.from_bytes(disk[w:w + 8], 'little'):#x}, the guest wrote "
                   f"{int.from_bytes(expected[w:w + 8], 'little'):#x}")
    return out


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

    def __init__(self, vcpu: Vcpu, entries: int) -> None:
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
        out = []
        g = self._gfns
        n = self.entries
        while limit is None or len(out) < limit:
            e = g[self.fetch % n]
            flags = e.flags
            if not flags & KVM_DIRTY_GFN_F_DIRTY:
                break
            if flags & KVM_DIRTY_GFN_F_RESET:
                raise HarnessError(f"dirty ring entry {self.fetch} has flags {flags:#x}: DIRTY|RESET, "
                                   "KVM published an entry userspace had not handed back")
            out.append((e.slot, e.offset))
            e.flags = KVM_DIRTY_GFN_F_RESET
            self.fetch += 1
        self.harvested += len(out)
        return out

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
