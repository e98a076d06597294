"""Kernel modules for the guest: find them in a modules tree and order them by their dependencies.

Works without modules.dep or kmod (a distribution package unpacked with dpkg-deb has neither, a
build tree has no modules.dep before `modules_install`): each module's .modinfo section names its
`depends=`, which is all that load order needs. Compressed modules (.ko.xz/.gz, .zst with the zstd
tool) are decompressed on the host so the guest's busybox insmod gets plain ELF.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class ModuleError(Exception):
    """A module cannot be read or decompressed; the message says which and why."""


def modname(path: str | Path) -> str:
    """`kvm-amd.ko.xz` -> `kvm_amd`: the kernel treats - and _ alike in module names."""
    base = os.path.basename(str(path))
    for s in SUFFIXES:
        if base.endswith(s):
            base = base[: -len(s)]
            break
    return base.replace("-", "_")


def read_ko(path: Path) -> bytes:
    """The plain ELF bytes of a module file, decompressing by suffix."""
    name = path.name
    try:
        if name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
        if name.endswith(".ko.zst"):
            if not shutil.which("zstd"):
                raise ModuleError(f"{path}: zstd-compressed and no zstd tool on this host")
            return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True, timeout=60).stdout
        return path.read_bytes()
    except (OSError, lzma.LZMAError, subprocess.SubprocessError) as e:
        raise ModuleError(f"{path}: {e}") from e


def modinfo(elf_bytes: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (a key may repeat, e.g. alias)."""
    try:
        sec = ELFFile(io.BytesIO(elf_bytes)).get_section_by_name(".modinfo")
    except Exception as e:  # pyelftools raises its own zoo of errors on a malformed file
        raise ModuleError(f"not an ELF module: {e}") from e
    info: dict[str, list[str]] = {}
    if sec is None:
        return info
    for entry in sec.data().split(b"\0"):
        if b"=" in entry:
            k, v = entry.decode(errors="replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


@dataclass
class ModuleTree:
    """The modules found under one directory, by name."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    _deps: dict[str, list[str]] = field(default_factory=dict)
    _data: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: str | Path) -> ModuleTree:
        tree = cls(Path(root))
        # sorted walk: with duplicate names (a build tree with stale copies) the choice is stable
        for dirpath, dirnames, filenames in os.walk(tree.root):
            dirnames.sort()
            for f in sorted(filenames):
                if f.endswith(SUFFIXES):
                    tree.files.setdefault(modname(f), Path(dirpath) / f)
        return tree

    def data(self, name: str) -> bytes:
        if name not in self._data:
            self._data[name] = read_ko(self.files[name])
        return self._data[name]

    def depends(self, name: str) -> list[str]:
        if name not in self._deps:
            deps = modinfo(self.data(name)).get("depends", [""])[0]
            self._deps[name] = [modname(d) for d in deps.split(",") if d]
        return self._deps[name]

    def load_order(self, wanted: list[str]) -> list[str]:
        """`wanted` (those present; absent ones are taken as built in) and their dependencies,
        each after what it depends on. Softdeps like kvm_amd's on ccp are the caller's to list."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str, stack: tuple[str, ...]) -> None:
            if name in seen or name not in self.files:
                return
            if name in stack:
                raise ModuleError(f"dependency cycle: {' -> '.join((*stack, name))}")
            for d in self.depends(name):
                visit(d, (*stack, name))
            seen.add(name)
            order.append(name)

        for w in wanted:
            visit(modname(w), ())
        return order
