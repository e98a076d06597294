"""A vhost device fd (/dev/vhost-vsock, /dev/vhost-net): the ioctls, its worker, a bounded close.

    dev = VhostVsock.open()                       # VhostUnavailable (a skip) where there is none
    dev.set_owner()                               # the kernel starts the worker "vhost-<pid>"
    dev.set_features(dev.get_features() & want)
    dev.set_mem_table(regions_from_memslots(vm.memslots.values()))   # GPA -> userspace address
    dev.set_vring_num(0, 256); dev.set_vring_base(0, 0); dev.set_vring_addr(0, desc, used, avail)
    dev.set_vring_kick(0, kick_fd); dev.set_vring_call(0, call_fd); dev.set_vring_err(0, err_fd)
    dev.set_guest_cid(cid); dev.set_running(True)
    ...
    dev.close(timeout=10)                         # VhostStuck if release does not return in time
    dev.wait_worker_gone(timeout=5)               # VhostStuck naming the task and its kernel stack

Every ioctl error is a VhostError naming the ioctl, its arguments and the errno.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import gzip
import os
import platform
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.unsupported import Unsupported
from harness.vhost import uapi


class VhostUnavailable(Unsupported):
    """No vhost device of this kind on this kernel; the message says why (cases skip on it)."""


class VhostError(OSError):
    """A vhost ioctl failed: carries the ioctl's name, its arguments and the errno."""

    def __init__(self, err: int, ioctl: str, args: str = "") -> None:
        self.ioctl = ioctl
        self.call_args = args
        name = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{ioctl}({args}) -> {name} ({os.strerror(err)})")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class VhostStuck(AssertionError):
    """The vhost device did not let go within its bound (release blocked, worker still alive): a
    kernel verdict, so an AssertionError; the message carries the worker's kernel stack."""


@dataclass(frozen=True)
class MemRegion:
    """One entry of VHOST_SET_MEM_TABLE: guest physical [gpa, gpa+size) is userspace [hva, ...)."""

    gpa: int
    size: int
    hva: int

    def pack(self) -> bytes:
        return uapi.MEMORY_REGION.pack(self.gpa, self.size, self.hva, 0)


def regions_from_memslots(memslots: Iterable[Any]) -> list[MemRegion]:
    """The vhost memory table of a VM: one region per memslot that has a host mapping (a
    guest_memfd slot without one has nothing vhost could reach). Anything with gpa/size/hva works."""
    out = []
    for m in sorted(memslots, key=lambda m: m.gpa):
        if not m.hva or not m.size:
            continue
        for what, v in (("gpa", m.gpa), ("size", m.size), ("hva", m.hva)):
            if v % uapi.VHOST_PAGE_SIZE:
                raise ValueError(f"memslot {getattr(m, 'slot', '?')}: {what} {v:#x} is not 4 KiB aligned, "
                                 "which VHOST_SET_MEM_TABLE requires")
        out.append(MemRegion(m.gpa, m.size, m.hva))
    return out


def pack_mem_table(regions: list[MemRegion]) -> bytearray:
    return bytearray(uapi.MEMORY.pack(len(regions), 0) + b"".join(r.pack() for r in regions))


# ---- why a device is missing --------------------------------------------------------------------
def _kernel_config() -> tuple[dict[str, str], str] | None:
    """(CONFIG_* values, where they came from) of the running kernel, or None."""
    rel = platform.release()
    for path in ("/proc/config.gz", f"/boot/config-{rel}", f"/lib/modules/{rel}/config",
                 f"/usr/lib/modules/{rel}/config"):
        try:
            raw = Path(path).read_bytes()
        except OSError:
            continue
        text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode(errors="replace")
        cfg = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                cfg[k] = v
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                cfg[line[2:-len(" is not set")]] = "n"
        return cfg, path
    return None


