"""Private mounts for file-backed guest memory: tmpfs, hugetlbfs (per page size), ext4 on a loop device.

Everything lives under one private directory, /tmp/kvm-harness-mnt.<pid>.<random>. `Mounts.close()`
unmounts (lazily when something still holds a file open), detaches the loop device and removes the
directory; an atexit hook does the same if the owner forgot, and `cleanup_stale()` removes what a
killed run (its pid is gone) left behind.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness.errors import HarnessError

PREFIX = "kvm-harness-mnt."
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)\.")
MNT_DETACH = 2
HOSTFS_DIR = "/var/tmp"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(HarnessError):
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
    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def owner_pid(path: str) -> int | None:
    m = _NAME.search(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


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


def cleanup_stale(roots: list[str] | None = None) -> list[str]:
    """Clean up the private directories (and their mounts) of harness processes that are gone."""
    cleaned = []
    for root in roots or [tempfile.gettempdir(), HOSTFS_DIR]:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            pid = owner_pid(path)
            if name.startswith(PREFIX) and pid is not None and not pid_alive(pid):
                cleaned += cleanup_dir(path) or [path]
    return cleaned


class Mounts:
    """The private mounts of one process; each kind is mounted once, on first use."""

    def __init__(self, tmpdir: str | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}.", dir=tmpdir))
        self._mounted: dict[str, Path] = {}
        self._loop: str | None = None
        self._seq = 0
        self.closed = False
        atexit.register(self.close)

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
        for tool in ("mkfs.ext4", "losetup"):
            if shutil.which(tool) is None:
                raise MountError(f"{tool} is not installed: cannot make ext4 on a loop device")
        img = self.base / "ext4.img"
        with open(img, "wb") as f:
            f.truncate(image_size)
        self._run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(img)])
        self._loop = self._run(["losetup", "--find", "--show", str(img)]).strip()
        target = self.base / "ext4"
        target.mkdir()
        mount(self._loop, target, "ext4")
        self._mounted["ext4"] = target
        return target

    def hostfs(self) -> Path:
        """A directory on the machine's own root filesystem (not tmpfs): /var/tmp when it is a disk."""
        if "hostfs" not in self._mounted:
            st = os.stat(HOSTFS_DIR)
            dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
            if not os.path.exists(f"/sys/dev/block/{dev}"):
                # tmpfs, overlay or 9p (e.g. inside the QEMU kernel runner): no disk to write back to
                raise MountError(f"{HOSTFS_DIR} is on device {dev}, which is no block device")
            d = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}.", dir=HOSTFS_DIR))
            self._mounted["hostfs"] = d
        return self._mounted["hostfs"]

    def new_file(self, directory: Path, stem: str) -> Path:
        self._seq += 1
        return directory / f"{stem}.{self._seq}"

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Unmount everything, detach the loop device, remove the directory. Idempotent."""
        if self.closed:
            return []
        self.closed = True
        atexit.unregister(self.close)
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
        return left

    def _mount(self, name: str, fstype: str, options: str) -> Path:
        if self.closed:
            raise HarnessError("Mounts is closed")
        if name not in self._mounted:
            target = self.base / name
            target.mkdir()
            mount("none", target, fstype, options)
            self._mounted[name] = target
        return self._mounted[name]

    @staticmethod
    def _run(argv: list[str]) -> str:
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
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
