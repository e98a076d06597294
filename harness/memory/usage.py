"""How much memory something holds right now: mincore, st_blocks, /proc counters, hugepage pools.

These are the measurements punch-hole cases use to show memory was really released, not just
hidden from the guest.
"""

from __future__ import annotations

import os
import re
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
