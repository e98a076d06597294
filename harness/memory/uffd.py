"""userfaultfd(2): a small typed binding (include/uapi/linux/userfaultfd.h).

    uffd = Userfaultfd.open(THREAD_ID)                  # features this kernel lacks are dropped
    ioctls = uffd.register(addr, length, REGISTER_MISSING)
    for f in uffd.read(timeout=0.5):                    # UFFD_EVENT_PAGEFAULT messages
        uffd.copy(f.address & ~0xFFF, src, 4096)         # UFFDIO_COPY: the page appears, the fault wakes
    uffd.close()                                        # every held fault is woken (and retries)

The fd is opened with userfaultfd(2), or /dev/userfaultfd (USERFAULTFD_IOC_NEW) where the syscall
is refused; never with UFFD_USER_MODE_ONLY unless asked: the faults this harness holds are the
kernel's own (KVM's get_user_pages on behalf of a vCPU), which a user-mode-only fd would not see.
Argument structs are ctypes structures of the uapi's layout (tests/test_uffd_oracles.py pins their
sizes and the ioctl numbers); every ioctl goes through libc with the GIL released; a failure raises
UffdError naming the ioctl, its arguments and the errno.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import select
from dataclasses import dataclass
from typing import Any, ClassVar

# ---- uapi constants -------------------------------------------------------------------------------
SYS_USERFAULTFD = 323  # x86_64
DEV_USERFAULTFD = "/dev/userfaultfd"
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

# features (uffdio_api.features)
FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_EVENT_FORK = 1 << 1
FEATURE_EVENT_REMAP = 1 << 2
FEATURE_EVENT_REMOVE = 1 << 3
FEATURE_MISSING_HUGETLBFS = 1 << 4
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_EVENT_UNMAP = 1 << 6
FEATURE_SIGBUS = 1 << 7
FEATURE_THREAD_ID = 1 << 8
FEATURE_MINOR_HUGETLBFS = 1 << 9
FEATURE_MINOR_SHMEM = 1 << 10
FEATURE_EXACT_ADDRESS = 1 << 11
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_POISON = 1 << 14
FEATURE_WP_ASYNC = 1 << 15
FEATURE_MOVE = 1 << 16

FEATURE_NAMES = {
    FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP", FEATURE_EVENT_FORK: "EVENT_FORK",
    FEATURE_EVENT_REMAP: "EVENT_REMAP", FEATURE_EVENT_REMOVE: "EVENT_REMOVE",
    FEATURE_MISSING_HUGETLBFS: "MISSING_HUGETLBFS", FEATURE_MISSING_SHMEM: "MISSING_SHMEM",
    FEATURE_EVENT_UNMAP: "EVENT_UNMAP", FEATURE_SIGBUS: "SIGBUS", FEATURE_THREAD_ID: "THREAD_ID",
    FEATURE_MINOR_HUGETLBFS: "MINOR_HUGETLBFS", FEATURE_MINOR_SHMEM: "MINOR_SHMEM",
    FEATURE_EXACT_ADDRESS: "EXACT_ADDRESS", FEATURE_WP_HUGETLBFS_SHMEM: "WP_HUGETLBFS_SHMEM",
    FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED", FEATURE_POISON: "POISON", FEATURE_WP_ASYNC: "WP_ASYNC",
    FEATURE_MOVE: "MOVE",
}

REGISTER_MISSING = 1 << 0
REGISTER_WP = 1 << 1
REGISTER_MINOR = 1 << 2

COPY_MODE_DONTWAKE = 1 << 0
COPY_MODE_WP = 1 << 1
ZEROPAGE_MODE_DONTWAKE = 1 << 0
WRITEPROTECT_MODE_WP = 1 << 0
WRITEPROTECT_MODE_DONTWAKE = 1 << 1

# ioctl numbers inside the 0xAA space (bits of uffdio_register.ioctls / uffdio_api.ioctls)
_NR = {"UFFDIO_REGISTER": 0x00, "UFFDIO_UNREGISTER": 0x01, "UFFDIO_WAKE": 0x02, "UFFDIO_COPY": 0x03,
       "UFFDIO_ZEROPAGE": 0x04, "UFFDIO_MOVE": 0x05, "UFFDIO_WRITEPROTECT": 0x06, "UFFDIO_CONTINUE": 0x07,
       "UFFDIO_POISON": 0x08, "UFFDIO_API": 0x3F}


def ioctl_bit(name: str) -> int:
    """The bit of `name` in the ioctls masks UFFDIO_API and UFFDIO_REGISTER answer."""
    return 1 << _NR[name]


def feature_names(mask: int) -> list[str]:
    return [n for b, n in FEATURE_NAMES.items() if mask & b] + \
        [f"bit{i}" for i in range(64) if mask >> i & 1 and (1 << i) not in FEATURE_NAMES]


# ---- structs (the uapi's layout) -------------------------------------------------------------------
u64 = ctypes.c_uint64
s64 = ctypes.c_int64


class UffdioRange(ctypes.Structure):
    _fields_ = (("start", u64), ("len", u64))


class UffdioApi(ctypes.Structure):
    _fields_ = (("api", u64), ("features", u64), ("ioctls", u64))


class UffdioRegister(ctypes.Structure):
    _fields_ = (("range", UffdioRange), ("mode", u64), ("ioctls", u64))


class UffdioCopy(ctypes.Structure):
    _fields_ = (("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("copy", s64))


class UffdioZeropage(ctypes.Structure):
    _fields_ = (("range", UffdioRange), ("mode", u64), ("zeropage", s64))


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = (("range", UffdioRange), ("mode", u64))


class _Pagefault(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("flags", u64), ("address", u64), ("ptid", ctypes.c_uint32))


class _Remove(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("start", u64), ("end", u64))


class _MsgArg(ctypes.Union):
    _pack_ = 1
    _fields_ = (("pagefault", _Pagefault), ("remove", _Remove), ("reserved", u64 * 3))


class UffdMsg(ctypes.Structure):
    """struct uffd_msg (packed, 32 bytes): what read(2) on the fd returns, one per event."""

    _pack_ = 1
    _fields_ = (("event", ctypes.c_uint8), ("reserved1", ctypes.c_uint8), ("reserved2", ctypes.c_uint16),
                ("reserved3", ctypes.c_uint32), ("arg", _MsgArg))


def _ioc(direction: int, nr: int, size: int) -> int:
    """_IOC(dir, 0xAA, nr, size) (asm-generic/ioctl.h: nr 0-7, type 8-15, size 16-29, dir 30-31)."""
    return direction << 30 | size << 16 | UFFD_API << 8 | nr


_IOC_WRITE, _IOC_READ = 1, 2
IOCTLS: dict[str, int] = {
    "USERFAULTFD_IOC_NEW": _ioc(0, 0x00, 0),
    "UFFDIO_API": _ioc(_IOC_READ | _IOC_WRITE, _NR["UFFDIO_API"], ctypes.sizeof(UffdioApi)),
    "UFFDIO_REGISTER": _ioc(_IOC_READ | _IOC_WRITE, _NR["UFFDIO_REGISTER"], ctypes.sizeof(UffdioRegister)),
    "UFFDIO_UNREGISTER": _ioc(_IOC_READ, _NR["UFFDIO_UNREGISTER"], ctypes.sizeof(UffdioRange)),
    "UFFDIO_WAKE": _ioc(_IOC_READ, _NR["UFFDIO_WAKE"], ctypes.sizeof(UffdioRange)),
    "UFFDIO_COPY": _ioc(_IOC_READ | _IOC_WRITE, _NR["UFFDIO_COPY"], ctypes.sizeof(UffdioCopy)),
    "UFFDIO_ZEROPAGE": _ioc(_IOC_READ | _IOC_WRITE, _NR["UFFDIO_ZEROPAGE"], ctypes.sizeof(UffdioZeropage)),
    "UFFDIO_WRITEPROTECT": _ioc(_IOC_READ | _IOC_WRITE, _NR["UFFDIO_WRITEPROTECT"],
                                ctypes.sizeof(UffdioWriteprotect)),
}


# ---- errors ------------------------------------------------------------------------------------------
class UffdError(OSError):
    """A userfaultfd call failed: `ioctl` names it (or the syscall), errno is the kernel's answer."""

    def __init__(self, err: int, ioctl: str, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{ioctl}({detail}): {name} ({os.strerror(err)})")
        self.ioctl = ioctl


_libc = ctypes.CDLL(None, use_errno=True)  # CDLL: every call releases the GIL
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _call(fd: int, name: str, arg: Any, detail: str = "") -> int:
    rc = _ioctl(fd, IOCTLS[name], ctypes.addressof(arg) if arg is not None else None)
    if rc < 0:
        raise UffdError(ctypes.get_errno(), name, detail)
    return rc


@dataclass(frozen=True)
class Fault:
    """One UFFD_EVENT_PAGEFAULT: the faulting address (page-aligned unless EXACT_ADDRESS), why, and
    the faulting thread's id (with FEATURE_THREAD_ID; 0 without)."""

    address: int
    flags: int
    ptid: int

    @property
    def write(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WP)

    def describe(self) -> str:
        kind = "wp" if self.wp else "minor" if self.flags & UFFD_PAGEFAULT_FLAG_MINOR else "missing"
        return f"{kind} {'write' if self.write else 'read'} fault at {self.address:#x} (tid {self.ptid})"


@dataclass(frozen=True)
class Event:
    """Any other event (fork/remap/remove/unmap: only when their features were asked for)."""

    event: int
    raw: bytes


def decode(buf: bytes) -> list[Fault | Event]:
    """The messages in what read(2) returned (a whole number of 32-byte uffd_msg)."""
    size = ctypes.sizeof(UffdMsg)
    if len(buf) % size:
        raise ValueError(f"uffd read returned {len(buf)} bytes, not a multiple of {size}")
    out: list[Fault | Event] = []
    for i in range(0, len(buf), size):
        m = UffdMsg.from_buffer_copy(buf, i)
        if m.event == UFFD_EVENT_PAGEFAULT:
            pf = m.arg.pagefault
            out.append(Fault(pf.address, pf.flags, pf.ptid))
        else:
            out.append(Event(m.event, bytes(buf[i : i + size])))
    return out


# ---- the fd --------------------------------------------------------------------------------------------
class Userfaultfd:
    """One userfaultfd with its API handshake done; close() (or the context) closes it, which wakes
    every fault still held (they retry without the registration)."""

    _available: ClassVar[dict[bool, int]] = {}

    def __init__(self, fd: int, source: str, features: int, ioctls: int) -> None:
        self.fd = fd
        self.source = source  # "userfaultfd(2)" or DEV_USERFAULTFD
        self.features = features  # enabled
        self.ioctls = ioctls  # ioctls on the fd (UFFDIO_API's answer)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    # ---- opening ------------------------------------------------------------------------------------
    @staticmethod
    def _new_fd(flags: int) -> tuple[int, str]:
        fd = _syscall(SYS_USERFAULTFD, ctypes.c_int(flags))
        if fd >= 0:
            return fd, "userfaultfd(2)"
        err = ctypes.get_errno()
        if err not in (_errno.ENOSYS, _errno.EPERM):
            raise UffdError(err, "userfaultfd", f"{flags:#x}")
        try:  # the syscall is refused (unprivileged_userfaultfd=0, seccomp): the device instead
            dev = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise UffdError(err, "userfaultfd", f"{flags:#x}; and {DEV_USERFAULTFD}: {e.strerror}") from e
        try:
            fd = _ioctl(dev, IOCTLS["USERFAULTFD_IOC_NEW"], flags)
            if fd < 0:
                raise UffdError(ctypes.get_errno(), "USERFAULTFD_IOC_NEW", f"{flags:#x}")
            return fd, DEV_USERFAULTFD
        finally:
            os.close(dev)

    @classmethod
    def available(cls, user_mode_only: bool = False) -> int:
        """The features this kernel offers (UFFDIO_API with none asked answers all of them; an fd
        takes one UFFDIO_API only, so this one is thrown away). Cached."""
        if user_mode_only not in cls._available:
            flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
            fd, _ = cls._new_fd(flags)
            try:
                api = UffdioApi(UFFD_API, 0, 0)
                _call(fd, "UFFDIO_API", api, "api=0xaa, features=0")
                cls._available[user_mode_only] = int(api.features)
            finally:
                os.close(fd)
        return cls._available[user_mode_only]

    @classmethod
    def open(cls, want: int = 0, need: int = 0, *, user_mode_only: bool = False) -> Userfaultfd:
        """A new fd with the features of `want` this kernel has and all of `need` (missing ones
        raise UffdError(EINVAL) naming them)."""
        have = cls.available(user_mode_only)
        if need & ~have:
            raise UffdError(_errno.EINVAL, "UFFDIO_API",
                            f"features {'|'.join(feature_names(need & ~have))} not offered by this kernel")
        features = (want & have) | need
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
        fd, source = cls._new_fd(flags)
        try:
            api = UffdioApi(UFFD_API, features, 0)
            _call(fd, "UFFDIO_API", api, f"api=0xaa, features={'|'.join(feature_names(features)) or 0}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, source, features, int(api.ioctls))

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    # ---- ranges -------------------------------------------------------------------------------------
    def register(self, addr: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER [addr, addr+length) in `mode` (REGISTER_*); returns the ioctls the range
        supports (ioctl_bit(name) tests one)."""
        r = UffdioRegister(UffdioRange(addr, length), mode, 0)
        _call(self.fd, "UFFDIO_REGISTER", r, f"{addr:#x}, {length:#x}, mode={mode:#x}")
        return int(r.ioctls)

    def unregister(self, addr: int, length: int) -> None:
        _call(self.fd, "UFFDIO_UNREGISTER", UffdioRange(addr, length), f"{addr:#x}, {length:#x}")

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True, wp: bool = False) -> int:
        """UFFDIO_COPY: fill the missing pages of [dst, dst+length) from `src` (an address) and wake
        the faults waiting there (unless wake=False). Returns bytes copied; retries EAGAIN (the
        mapping changed under the copy) from where it stopped."""
        mode = (0 if wake else COPY_MODE_DONTWAKE) | (COPY_MODE_WP if wp else 0)
        done = 0
        while done < length:
            a = UffdioCopy(dst + done, src + done, length - done, mode, 0)
            rc = _ioctl(self.fd, IOCTLS["UFFDIO_COPY"], ctypes.addressof(a))
            if rc < 0:
                err = ctypes.get_errno()
                if err == _errno.EAGAIN and a.copy > 0:
                    done += a.copy
                    continue
                raise UffdError(err, "UFFDIO_COPY", f"dst={dst + done:#x}, len={length - done:#x}, mode={mode:#x}")
            done += a.copy
        return done

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map zeros (the shared zero page, for anon) at the missing pages."""
        a = UffdioZeropage(UffdioRange(dst, length), 0 if wake else ZEROPAGE_MODE_DONTWAKE, 0)
        _call(self.fd, "UFFDIO_ZEROPAGE", a, f"{dst:#x}, {length:#x}")
        return int(a.zeropage)

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE: wake the faults held in [addr, addr+length) (they retry the access)."""
        _call(self.fd, "UFFDIO_WAKE", UffdioRange(addr, length), f"{addr:#x}, {length:#x}")

    def writeprotect(self, addr: int, length: int, wp: bool, *, wake: bool = True) -> None:
        """UFFDIO_WRITEPROTECT: set (wp=True) or clear write protection; clearing wakes the write
        faults held there unless wake=False."""
        mode = (WRITEPROTECT_MODE_WP if wp else 0) | (0 if wake or wp else WRITEPROTECT_MODE_DONTWAKE)
        _call(self.fd, "UFFDIO_WRITEPROTECT", UffdioWriteprotect(UffdioRange(addr, length), mode),
              f"{addr:#x}, {length:#x}, mode={mode:#x}")

    # ---- events -------------------------------------------------------------------------------------
    def read(self, timeout: float | None = 0.0, max_msgs: int = 16) -> list[Fault | Event]:
        """The messages queued now, waiting up to `timeout` seconds (None: forever) for the first."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        if not self._poll.poll(ms):
            return []
        try:
            buf = os.read(self.fd, ctypes.sizeof(UffdMsg) * max_msgs)
        except BlockingIOError:
            return []  # another reader took it, or the fault went away before the read
        return decode(buf)

    # ---- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


__all__ = ["IOCTLS", "Event", "Fault", "UffdError", "UffdMsg", "Userfaultfd", "decode", "feature_names", "ioctl_bit"]
