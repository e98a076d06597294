"""What reached the disk: read a file's blocks from its block device, bypassing the page cache.

The `file` backing already lives on ext4 on a loop device (harness.memory.mounts.Mounts.ext4, with
its cleanup). A write-back oracle needs a second read of the file that cannot be served by the page
cache the guest wrote into. O_DIRECT on the file is not quite that: before a direct read the kernel
writes dirty cached pages of the range back (filemap_write_and_wait_range), so it only proves the
pages were dirty. Here the file's extents come from FS_IOC_FIEMAP (without FIEMAP_FLAG_SYNC, which
would flush) and their blocks are read with O_DIRECT from the block device under the filesystem
(/dev/loopN for ext4-on-loop): exactly what write-back put on the disk, nothing else. Ranges with
no written extent (holes, delayed allocation, unwritten extents) read as None.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from harness.unsupported import Unsupported

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_UNWRITTEN = 0x800
_NOT_ON_DISK = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_ENCODED
_HDR = struct.Struct("<QQIIII")  # struct fiemap (32 bytes)
_EXT = struct.Struct("<QQQQQIIII")  # struct fiemap_extent (56 bytes)


class DiskReadUnavailable(Unsupported):
    """The file's blocks cannot be read from its device here; the message says why."""


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def on_disk(self) -> bool:
        return not self.flags & _NOT_ON_DISK


def fiemap(fd: int, start: int = 0, length: int = (1 << 64) - 1, batch: int = 256) -> list[Extent]:
    """The file's extents (FS_IOC_FIEMAP, no sync flag: what is allocated on disk right now)."""
    out: list[Extent] = []
    pos = start
    end = start + length if length != (1 << 64) - 1 else length
    while True:
        buf = bytearray(_HDR.pack(pos, (end - pos) & ((1 << 64) - 1), 0, 0, batch, 0) + bytes(_EXT.size * batch))
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as e:
            raise DiskReadUnavailable(f"FS_IOC_FIEMAP: {e.strerror}") from e
        n = _HDR.unpack_from(buf)[3]
        last = False
        for i in range(n):
            lo, ph, ln, _, _, fl, *_ = _EXT.unpack_from(buf, _HDR.size + i * _EXT.size)
            out.append(Extent(lo, ph, ln, fl))
            last = bool(fl & FIEMAP_EXTENT_LAST)
        if n < batch or last or not n:
            return out
        pos = out[-1].logical + out[-1].length


def block_device(path: str | Path) -> str:
    """/dev/<name> of the block device holding path (from st_dev via /sys/dev/block)."""
    st = os.stat(path)
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    try:
        for line in (sysdir / "uevent").read_text().splitlines():
            if line.startswith("DEVNAME="):
                return "/dev/" + line.split("=", 1)[1]
    except OSError as e:
        raise DiskReadUnavailable(f"{path} is on device {os.major(st.st_dev)}:{os.minor(st.st_dev)}, which "
                                  f"is no block device ({e.strerror})") from e
    raise DiskReadUnavailable(f"{sysdir}/uevent names no DEVNAME")


def _odirect_read(dev_fd: int, offset: int, length: int) -> bytes:
    page = mmap.PAGESIZE
    lo = offset // page * page
    hi = (offset + length + page - 1) // page * page
    buf = mmap.mmap(-1, hi - lo)  # page aligned, as O_DIRECT wants
    try:
        got = os.preadv(dev_fd, [buf], lo)
        if got < hi - lo:
            raise DiskReadUnavailable(f"short O_DIRECT read of the device: {got} of {hi - lo} bytes at {lo:#x}")
        return bytes(buf[offset - lo : offset - lo + length])
    finally:
        buf.close()


def read_on_disk(fd: int, path: str | Path, offset: int, length: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The file's bytes [offset, offset+length) as the disk holds them, and the sub-ranges that are
    not on disk at all (holes, delalloc, unwritten extents), which read as zeros in the result."""
    dev = block_device(path)
    exts = [e for e in fiemap(fd, offset, length) if e.logical < offset + length and e.logical + e.length > offset]
    out = bytearray(length)
    covered: list[tuple[int, int]] = []
    try:
        dev_fd = os.open(dev, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        raise DiskReadUnavailable(f"cannot open {dev} for direct reads: {e.strerror}") from e
    try:
        for e in exts:
            if not e.on_disk:
                continue
            lo = max(offset, e.logical)
            hi = min(offset + length, e.logical + e.length)
            out[lo - offset : hi - offset] = _odirect_read(dev_fd, e.physical + (lo - e.logical), hi - lo)
            covered.append((lo, hi))
    finally:
        os.close(dev_fd)
    missing = []
    pos = offset
    for lo, hi in sorted(covered):
        if lo > pos:
            missing.append((pos, lo))
        pos = max(pos, hi)
    if pos < offset + length:
        missing.append((pos, offset + length))
    return bytes(out), missing


def read_odirect(fd_path: str | Path, offset: int, length: int) -> bytes:
    """A direct read of the file itself (the kernel writes back dirty cached pages of the range
    first, so this proves the pages were dirty or already written, not that write-back ran)."""
    f = os.open(fd_path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        return _odirect_read(f, offset, length)
    finally:
        os.close(f)
