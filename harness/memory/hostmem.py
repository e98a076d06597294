"""Host virtual memory the harness maps for guests: mmap/munmap/mprotect/madvise through the binding.

Python's mmap module cannot map at a fixed address, mprotect, or hand out the address KVM needs,
so mappings are made with the libc calls compiled into the cffi module.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import os
from typing import Any

from harness.kvm._cffi import ffi, lib

PROT_NONE = 0
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
PROT_EXEC = _mmap.PROT_EXEC
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_FAILED = ffi.cast("void *", -1)

MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ffi.errno
        raise OSError(e, f"{what}: {errno.errorcode.get(e, e)} ({os.strerror(e)})")


def mmap(
    length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
    fd: int = -1, offset: int = 0, addr: int = 0,
) -> int:
    """mmap(2); returns the address. Raises OSError naming the call's arguments."""
    p = lib.mmap(ffi.cast("void *", addr), length, prot, flags, fd, offset)
    if p == MAP_FAILED:
        e = ffi.errno
        raise OSError(
            e, f"mmap(addr={addr:#x}, len={length:#x}, prot={prot:#x}, flags={flags:#x}, fd={fd}, "
            f"off={offset:#x}): {errno.errorcode.get(e, e)} ({os.strerror(e)})"
        )
    return int(ffi.cast("uintptr_t", p))


def munmap(addr: int, length: int) -> None:
    _check(lib.munmap(ffi.cast("void *", addr), length), f"munmap({addr:#x}, {length:#x})")


def mprotect(addr: int, length: int, prot: int) -> None:
    _check(lib.mprotect(ffi.cast("void *", addr), length, prot), f"mprotect({addr:#x}, {length:#x}, {prot})")


def madvise(addr: int, length: int, advice: int) -> None:
    _check(lib.madvise(ffi.cast("void *", addr), length, advice), f"madvise({addr:#x}, {length:#x}, {advice})")


def msync(addr: int, length: int, flags: int = _mmap.MS_SYNC if hasattr(_mmap, "MS_SYNC") else 4) -> None:
    _check(lib.msync(ffi.cast("void *", addr), length, flags), f"msync({addr:#x}, {length:#x})")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(lib.fallocate(fd, mode, offset, length), f"fallocate(fd={fd}, mode={mode:#x}, {offset:#x}, {length:#x})")


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def resident_pages(addr: int, length: int) -> int:
    """How many pages of [addr, addr+length) are resident (mincore)."""
    n = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = ffi.new("unsigned char[]", n)
    _check(lib.mincore(ffi.cast("void *", addr), length, vec), f"mincore({addr:#x}, {length:#x})")
    return sum(b & 1 for b in bytes(ffi.buffer(vec)))


def view(addr: int, length: int) -> Any:
    """A writable buffer over host memory at addr (the caller keeps the mapping alive)."""
    return ffi.buffer(ffi.cast("char *", addr), length)


class Mapping:
    """An mmap'd range the harness owns; unmapped on close() (idempotent) or at exit of a with-block."""

    def __init__(self, length: int, prot: int = PROT_READ | PROT_WRITE,
                 flags: int = MAP_PRIVATE | MAP_ANONYMOUS, fd: int = -1, offset: int = 0,
                 addr: int = 0) -> None:
        self.length = length
        self.prot = prot
        self.flags = flags
        self.fd = fd
        self.offset = offset
        self.addr = mmap(length, prot, flags, fd, offset, addr)
        self.buf = view(self.addr, length)

    def remap(self, prot: int | None = None, flags: int | None = None, fd: int | None = None,
              offset: int | None = None) -> None:
        """Replace the mapping in place (MAP_FIXED at the same address)."""
        self.prot = self.prot if prot is None else prot
        self.flags = self.flags if flags is None else flags
        self.fd = self.fd if fd is None else fd
        self.offset = self.offset if offset is None else offset
        mmap(self.length, self.prot, self.flags | MAP_FIXED, self.fd, self.offset, self.addr)

    def close(self) -> None:
        if self.addr:
            munmap(self.addr, self.length)
            self.addr = 0
            self.buf = None

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
