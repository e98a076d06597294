"""The raw ioctl call every KVM fd goes through, raising KvmError with the ioctl's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from harness.kvm._cffi import ffi, lib
from harness.kvm.errors import KvmError
from harness.kvm.ioctls import IOCTLS

ArgDesc = str | Callable[[], str]


class HasFd(Protocol):
    """Anything that owns a KVM fd (a Vcpu, for the dirty ring it maps)."""

    fd: int


def kvm_ioctl(fd: int, name: str, arg: Any = 0, desc: ArgDesc = "") -> int:
    """Issue ioctl `name` on fd with an int or cdata-pointer argument; return its result."""
    number = IOCTLS[name].number
    if isinstance(arg, int):
        rc = lib.kh_ioctl_int(fd, number, arg)
    else:
        rc = lib.kh_ioctl_ptr(fd, number, arg)
    if rc < 0:
        raise KvmError(-rc, name, desc() if callable(desc) else desc)
    return rc


def raw_ioctl(fd: int, number: int, arg: Any = 0, name: str | None = None) -> int:
    """An ioctl by number (for probing unknown numbers); raises KvmError naming it."""
    rc = lib.kh_ioctl_int(fd, number, arg) if isinstance(arg, int) else lib.kh_ioctl_ptr(fd, number, arg)
    if rc < 0:
        raise KvmError(-rc, name or f"ioctl({number:#x})", f"fd={fd}")
    return rc


def cbuf(ctype: str, size: int | None = None) -> Any:
    """A zeroed cdata of ctype, or of `size` bytes cast to ctype (for flexible array structs)."""
    if size is None:
        return ffi.new(ctype + " *")
    raw = ffi.new("char[]", size)
    return ffi.cast(ctype + " *", raw), raw
