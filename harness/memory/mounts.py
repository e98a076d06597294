"""Private mounts for file-backed guest memory: tmpfs, hugetlbfs (per page size), ext4 on a loop device.

Everything lives under one private directory, $TMPDIR/kvm-harness-mnt.<pid>.<random>. `Mounts.close()`
unmounts (lazily when something still holds a file open), detaches the loop device and removes the
directory; an atexit hook does the same if the owner forgot, and so does the last resort after
SIGTERM (harness.memory.cleanup). Each folder, mount point, image and loop device is written to the
machine-wide ledger (harness.memory.ledger) before it is made, and `cleanup_stale()` gives back what
dead processes recorded there, wherever their TMPDIR was, then scans the default temp folders for
what runs from before the ledger left.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from harness.kvm.errors import HarnessError
from harness.memory import cleanup, ledger
from harness.memory.ledger import LEDGER, pid_alive
from harness.unsupported import Unsupported

PREFIX = "kvm-harness-mnt."
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)\.")
MNT_DETACH = 2
HOSTFS_DIR = "/var/tmp"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(Unsupported):
    """A mount the harness needs cannot be made here; the message says why (cases skip on it)."""


def mount(source: str, target: str | Path, fstype: str, options: str = "", flags: int = 0) -> None:
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags,
                     options.encode() if options else None)
    if rc != 0:
        e = ctypes.get_errno()
        raise MountError(f"mount -t {fstype} -o {options or '(none)'} {source} {target}: "
                         f"{errno.errorcode.get(e, e)} ({os.strerror(e)})")


def umount(target: str | Path, flags: int = 0) -> int:
    """umount2(2); returns 0 or the errno (never raises: callers clean up as much as they can)."""
    rc = _libc.umount2(str(target).encode(), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def mountpoints(mountinfo: str | None = None) -> list[str]:
    """Mount points from /proc/self/mountinfo (or the given text), octal escapes decoded."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return out


def loop_devices() -> dict[str, str]:
    """Attached loop devices: /dev/loopN -> backing file."""
    out = {}
    sys_block = Path("/sys/block")
    if not sys_block.is_dir():
        return out
    for d in sys_block.glob("loop*"):
        bf = d / "loop" / "backing_file"
        try:
            out[f"/dev/{d.name}"] = bf.read_text().strip()
        except OSError:
            continue
    return out


def detach_loop(dev: str) -> None:
    # A loop device still held by a lazily unmounted fs gets autoclear and goes when released.
    # Own session: a SIGTERM to the run's process group must not kill the helper half-way.
    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False, start_new_session=True)


