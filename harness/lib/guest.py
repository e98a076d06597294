"""Guest payload ELFs built from guests/: locate, check freshness, load segments, resolve symbols."""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.constants import P_FLAGS  # noqa: F401  (documents what p_flags mean)
from elftools.elf.elffile import ELFFile

from harness.kvm.errors import HarnessError

GUESTS_DIR = Path(os.environ.get("KVM_HARNESS_GUESTS", Path(__file__).resolve().parents[2] / "guests"))
BUILD_DIR = GUESTS_DIR / "build"


class GuestBuildError(HarnessError):
    """A guest payload is missing or older than its sources."""


@dataclass(frozen=True)
class Segment:
    paddr: int
    vaddr: int
    data: bytes
    memsz: int
    flags: int


class GuestImage:
    """A loaded payload: its segments, entry point and symbol table."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        with open(path, "rb") as f:
            elf = ELFFile(f)
            self.bits = elf.elfclass
            self.entry = elf.header["e_entry"]
            self.segments = [
                Segment(s["p_paddr"], s["p_vaddr"], s.data(), s["p_memsz"], s["p_flags"])
                for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD"
            ]
            self.symbols: dict[str, int] = {}
            self.sizes: dict[str, int] = {}
            symtab = elf.get_section_by_name(".symtab")
            if symtab is not None:
                for sym in symtab.iter_symbols():
                    if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                        self.symbols[sym.name] = sym["st_value"]
                        self.sizes[sym.name] = sym["st_size"]
        funcs = sorted((a, n) for n, a in self.symbols.items())
        self._addrs = [a for a, _ in funcs]
        self._names = [n for _, n in funcs]

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise GuestBuildError(f"symbol {name!r} not found in {self.path}") from None

    def symbolize(self, addr: int) -> str:
        """`name+0xoff` for an address inside the payload, or a plain hex address."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or not self.segments:
            return hex(addr)
        end = max(s.vaddr + s.memsz for s in self.segments)
        if addr >= end:
            return hex(addr)
        return f"{self._names[i]}+{addr - self._addrs[i]:#x} in {self.name}"

    @property
    def extent(self) -> tuple[int, int]:
        lo = min(s.paddr for s in self.segments)
        hi = max(s.paddr + s.memsz for s in self.segments)
        return lo, hi


def _manifest() -> dict[str, list[str]]:
    mf = BUILD_DIR / "manifest.txt"
    out: dict[str, list[str]] = {}
    if mf.exists():
        for line in mf.read_text().splitlines():
            parts = line.split()
            if parts:
                out[Path(parts[0]).name] = parts[1:]
    return out


# guest_path() results, re-checked after RECHECK_S: a VM per case would otherwise read the manifest
# and stat a dozen sources each time (1 ms of a 2 ms VM set-up); an edit of a guest source is still
# seen within RECHECK_S. Inside the kernel runner's QEMU guest (KVM_HARNESS_ACCEL set) a case takes
# longer than that (TCG: 14 s of a 600 s profile went to these stats over 9p), and the tree it runs
# is the host's as it was when the run started: checked once per process there.
RECHECK_S = float("inf") if os.environ.get("KVM_HARNESS_ACCEL") else 2.0
_checked: dict[str, tuple[float, Path]] = {}


def guest_path(payload: str, bits: int | str) -> Path:
    """guests/build/<payload>.<bits>.elf, checked to exist and to be newer than its sources."""
    key = f"{payload}.{bits}"
    hit = _checked.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < RECHECK_S:
        return hit[1]
    path = _guest_path(payload, bits)
    _checked[key] = (now, path)
    return path


def _guest_path(payload: str, bits: int | str) -> Path:
    path = BUILD_DIR / f"{payload}.{bits}.elf"
    if not path.exists():
        raise GuestBuildError(
            f"guest payload {payload!r} ({bits}-bit) is not built: {path} is missing; run `make guests`"
        )
    deps = _manifest().get(path.name)
    if deps is None:
        raise GuestBuildError(f"{path.name} is not in {BUILD_DIR / 'manifest.txt'}; run `make guests`")
    built = path.stat().st_mtime
    for dep in deps:
        src = GUESTS_DIR / dep
        try:
            if src.stat().st_mtime > built:
                raise GuestBuildError(
                    f"guest payload {path.name} is stale: {dep} changed after it was built; run `make guests`"
                )
        except FileNotFoundError:
            raise GuestBuildError(
                f"{path.name} was built from {dep}, which no longer exists; run `make guests`"
            ) from None
    return path


_cache: dict[tuple[Path, float], GuestImage] = {}
_mtimes: dict[Path, tuple[float, float]] = {}  # path -> (checked at, st_mtime), as guest_path's cache


def _mtime(path: Path) -> float:
    hit = _mtimes.get(path)
    now = time.monotonic()
    if hit is not None and now - hit[0] < RECHECK_S:
        return hit[1]
    m = path.stat().st_mtime
    _mtimes[path] = (now, m)
    return m


def load_image(payload: str, bits: int | str) -> GuestImage:
    path = guest_path(payload, bits)
    key = (path, _mtime(path))
    img = _cache.get(key)
    if img is None:
        img = _cache[key] = GuestImage(path)
    return img
