"""Device memory backings: persistent memory mapped through DAX, so KVM maps ZONE_DEVICE pages.

    devdax  a range of a device-dax character device (/dev/daxX.Y, 2 MiB alignment) mapped
            MAP_SHARED: the device's own memory, mapped with 2 MiB pages, no page cache, no file
            system. Nothing can be punched or truncated (Feature.DEVICE).
    fsdax   a file on ext4 mounted -o dax on a pmem block device (/dev/pmemN in fsdax mode): file
            pages are the pmem's own (no page cache); punching a hole frees blocks of the media.

Which pmem the harness may use (it overwrites and reformats what it takes, so never by guessing):

    KVM_HARNESS_PMEM=scratch    every pmem namespace of this kernel is scratch. The QEMU kernel
                                runner sets it in its guest (harness/qemu/runner.py, --pmem: two
                                nvdimms over sparse files). The first namespace becomes fsdax (a
                                pfn device: /dev/pmemN with struct pages, formatted ext4 once,
                                mounted -o dax per process), the last becomes devdax (/dev/daxX.Y).
    KVM_HARNESS_DEVDAX=/dev/daxX.Y   this devdax device may be overwritten.
    KVM_HARNESS_FSDAX_DIR=DIR   make fsdax files in DIR, on a filesystem already mounted with dax.

Namespaces are reconfigured through sysfs, without ndctl (not installed in the guest): the
namespace is unbound from nd_pmem, the region's pfn seed (fsdax) or dax seed (devdax) gets a uuid,
mode "pmem" (struct pages on the device), align 2 MiB and the namespace, and is bound to nd_pmem /
dax_pmem, which writes the info block and brings up /dev/pmemN or /dev/daxX.Y. (A raw namespace's
/dev/pmemN has no struct pages: ext4 refuses -o dax on it, "DAX unsupported by block device".)

A devdax device is shared by every backing of every process: each backing takes a free range with
an open-file-description lock (F_OFD_SETLK) on that byte range of the device node, which goes away
when the backing closes its fd (or its process dies), and zeroes it, as fresh memory of every
other kind reads zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.memory import cleanup, hostmem, usage
from harness.memory.backings import PAGE_4K, Backing, BackingUnavailable, Feature, _MountedFileBacking
from harness.memory.hugepages import PAGE_2M
from harness.memory.mounts import MountError, default_mounts, mount

if TYPE_CHECKING:
    from harness.memory.mounts import Mounts

ND = Path("/sys/bus/nd/devices")
ND_DRIVERS = Path("/sys/bus/nd/drivers")
DAX_BUS = Path("/sys/bus/dax/devices")
DEV = Path("/dev")
PMEM_ENV = "KVM_HARNESS_PMEM"  # "scratch": the runner's guest (harness.qemu.runner.PMEM_ENV says the same)
DEVDAX_ENV = "KVM_HARNESS_DEVDAX"
FSDAX_DIR_ENV = "KVM_HARNESS_FSDAX_DIR"
LABEL = "kh-fsdax"  # the ext4 label of a scratch namespace the harness formatted
ALIGN = PAGE_2M
# namespace `mode` in sysfs -> the name ndctl (and this module) uses
MODES = {"raw": "raw", "memory": "fsdax", "dax": "devdax", "safe": "sector"}
NO_PMEM = ("no /dev/pmem* or /dev/dax*: this kernel has no persistent memory (the QEMU kernel runner "
           "gives its guest two pmem devices: python -m harness kernel --kernel debian:7.3 -- cases/test_dax.py)")
_NS = re.compile(r"^namespace(\d+)\.(\d+)$")


class DaxUnavailable(BackingUnavailable):
    """No usable pmem / DAX here, or the harness may not take it; the message says which and why."""


# ---- discovery (pure over a sysfs tree: tests/test_dax.py builds fake ones) ---------------------------
@dataclass(frozen=True)
class Namespace:
    """A libnvdimm namespace as sysfs shows it."""

    name: str  # namespace0.0
    region: str  # region0
    mode: str  # raw | fsdax | devdax | sector (MODES)
    size: int
    resource: int | None  # physical address, when the kernel says
    holder: str  # the pfn/dax/btt device claiming it ("" when none)
    block: str  # its block device (pmem0), when there is one
    dax: str  # its device-dax device (dax1.0), when there is one
    enabled: bool  # a driver is bound to it or to its holder

    @property
    def order(self) -> tuple[int, int]:
        m = _NS.match(self.name)
        return (int(m.group(1)), int(m.group(2))) if m else (1 << 30, 0)

    def describe(self) -> str:
        dev = f"/dev/{self.block}" if self.block else f"/dev/{self.dax}" if self.dax else "no device"
        at = f" at {self.resource:#x}" if self.resource is not None else ""
        return f"{self.name} ({self.region}, {self.mode}, {self.size >> 20} MiB{at}, {dev})"


def _read(p: Path, default: str = "") -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return default


def _int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


def _child(d: Path, prefix: str) -> str:
    """The first child directory of d named prefix* (a namespace's block device, a dax device)."""
    try:
        return next((c.name for c in sorted(d.iterdir()) if c.name.startswith(prefix)), "")
    except OSError:
        return ""


def scan_namespaces(nd: Path = ND) -> list[Namespace]:
    """Every namespace with a size (a labelled region's empty seed has none), by region and number."""
    out = []
    try:
        names = sorted(p.name for p in nd.iterdir() if _NS.match(p.name))
    except OSError:
        return []
    for name in names:
        d = nd / name
        size = _int(_read(d / "size", "0")) or 0
        if size <= 0:
            continue
        holder = _read(d / "holder")
        owner = nd / holder if holder else d
        block = _child(owner / "block", "pmem") or _child(d / "block", "pmem")
        dax = ""
        if holder.startswith("dax"):
            dax = _child(owner, "dax") or holder  # the dax bus device under the nd dax device
        m = _NS.match(name)
        out.append(Namespace(name=name, region=f"region{m.group(1)}" if m else "?",
                             mode=MODES.get(_read(d / "mode"), _read(d / "mode") or "?"), size=size,
                             resource=_int(_read(d / "resource")), holder=holder, block=block, dax=dax,
                             enabled=(owner / "driver").exists()))
    return sorted(out, key=lambda n: n.order)


@dataclass(frozen=True)
class DaxDevice:
    """A device-dax instance (/sys/bus/dax/devices/daxX.Y)."""

    name: str
    size: int
    align: int

    @property
    def path(self) -> str:
        return str(DEV / self.name)


def scan_dax(bus: Path = DAX_BUS) -> list[DaxDevice]:
    out = []
    try:
        names = sorted(p.name for p in bus.iterdir() if p.name.startswith("dax"))
    except OSError:
        return []
    for name in names:
        size = _int(_read(bus / name / "size", "0")) or 0
        align = _int(_read(bus / name / "align", str(ALIGN))) or ALIGN
        out.append(DaxDevice(name, size, align))
    return out


@dataclass(frozen=True)
class Plan:
    """Which namespace each kind uses, and which must be reconfigured first."""

    fsdax: Namespace | None
    devdax: Namespace | None
    convert: tuple[tuple[Namespace, str], ...]
    why_not: dict[str, str]  # kind -> why it has no namespace


def plan(namespaces: list[Namespace]) -> Plan:
    """fsdax: the first namespace already in fsdax mode with a block device, else the first raw one;
    devdax: the first already in devdax mode, else the last raw one that fsdax does not take. One
    namespace alone stays fsdax (the runner gives two)."""
    ns = sorted(namespaces, key=lambda n: n.order)
    raw = [n for n in ns if n.mode == "raw"]
    fs = next((n for n in ns if n.mode == "fsdax" and n.block), None) or (raw[0] if raw else None)
    dd = next((n for n in ns if n.mode == "devdax"), None)
    if dd is None:
        rest = [n for n in raw if n is not fs]
        dd = rest[-1] if rest else None
    why: dict[str, str] = {}
    if not ns:
        why["fsdax"] = why["devdax"] = "no pmem namespace in /sys/bus/nd/devices"
    else:
        shown = ", ".join(n.describe() for n in ns)
        if fs is None:
            why["fsdax"] = f"no namespace can be fsdax (none raw or fsdax): {shown}"
        if dd is None:
            left = "the only one stays fsdax" if len(ns) == 1 else "none raw or devdax"
            why["devdax"] = f"no namespace is left for devdax ({left}): {shown}"
    todo = tuple((n, m) for n, m in ((fs, "fsdax"), (dd, "devdax")) if n is not None and n.mode == "raw")
    return Plan(fs, dd, todo, why)


# ---- reconfiguring a scratch namespace through sysfs --------------------------------------------------
def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise DaxUnavailable(f"echo {value} > {path}: {errno.errorcode.get(e.errno or 0, e.errno)} "
                             f"({e.strerror})") from e


def convert_steps(ns: Namespace, mode: str, seed: str) -> list[tuple[str, str]]:
    """The sysfs writes (path relative to /sys/bus, value) that turn a raw namespace into `mode`
    through the region's pfn seed (fsdax) or dax seed (devdax): what ndctl create-namespace -f -e
    <ns> -m fsdax|devdax does for a label-less namespace, minus ndctl."""
    driver = "nd_pmem" if mode == "fsdax" else "dax_pmem"
    steps = [("nd/drivers/nd_pmem/unbind", ns.name)] if ns.enabled else []
    return [
        *steps,
        (f"nd/devices/{seed}/uuid", str(uuid.uuid4())),
        (f"nd/devices/{seed}/mode", "pmem"),  # struct pages on the device itself (ndctl --map=dev)
        (f"nd/devices/{seed}/align", str(ALIGN)),
        (f"nd/devices/{seed}/namespace", ns.name),
        (f"nd/drivers/{driver}/bind", seed),
    ]


def convert(ns: Namespace, mode: str, bus: Path = ND.parent.parent, timeout: float = 10.0) -> Namespace:
    """Reconfigure a raw scratch namespace to fsdax or devdax; returns it as sysfs shows it after."""
    seed_attr = "pfn_seed" if mode == "fsdax" else "dax_seed"
    seed = _read(bus / "nd" / "devices" / ns.region / seed_attr)
    if not seed:
        raise DaxUnavailable(f"{ns.describe()}: {ns.region} has no {seed_attr} (CONFIG_NVDIMM_"
                             f"{'PFN' if mode == 'fsdax' else 'DAX'} off?)")
    for rel, value in convert_steps(ns, mode, seed):
        _write(bus / rel, value)
    end = time.monotonic() + timeout
    while True:
        now = {n.name: n for n in scan_namespaces(bus / "nd" / "devices")}.get(ns.name)
        node = (now.block if mode == "fsdax" else now.dax) if now else ""
        if now is not None and now.mode == mode and node and (DEV / node).exists():
            return now
        if time.monotonic() > end:
            raise DaxUnavailable(f"{ns.name} -> {mode} through {seed}: no device node after {timeout:g} s "
                                 f"(sysfs says {now.describe() if now else 'nothing'})")
        time.sleep(0.05)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One process at a time reconfigures or formats scratch pmem (xdist workers share it)."""
    fd = os.open(Path(tempfile.gettempdir()) / "kvm-harness-dax.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def scratch() -> bool:
    return os.environ.get(PMEM_ENV, "") == "scratch"


def prepare_scratch(bus: Path = ND.parent.parent) -> Plan:
    """With KVM_HARNESS_PMEM=scratch: bring the namespaces to their roles (idempotent)."""
    with _locked():
        p = plan(scan_namespaces(bus / "nd" / "devices"))
        for ns, mode in p.convert:
            convert(ns, mode, bus)
        return plan(scan_namespaces(bus / "nd" / "devices")) if p.convert else p


def _devices_here() -> list[str]:
    return sorted(str(p) for pat in ("pmem*", "dax*") for p in DEV.glob(pat))


def _not_ours(kind: str, found: list[str], how: str) -> str:
    return (f"{kind}: found {', '.join(found)}, but the harness overwrites only pmem it is given: {how}, "
            f"or {PMEM_ENV}=scratch (every namespace: reconfigured and reformatted)")


# ---- devdax ------------------------------------------------------------------------------------------
def devdax_device() -> DaxDevice:
    """The devdax device this process may use, or DaxUnavailable with the reason."""
    explicit = os.environ.get(DEVDAX_ENV, "")
    if explicit:
        name = Path(explicit).name
        dev = next((d for d in scan_dax() if d.name == name), None)
        if dev is None or not os.path.exists(explicit):
            raise DaxUnavailable(f"{DEVDAX_ENV}={explicit}: no such device-dax device (/sys/bus/dax/devices)")
        return _check_align(dev)
    found = _devices_here()
    if not scratch():
        if not found and not scan_namespaces():
            raise DaxUnavailable(NO_PMEM)
        raise DaxUnavailable(_not_ours("devdax", found or ["pmem namespaces"], f"{DEVDAX_ENV}=/dev/daxX.Y"))
    p = prepare_scratch()
    if p.devdax is None or not p.devdax.dax:
        raise DaxUnavailable(f"devdax: {p.why_not.get('devdax', 'no device-dax device')}")
    dev = next((d for d in scan_dax() if d.name == p.devdax.dax), None)
    if dev is None:
        raise DaxUnavailable(f"devdax: {p.devdax.describe()} has no /sys/bus/dax/devices/{p.devdax.dax}")
    return _check_align(dev)


def _check_align(dev: DaxDevice) -> DaxDevice:
    if dev.align != ALIGN:
        raise DaxUnavailable(f"{dev.path}: align {dev.align:#x}; the devdax backing maps 2 MiB pages "
                             f"({ALIGN:#x})")
    if dev.size < ALIGN:
        raise DaxUnavailable(f"{dev.path}: {dev.size} bytes, less than one 2 MiB page")
    return dev


_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock (x86_64): l_type, l_whence, l_start, l_len, l_pid


def _ofd_lock(fd: int, start: int, length: int, kind: int = fcntl.F_WRLCK) -> bool:
    """An open-file-description lock on [start, start+length) of fd's inode; False if another holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


_libc = ctypes.CDLL(None, use_errno=True)
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p


class DevDaxBacking(Backing):
    """A 2 MiB-aligned range of a device-dax device, mapped MAP_SHARED (device offset `offset`)."""

    kind = "devdax"
    page_size = PAGE_2M
    features = (Feature.FD | Feature.SHARED | Feature.REMAP_KEEPS_DATA | Feature.HUGE | Feature.READONLY_SLOT
                | Feature.SLOT_CHANGES | Feature.DAX | Feature.DEVICE)
    punch_method = "none: a device-dax device's memory is never released (fallocate: ENODEV)"
    footprint_method = "mincore of the mapping (what is mapped now; the device memory itself stays)"

    def __init__(self, size: int, device: DaxDevice | None = None) -> None:
        super().__init__(size)
        self.device = ""
        self.offset = 0
        dev = device or devdax_device()
        self.device = dev.path
        try:
            self.fd = os.open(dev.path, os.O_RDWR | os.O_CLOEXEC)
            if not stat.S_ISCHR(os.fstat(self.fd).st_mode):
                raise DaxUnavailable(f"{dev.path} is no character device")
            self.offset = self._take(dev)
            self._mapping = hostmem.Mapping(self.length, flags=hostmem.MAP_SHARED, fd=self.fd, offset=self.offset)
            self.addr = self._mapping.addr
            # fresh memory reads zeros, as every other kind's: the device keeps what its last user wrote;
            # then the host page tables go again (the memory stays), so first touches fault as elsewhere
            _libc.memset(self.addr, 0, self.length)
            hostmem.madvise(self.addr, self.length, hostmem.MADV_DONTNEED)
        except BaseException:
            self.close()
            raise

    def _take(self, dev: DaxDevice) -> int:
        for start in range(0, dev.size - self.length + 1, ALIGN):
            if _ofd_lock(self.fd, start, self.length):
                return start
        raise DaxUnavailable(f"{dev.path}: no free {self.length >> 20} MiB range of {dev.size >> 20} MiB "
                             "(other backings hold the rest)")

    def punch_hole(self, offset: int, length: int) -> None:
        raise DaxUnavailable(f"devdax: {self.punch_method}")

    def read_fd(self, offset: int, length: int) -> bytes:
        """A second view of the same device memory: another mapping of the device at the same offset
        (read(2) on a device-dax device is EINVAL)."""
        self._check_range(offset, length)
        lo = (self.offset + offset) // ALIGN * ALIGN
        hi = (self.offset + offset + length + ALIGN - 1) // ALIGN * ALIGN
        with hostmem.Mapping(hi - lo, prot=hostmem.PROT_READ, flags=hostmem.MAP_SHARED, fd=self.fd, offset=lo) as m:
            return bytes(hostmem.view(m.addr + self.offset + offset - lo, length))

    def footprint(self) -> int:
        return usage.resident_bytes(self.addr, self.length)

    def describe(self) -> str:
        return super().describe() + f", {self.device} offset {self.offset:#x}"


# ---- fsdax -------------------------------------------------------------------------------------------
def ext4_label(sb: bytes) -> str | None:
    """The volume label of an ext4 superblock (the 1024 bytes at offset 1024), None if it is none."""
    if len(sb) < 0x88 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    return sb[0x78:0x88].split(b"\0", 1)[0].decode(errors="replace")


def mount_options(mountinfo: str, path: str) -> tuple[str, str, str] | None:
    """(mount point, fs type, mount + super options) of the mount holding path, from mountinfo text."""
    best: tuple[str, str, str] | None = None
    for line in mountinfo.splitlines():
        f = line.split()
        if len(f) < 10 or "-" not in f[6:]:
            continue
        sep = f.index("-", 6)
        mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[4])
        inside = path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best[0])):
            best = (mp, f[sep + 1], f"{f[5]},{f[sep + 3] if len(f) > sep + 3 else ''}")
    return best