def unavailable_reason(device: str, option: str, err: OSError | None = None) -> str:
    """Why `device` cannot be opened here, in words: the kernel option's state when it can be read."""
    rel = platform.release()
    got = _kernel_config()
    if err is not None and err.errno not in (_errno.ENOENT, _errno.ENODEV, _errno.ENXIO):
        return f"cannot open {device}: {err.strerror}"
    if got is None:
        return f"{device} missing on {rel} (and no kernel config to say whether {option} is built)"
    cfg, where = got
    val = cfg.get(option, "n")
    if val == "n":
        return f"{option} not set on {rel} ({where}): no {device}"
    if val == "m":
        return (f"{device} missing on {rel}: {option}=m but the module is not loaded "
                f"(modprobe {option[len('CONFIG_'):].lower()})")
    return f"{device} missing on {rel} although {option}={val} ({where}): no devtmpfs node?"


# ---- the device ----------------------------------------------------------------------------------
class VhostDevice:
    """An open vhost character device. Subclasses name the device and add their own ioctls."""

    DEVICE = ""
    CONFIG = ""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.owner_pid = 0
        self.closed = False

    @classmethod
    def open(cls, path: str | None = None) -> VhostDevice:
        path = path or cls.DEVICE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VhostUnavailable(unavailable_reason(path, cls.CONFIG, e)) from e
        return cls(fd, path)

    # ---- raw ioctl -------------------------------------------------------------------------------
    def ioctl(self, number: int, arg: Any = 0, args: str = "") -> Any:
        """fcntl.ioctl (which drops the GIL); a bytearray argument is passed by address and updated."""
        if self.closed:
            raise VhostError(_errno.EBADF, uapi.ioctl_name(number), f"{args}; the device is closed")
        try:
            return fcntl.ioctl(self.fd, number, arg, True) if isinstance(arg, bytearray) \
                else fcntl.ioctl(self.fd, number, arg)
        except OSError as e:
            raise VhostError(e.errno or 0, uapi.ioctl_name(number), args) from None

    # ---- generic vhost ---------------------------------------------------------------------------
    def set_owner(self) -> None:
        self.ioctl(uapi.VHOST_SET_OWNER, 0)
        self.owner_pid = os.getpid()

    def get_features(self) -> int:
        buf = bytearray(8)
        self.ioctl(uapi.VHOST_GET_FEATURES, buf)
        return uapi.U64.unpack(buf)[0]

    def set_features(self, features: int) -> None:
        self.ioctl(uapi.VHOST_SET_FEATURES, bytearray(uapi.U64.pack(features)), f"{features:#x}")

    def set_mem_table(self, regions: list[MemRegion]) -> None:
        desc = ", ".join(f"{r.gpa:#x}+{r.size:#x}->{r.hva:#x}" for r in regions)
        self.ioctl(uapi.VHOST_SET_MEM_TABLE, pack_mem_table(regions), desc)

    def set_vring_num(self, index: int, num: int) -> None:
        self.ioctl(uapi.VHOST_SET_VRING_NUM, bytearray(uapi.VRING_STATE.pack(index, num)), f"vq {index}, num {num}")

    def set_vring_base(self, index: int, base: int) -> None:
        self.ioctl(uapi.VHOST_SET_VRING_BASE, bytearray(uapi.VRING_STATE.pack(index, base)),
                   f"vq {index}, base {base}")

    def get_vring_base(self, index: int) -> int:
        """The device's next avail index to read (last_avail_idx; bits 16+ carry the used index of
        a packed ring, 0 for split ones)."""
        buf = bytearray(uapi.VRING_STATE.pack(index, 0))
        self.ioctl(uapi.VHOST_GET_VRING_BASE, buf, f"vq {index}")
        return uapi.VRING_STATE.unpack(buf)[1]

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, log: int = 0, flags: int = 0) -> None:
        self.ioctl(uapi.VHOST_SET_VRING_ADDR, bytearray(uapi.VRING_ADDR.pack(index, flags, desc, used, avail, log)),
                   f"vq {index}, desc {desc:#x}, used {used:#x}, avail {avail:#x}")

    def _vring_file(self, number: int, index: int, fd: int) -> None:
        self.ioctl(number, bytearray(uapi.VRING_FILE.pack(index, fd)), f"vq {index}, fd {fd}")

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._vring_file(uapi.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._vring_file(uapi.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._vring_file(uapi.VHOST_SET_VRING_ERR, index, fd)

    # ---- the worker ------------------------------------------------------------------------------
    def worker_name(self) -> str:
        return f"vhost-{self.owner_pid}"

    def worker_tasks(self) -> list[tuple[int, str]]:
        """(tid, where) of the tasks named vhost-<owner pid>: a thread of this process (a
        vhost_task, what kernels since 6.4 make) or a kernel thread (older kernels, or
        fork_from_owner off)."""
        if not self.owner_pid:
            return []
        name = self.worker_name()
        found = []
        for tid in _listdir(f"/proc/{self.owner_pid}/task"):
            if _read(f"/proc/{self.owner_pid}/task/{tid}/comm") == name:
                found.append((int(tid), f"/proc/{self.owner_pid}/task/{tid}"))
        for pid in _listdir("/proc"):
            if pid.isdigit() and int(pid) != self.owner_pid and _read(f"/proc/{pid}/comm") == name:
                found.append((int(pid), f"/proc/{pid}"))
        return found

    def wait_worker_gone(self, timeout: float = 5.0) -> float:
        """Wait (bounded) until no vhost-<pid> task is left; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            left = self.worker_tasks()
            if not left:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise VhostStuck(f"the vhost worker {self.worker_name()} is still alive {timeout:.0f} s after "
                                 f"the device was closed:\n{_stacks(left)}")
            time.sleep(0.01)

    # ---- lifetime --------------------------------------------------------------------------------
    def close(self, timeout: float = 15.0) -> float:
        """Close the fd from a helper thread, bounded: the release flushes the worker, which a
        kernel bug can leave blocked forever. Returns the seconds the close took."""
        if self.closed:
            return 0.0
        self.closed = True
        done = threading.Event()
        err: list[BaseException] = []

        def closer() -> None:
            try:
                os.close(self.fd)
            except BaseException as e:
                err.append(e)
            finally:
                done.set()

        t0 = time.monotonic()
        threading.Thread(target=closer, name=f"{self.worker_name()}-close", daemon=True).start()
        if not done.wait(timeout):
            raise VhostStuck(f"close({self.path}) did not return within {timeout:.0f} s (the device release "
                             f"waits for the vhost worker):\n{_stacks(self.worker_tasks())}")
        if err:
            raise err[0]
        return time.monotonic() - t0

    def __enter__(self) -> VhostDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            try:
                os.close(self.fd)
            except OSError:
                pass


class VhostVsock(VhostDevice):
    """/dev/vhost-vsock: the host side of a virtio-vsock device, vrings RX (0) and TX (1)."""

    DEVICE = "/dev/vhost-vsock"
    CONFIG = "CONFIG_VHOST_VSOCK"

    def set_guest_cid(self, cid: int) -> None:
        self.ioctl(uapi.VHOST_VSOCK_SET_GUEST_CID, bytearray(uapi.U64.pack(cid)), f"cid {cid}")

    def set_running(self, running: bool) -> None:
        self.ioctl(uapi.VHOST_VSOCK_SET_RUNNING, bytearray(uapi.INT.pack(int(running))), f"{int(running)}")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _stacks(tasks: list[tuple[int, str]]) -> str:
    if not tasks:
        return "  (no vhost worker task found)"
    out = []
    for tid, where in tasks:
        state = next((ln for ln in _read(f"{where}/status").splitlines() if ln.startswith("State:")), "State: ?")
        out.append(f"  task {tid} ({where}), {state}, wchan {_read(f'{where}/wchan') or '?'}")
        out += [f"    {ln}" for ln in (_read(f"{where}/stack") or "(no kernel stack readable)").splitlines()]
    return "\n".join(out)