def owner_pid(path: str) -> int | None:
    m = _NAME.search(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


def cleanup_dir(base: str | Path) -> list[str]:
    """Unmount everything under base, detach loop devices whose image is under it, remove it.

    Returns what was left mounted/attached before the cleanup (for reports)."""
    base = str(base).rstrip("/")
    found = []
    for mp in sorted(mountpoints(), key=len, reverse=True):
        if mp == base or mp.startswith(base + "/"):
            found.append(mp)
            if umount(mp) != 0:
                umount(mp, MNT_DETACH)
    for dev, backing in loop_devices().items():
        if backing.startswith(base + "/"):
            found.append(dev)
            detach_loop(dev)
    shutil.rmtree(base, ignore_errors=True)
    return found


def _mounted_under(base: str, mps: list[str]) -> list[str]:
    base = base.rstrip("/")
    return [mp for mp in mps if mp == base or mp.startswith(base + "/")]


def _recover_owner(rec: dict[str, Any], same_boot: bool) -> tuple[list[str], dict[str, list[str]]]:
    """Give back what one dead owner recorded, and nothing else: its recorded mount points (deepest
    first), loop devices whose backing file is one of its recorded images, then its folders unless a
    mount nobody recorded is still under one. Returns (what was removed, records still pending)."""
    done: list[str] = []
    left: dict[str, list[str]] = {}
    if same_boot:  # mounts and loop devices of an earlier boot are gone already
        live = set(mountpoints())
        for mp in sorted(rec.get("mounts", []), key=len, reverse=True):
            if mp not in live:
                continue
            if umount(mp) == 0 or umount(mp, MNT_DETACH) == 0:
                done.append(mp)
            else:
                left.setdefault("mounts", []).append(mp)
        images = set(rec.get("images", []))
        for dev, backing in loop_devices().items():
            if backing.removesuffix(" (deleted)") in images:
                detach_loop(dev)
                done.append(dev)
    mps = mountpoints()
    for d in rec.get("dirs", []):
        if not os.path.lexists(d):
            continue
        if _mounted_under(d, mps):
            left.setdefault("dirs", []).append(d)  # never rmtree into a mount that is not ours
            continue
        shutil.rmtree(d, ignore_errors=True)
        done.append(d)
    return done, left


def recover_recorded(path: Path = LEDGER) -> list[str]:
    """Give back the folders, mounts and loop devices the ledger records for dead owners (see
    ledger.Owner.alive: another boot, or no process with that pid and start time). Live owners,
    including other concurrent runs, are never touched."""
    if not path.exists():
        return []
    cleaned: list[str] = []
    try:
        with ledger.locked(path) as led:
            owners = led.get("owners", {})
            for key, rec in list(owners.items()):
                try:
                    owner = ledger.Owner.from_record(rec)
                except (KeyError, TypeError, ValueError):
                    del owners[key]  # unreadable record: nothing it names can be trusted
                    continue
                if owner.alive():
                    continue
                done, left = _recover_owner(rec, owner.boot == ledger.boot_id())
                cleaned += done
                if left:
                    rec.update({k: left.get(k, []) for k in ledger.KINDS})
                    cleaned += [f"kept {x} of dead pid {owner.pid}: a mount it did not record is under it"
                                for x in left.get("dirs", [])]
                else:
                    del owners[key]
    except OSError:
        return cleaned
    return cleaned


def recorded_dirs(path: Path = LEDGER) -> set[str]:
    """Every folder any owner (dead or alive) has in the ledger."""
    return {d for rec in ledger.owners(path).values() for d in rec.get("dirs", [])} if path.exists() else set()


def cleanup_stale(roots: list[str] | None = None, ledger_path: Path = LEDGER) -> list[str]:
    """Clean up what harness processes that are gone left: first everything the ledger records for
    dead owners (wherever it is), then, for runs from before the ledger, the private folders in the
    default temp folders whose creator's pid is dead and that no ledger record names."""
    cleaned = recover_recorded(ledger_path)
    try:
        known = recorded_dirs(ledger_path)
    except OSError:
        known = set()
    for root in roots or [tempfile.gettempdir(), HOSTFS_DIR]:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            pid = owner_pid(path)
            if name.startswith(PREFIX) and pid is not None and not pid_alive(pid) \
                    and os.path.realpath(path) not in known:
                cleaned += cleanup_dir(path) or [path]
    return cleaned


class Mounts:
    """The private mounts of one process; each kind is mounted once, on first use."""

    def __init__(self, tmpdir: str | None = None, ledger_path: Path = LEDGER) -> None:
        self.ledger = ledger_path
        self._records: list[tuple[str, str]] = []  # what this object put in the ledger
        self._mounted: dict[str, Path] = {}
        self._loop: str | None = None
        self._seq = 0
        self.closed = False
        self.base = self._private_dir(tmpdir or tempfile.gettempdir())
        atexit.register(self.close)
        cleanup.register(self.close)

    # ---- the mounts ----------------------------------------------------------------------------
    def tmpfs(self) -> Path:
        return self._mount("tmpfs", "tmpfs", "mode=0700")

    def hugetlbfs(self, page_size: int) -> Path:
        name = f"hugetlbfs-{page_size >> 10}k"
        return self._mount(name, "hugetlbfs", f"pagesize={page_size >> 10}K,mode=0700")

    def ext4(self, image_size: int = 1 << 30) -> Path:
        """ext4 on a loop device over a sparse image in the private directory (on the host's disk)."""
        if "ext4" in self._mounted:
            return self._mounted["ext4"]
        self._check_open()
        for tool in ("mkfs.ext4", "losetup"):
            if shutil.which(tool) is None:
                raise MountError(f"{tool} is not installed: cannot make ext4 on a loop device")
        img = self.base / "ext4.img"
        target = self.base / "ext4"
        with cleanup.critical():  # a SIGTERM lands after the whole step or its undoing, not half-way
            # on file first: recovery finds the loop device by its backing image, even one losetup
            # attached just before a SIGKILL
            self._record("images", img)
            self._record("mounts", target)
            try:
                with open(img, "wb") as f:
                    f.truncate(image_size)
                self._run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(img)])
                self._loop = self._run(["losetup", "--find", "--show", str(img)]).strip()
                self._record("loops", self._loop)
                target.mkdir(exist_ok=True)
                mount(self._loop, target, "ext4")
            except BaseException:
                undo = [("images", str(img)), ("mounts", str(target))]
                if self._loop:
                    detach_loop(self._loop)
                    undo.append(("loops", self._loop))
                    self._loop = None
                with contextlib.suppress(OSError):
                    target.rmdir()
                with contextlib.suppress(OSError):
                    img.unlink()
                self._forget(undo)
                raise
            self._mounted["ext4"] = target
        return target

    def hostfs(self) -> Path:
        """A directory on the machine's own root filesystem (not tmpfs): /var/tmp when it is a disk."""
        if "hostfs" not in self._mounted:
            self._check_open()
            st = os.stat(HOSTFS_DIR)
            dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
            if not os.path.exists(f"/sys/dev/block/{dev}"):
                # tmpfs, overlay or 9p (e.g. inside the QEMU kernel runner): no disk to write back to
                raise MountError(f"{HOSTFS_DIR} is on device {dev}, which is no block device")
            with cleanup.critical():
                self._mounted["hostfs"] = self._private_dir(HOSTFS_DIR)
        return self._mounted["hostfs"]

    def new_file(self, directory: Path, stem: str) -> Path:
        self._seq += 1
        return directory / f"{stem}.{self._seq}"

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Unmount everything, detach the loop device, remove the directory. Idempotent."""
        if self.closed:
            return []
        with cleanup.critical():  # all of it, even when SIGTERM arrives meanwhile
            self.closed = True
            atexit.unregister(self.close)
            cleanup.unregister(self.close)
            left = []
            for name, path in reversed(list(self._mounted.items())):
                if name == "hostfs":
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                if umount(path) != 0:
                    left.append(str(path))
                    umount(path, MNT_DETACH)
            self._mounted.clear()
            if self._loop:
                detach_loop(self._loop)
                self._loop = None
            left += cleanup_dir(self.base)
            self._forget(list(self._records))
        return left

    def _check_open(self) -> None:
        if self.closed:
            raise HarnessError("Mounts is closed")

    def _private_dir(self, parent: str) -> Path:
        """parent/kvm-harness-mnt.<pid>.<random>, mode 0700, in the ledger before it exists."""
        parent = os.path.realpath(parent)  # as mountinfo and loop backing files will show it
        while True:
            d = Path(parent) / f"{PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
            with cleanup.critical():
                self._record("dirs", d)
                try:
                    d.mkdir(mode=0o700)
                    return d
                except FileExistsError:
                    self._forget([("dirs", str(d))])
                except BaseException:
                    self._forget([("dirs", str(d))])
                    raise

    def _record(self, kind: str, value: str | Path) -> None:
        if ledger.record(kind, value, self.ledger):
            self._records.append((kind, str(value)))

    def _forget(self, items: list[tuple[str, str]]) -> None:
        ledger.forget(items, self.ledger)
        for it in items:
            if it in self._records:
                self._records.remove(it)

    def _mount(self, name: str, fstype: str, options: str) -> Path:
        self._check_open()
        if name not in self._mounted:
            target = self.base / name
            with cleanup.critical():
                self._record("mounts", target)
                try:
                    target.mkdir(exist_ok=True)
                    mount("none", target, fstype, options)
                except BaseException:
                    with contextlib.suppress(OSError):
                        target.rmdir()
                    self._forget([("mounts", str(target))])
                    raise
                self._mounted[name] = target
        return self._mounted[name]

    @staticmethod
    def _run(argv: list[str]) -> str:
        # own session: a SIGTERM to the run's process group must not kill mkfs/losetup half-way
        p = subprocess.run(argv, capture_output=True, text=True, check=False, start_new_session=True)
        if p.returncode != 0:
            raise MountError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def __enter__(self) -> Mounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Mounts | None = None


def default_mounts() -> Mounts:
    """The process-wide Mounts the backings use unless given one (closed at exit)."""
    global _default
    if _default is None or _default.closed:
        _default = Mounts()
    return _default


def close_default() -> list[str]:
    global _default
    left = _default.close() if _default is not None else []
    _default = None
    return left