def is_dax_mount(options: str) -> bool:
    opts = options.split(",")
    return "dax" in opts or "dax=always" in opts


def _fsdax_scratch_mount(m: Mounts, dev: str) -> Path:
    """ext4 -o dax on a scratch fsdax namespace: formatted once (label kh-fsdax), mounted by each
    process under its private Mounts directory (so Mounts.close unmounts it and the ledger knows)."""
    name = f"fsdax-{Path(dev).name}"
    if name in m._mounted:
        return m._mounted[name]
    m._check_open()
    with _locked():
        with open(dev, "rb") as f:
            sb = os.pread(f.fileno(), 1024, 1024)
        if ext4_label(sb) != LABEL:
            m._run(["mkfs.ext4", "-q", "-F", "-b", str(PAGE_4K), "-L", LABEL,
                    "-E", "lazy_itable_init=1,lazy_journal_init=1", dev])
    target = m.base / name
    with cleanup.critical():
        m._record("mounts", target)
        try:
            target.mkdir(exist_ok=True)
            mount(dev, target, "ext4", "dax")
        except BaseException:
            with contextlib.suppress(OSError):
                target.rmdir()
            m._forget([("mounts", str(target))])
            raise
        m._mounted[name] = target
    return target


def fsdax_dir(m: Mounts) -> Path:
    """A directory on a filesystem mounted with dax that this process may create files in."""
    explicit = os.environ.get(FSDAX_DIR_ENV, "")
    if explicit:
        with open("/proc/self/mountinfo") as f:
            mo = mount_options(f.read(), os.path.realpath(explicit))
        if not os.path.isdir(explicit) or mo is None or not is_dax_mount(mo[2]):
            raise DaxUnavailable(f"{FSDAX_DIR_ENV}={explicit}: not a directory on a filesystem mounted with "
                                 f"dax ({mo[0] + ': ' + mo[2] if mo else 'no mount found'})")
        return Path(explicit)
    found = _devices_here()
    if not scratch():
        if not found and not scan_namespaces():
            raise DaxUnavailable(NO_PMEM)
        raise DaxUnavailable(_not_ours("fsdax", found or ["pmem namespaces"],
                                       f"{FSDAX_DIR_ENV}=<a directory on a filesystem mounted -o dax>"))
    p = prepare_scratch()
    if p.fsdax is None or not p.fsdax.block:
        raise DaxUnavailable(f"fsdax: {p.why_not.get('fsdax', 'no pmem block device in fsdax mode')}")
    try:
        return _fsdax_scratch_mount(m, f"/dev/{p.fsdax.block}")
    except MountError as e:
        raise DaxUnavailable(f"fsdax on {p.fsdax.describe()}: {e}") from e


