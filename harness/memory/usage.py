"""How much memory something holds right now: mincore, st_blocks, /proc counters, hugepage pools.

These are the measurements punch-hole cases use to show memory was really released, not just
hidden from the guest.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from harness.kvm._cffi import ffi, lib

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")


def resident_bytes(addr: int, length: int) -> int:
    """Bytes of [addr, addr+length) that mincore(2) reports resident (page-cache or anon)."""
    n = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = ffi.new("unsigned char[]", n)
    if lib.mincore(ffi.cast("void *", addr), length, vec) != 0:
        e = ffi.errno
        raise OSError(e, f"mincore({addr:#x}, {length:#x}): {os.strerror(e)}")
    return sum(b & 1 for b in bytes(ffi.buffer(vec))) * PAGE_SIZE


# /proc/self/pagemap and /proc/kpageflags (Documentation/admin-guide/mm/pagemap.rst; both need root
# for PFNs): which folio of the page cache backs a mapped page, and its state
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1
KPF_DIRTY, KPF_WRITEBACK, KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 4, 8, 15, 16
KPF_PRIVATE = 35  # include/linux/kernel-page-flags.h: PG_private (buffer heads, iomap state)
MAX_FOLIO_PAGES = 1 << 18  # a 1 GiB folio: the walk below gives up beyond it


@dataclass(frozen=True)
class Folio:
    """The folio behind one mapped page: its first page's address in the mapping, size and the
    kpageflags of its head page."""

    addr: int
    size: int
    flags: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def large(self) -> bool:
        return self.size > PAGE_SIZE

    def has(self, bit: int) -> bool:
        return bool(self.flags >> bit & 1)

    def describe(self, base: int = 0) -> str:
        """Its range relative to `base` (a mapping's start), size and state."""
        state = ",".join(n for n, b in (("dirty", KPF_DIRTY), ("writeback", KPF_WRITEBACK),
                                        ("private", KPF_PRIVATE)) if self.has(b)) or "clean"
        return f"[{self.addr - base:#x}, {self.end - base:#x}) {self.size // 1024} KiB {state}"


def _kpageflags(f, pfn: int) -> int:
    f.seek(pfn * 8)
    return struct.unpack("<Q", f.read(8))[0]


def folio_at(addr: int) -> Folio:
    """The folio whose page is mapped at `addr` in this process (pagemap for the PFN, kpageflags for
    the compound head and tails around it). Raises OSError when the page is not mapped or PFNs are
    hidden (not root)."""
    page = addr // PAGE_SIZE * PAGE_SIZE
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(page // PAGE_SIZE * 8)
        (entry,) = struct.unpack("<Q", pm.read(8))
    pfn = entry & PM_PFN_MASK
    if not entry & PM_PRESENT or not pfn:
        raise OSError(f"no PFN for {page:#x} in /proc/self/pagemap (not mapped, or not root)")
    with open("/proc/kpageflags", "rb") as kf:
        head = pfn
        while _kpageflags(kf, head) >> KPF_COMPOUND_TAIL & 1 and pfn - head < MAX_FOLIO_PAGES:
            head -= 1
        flags = _kpageflags(kf, head)
        n = 1
        if flags >> KPF_COMPOUND_HEAD & 1:
            while n < MAX_FOLIO_PAGES and _kpageflags(kf, head + n) >> KPF_COMPOUND_TAIL & 1:
                n += 1
    return Folio(page - (pfn - head) * PAGE_SIZE, n * PAGE_SIZE, flags)


def allocated_bytes(fd: int) -> int:
    """Bytes the file behind fd has allocated (st_blocks; 0 for guest_memfd, which does not count)."""
    return os.fstat(fd).st_blocks * 512


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (HugePages_* are page counts, as the kernel prints them)."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if not parts:
                continue
            value = int(parts[0])
            out[key] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


def process_rss(pid: int | None = None) -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of a process in bytes (from /proc/<pid>/status)."""
    path = f"/proc/{pid or 'self'}/status"
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            if line.startswith("Rss"):
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * 1024
    return out


def hugepage_dir(page_size: int, root: Path = HUGEPAGES_SYSFS) -> Path:
    return root / f"hugepages-{page_size // 1024}kB"


def hugepage_counter(page_size: int, name: str, root: Path = HUGEPAGES_SYSFS) -> int:
    """One counter of a hugepage pool: nr_hugepages, free_hugepages, resv_hugepages, surplus_hugepages."""
    with open(hugepage_dir(page_size, root) / name) as f:
        return int(f.read())


_SMAPS_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def anon_huge_bytes(addr: int, length: int) -> int:
    """AnonHugePages (THP) of the VMAs inside [addr, addr+length), from /proc/self/smaps."""
    total = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = _SMAPS_RANGE.match(line)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                inside = lo < addr + length and addr < hi
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total
