"""Small /proc and sysfs files read in three syscalls.

Python's open() adds fstat, ioctl(TCGETS) and lseek to every read: ~5x the cost of os.open/os.read/
os.close here, and the health checks read a few such files around every case (~10 ms apiece under
the kernel runner's TCG)."""

from __future__ import annotations

import os
from pathlib import Path


def read_text(path: str | Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 17):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="surrogateescape")
