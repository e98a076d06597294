"""The harness's guest as files a C baseline loads (bench/guest_image.h reads them).

A C baseline must run the very guest the harness side runs: the same payload bytes, GDT, page
tables, descriptor and registers. Rather than re-implementing the ELF loader and the page-table
builder in C, the Python side builds the VM once with the harness (a `RecordingGuestVm`, a
GuestVm that notes every range the harness writes into guest memory) and dumps:

  image.bin   the boot slot as the harness left it, only the ranges it wrote: records of
              u64 gpa, u64 length, then `length` bytes (little endian). Writing only these ranges
              faults in the same host pages the harness's set-up does (a zero page the harness
              writes, such as a fresh page-table page or .bss, is a range too).
  sregs.bin   struct kvm_sregs of vCPU 0 (KVM_GET_SREGS after the set-up)
  regs.bin    struct kvm_regs of vCPU 0 (rip = entry, rsp, rdi = 0, rsi = the argument)
  params.txt  `key value` lines a baseline needs (descriptor GPA, slot GPA, ...), numbers only

The dump is made once per run (per distinct parameter set) into a temporary directory removed
at exit, as bench/race.py does for the race engine's guest.
"""

from __future__ import annotations

import atexit
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.kvm._cffi import ffi
from harness.lib.guestvm import GuestVm

_REC = struct.Struct("<QQ")


class RecordingGuestVm(GuestVm):
    """A GuestVm that records the (gpa, length) of every Vm.write, set-up writes included."""

    def write(self, gpa: int, data: bytes) -> None:
        self.__dict__.setdefault("written", []).append((gpa, len(memoryview(data).cast("B"))))
        super().write(gpa, data)


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges sorted and merged where they overlap or touch: [(gpa, length), ...]."""
    out: list[list[int]] = []
    for gpa, n in sorted(r for r in ranges if r[1] > 0):
        if out and gpa <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], gpa + n - out[-1][0])
        else:
            out.append([gpa, n])
    return [(g, n) for g, n in out]


def dump(vm: RecordingGuestVm, d: Path, params: dict[str, int]) -> None:
    """Write vm's boot-slot ranges, vCPU 0's registers and `params` into directory d."""
    with open(d / "image.bin", "wb") as f:
        for gpa, n in merged(vm.__dict__.get("written", [])):
            f.write(_REC.pack(gpa, n))
            f.write(vm.read(gpa, n))
    v = vm.vcpus[0]
    (d / "sregs.bin").write_bytes(bytes(ffi.buffer(v.get_sregs())))
    (d / "regs.bin").write_bytes(bytes(ffi.buffer(v.get_regs())))
    (d / "params.txt").write_text("".join(f"{k} {int(v)}\n" for k, v in params.items()))


def read_image(d: Path) -> list[tuple[int, bytes]]:
    """image.bin back as [(gpa, bytes), ...] (for tests)."""
    raw = (d / "image.bin").read_bytes()
    out, i = [], 0
    while i < len(raw):
        gpa, n = _REC.unpack_from(raw, i)
        i += _REC.size
        out.append((gpa, raw[i : i + n]))
        i += n
    return out


_dirs: dict[tuple[Any, ...], Path] = {}


def cached_dir(key: tuple[Any, ...], make: Callable[[Path], None]) -> Path:
    """A temporary directory filled once per key by make(dir), removed at exit."""
    d = _dirs.get(key)
    if d is None:
        d = Path(tempfile.mkdtemp(prefix=f"kvm-harness-bench-{key[0]}-"))
        atexit.register(shutil.rmtree, d, True)
        try:
            make(d)
        except BaseException:
            shutil.rmtree(d, True)
            raise
        _dirs[key] = d
    return d