class FsDaxBacking(_MountedFileBacking):
    """MAP_SHARED of a file on a filesystem mounted -o dax: the file's pages are the pmem's."""

    kind = "fsdax"
    features = _MountedFileBacking.features | Feature.DAX
    punch_method = "fallocate(PUNCH_HOLE|KEEP_SIZE) on the DAX file (frees pmem blocks; no page cache)"
    footprint_method = "st_blocks of the file (pmem blocks; DAX keeps no page cache)"

    def __init__(self, size: int, mounts: Mounts | None = None) -> None:
        super().__init__(size)
        m = mounts or default_mounts()
        d = fsdax_dir(m)
        # processes share the filesystem (one per namespace): names of their own
        self.path = d / f"kvm-harness-fsdax.{os.getpid()}.{secrets.token_hex(4)}"
        self._adopt(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))

    def fsync(self) -> None:
        os.fsync(self.fd)


# ---- what the kernel shows of a DAX mapping (cases/test_dax.py) ------------------------------------------
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1


def pagemap_pfns(addr: int, length: int, step: int = PAGE_4K, pagemap: str = "/proc/self/pagemap") -> list[int | None]:
    """The PFN behind every `step` bytes of [addr, addr+length) (root sees PFNs), None where not present."""
    out: list[int | None] = []
    fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for a in range(addr, addr + length, step):
            (e,) = struct.unpack("<Q", os.pread(fd, 8, a // PAGE_4K * 8))
            out.append(e & PM_PFN_MASK if e & PM_PRESENT else None)
    finally:
        os.close(fd)
    return out


def smaps_entry(smaps: str, addr: int) -> dict[str, str]:
    """The smaps fields of the mapping starting at addr ("path", "KernelPageSize", "Rss", ...; sizes in kB
    as the kernel writes them)."""
    out: dict[str, str] = {}
    inside = False
    for line in smaps.splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            if inside:
                break
            inside = int(head.group(1), 16) == addr
            if inside:
                out["path"] = head.group(3)
            continue
        if inside and ":" in line:
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def kb(field: str) -> int:
    """'2048 kB' -> bytes."""
    n, _, unit = field.partition(" ")
    return int(n) * (1024 if unit.strip() == "kB" else 1)


def iomem_ranges(iomem: str, name: str) -> list[tuple[int, int]]:
    """[start, end] (inclusive, as /proc/iomem prints them) of the top-level entries called `name`."""
    out = []
    for line in iomem.splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) : (.*)$", line)  # top level: no indentation
        if m and m.group(3).strip() == name:
            out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out
