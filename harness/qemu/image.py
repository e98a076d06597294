"""Kernel images: tell a bzImage from a vmlinux from garbage, and get a PVH-bootable vmlinux.

QEMU starts an ELF vmlinux that carries the PVH entry note directly (`-M microvm`, qboot), which
under TCG skips the bzImage's own decompressor (seconds of emulated xz). A bzImage's payload is
that vmlinux compressed; we decompress it on the host when we can, else boot the bzImage as is.
"""

from __future__ import annotations

import bz2
import io
import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point note (CONFIG_PVH)


@dataclass(frozen=True)
class KernelImage:
    path: Path
    kind: str  # "bzimage", "elf" or "unknown" (QEMU gets to refuse it: a boot failure)
    pvh: bool = False  # an ELF with the PVH entry note

    @property
    def describe(self) -> str:
        return {"bzimage": "bzImage", "elf": "vmlinux (PVH)" if self.pvh else "vmlinux (no PVH note)"}.get(
            self.kind, "unrecognised image")


def _elf_has_pvh(data: bytes | Path) -> bool | None:
    """True/False for an ELF with/without the PVH note, None if not an ELF at all."""
    try:
        f = data.open("rb") if isinstance(data, Path) else io.BytesIO(data)
        with f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_NOTE":
                    continue
                for note in seg.iter_notes():
                    if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                        return True
            return False
    except (ELFError, OSError, struct.error, ValueError):
        return None


def identify(path: str | Path) -> KernelImage:
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(0x300)
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return KernelImage(p, "bzimage")
    if head[:4] == b"\x7fELF":
        pvh = _elf_has_pvh(p)
        if pvh is not None:
            return KernelImage(p, "elf", pvh)
    return KernelImage(p, "unknown")


def _decompress(blob: bytes) -> bytes | None:
    """The payload's format by its magic; None when this host cannot undo it."""
    if blob.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob)
    if blob.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(blob)
    if blob.startswith(b"BZh"):
        return bz2.BZ2Decompressor().decompress(blob)
    if blob.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(blob)
    tool = {b"\x28\xb5\x2f\xfd": ["zstd", "-dc"], b"\x02\x21\x4c\x18": ["lz4", "-dc"]}.get(blob[:4])
    if tool and shutil.which(tool[0]):
        r = subprocess.run(tool, input=blob, capture_output=True, timeout=120)
        return r.stdout or None
    return None


def extract_vmlinux(bzimage: Path, dest: Path) -> KernelImage | None:
    """Write the bzImage's payload (an ELF vmlinux) to dest; None if it is not PVH-bootable."""
    data = bzimage.read_bytes()
    try:
        setup_sects = data[0x1F1] or 4
        version = struct.unpack_from("<H", data, 0x206)[0]
        if version < 0x208:  # payload_offset/length arrived with boot protocol 2.08
            return None
        off, length = struct.unpack_from("<II", data, 0x248)
        start = (setup_sects + 1) * 512 + off
        raw = _decompress(data[start:start + length])
    except (lzma.LZMAError, zlib.error, OSError, EOFError, struct.error, IndexError, subprocess.SubprocessError):
        return None
    if not raw or _elf_has_pvh(raw) is not True:
        return None
    dest.write_bytes(raw)
    return KernelImage(dest, "elf", True)
