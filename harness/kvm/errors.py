"""Exceptions the harness raises. Each message says what was asked and what the kernel answered."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """An ioctl on a KVM fd failed: carries the ioctl's name, its key arguments and the errno."""

    def __init__(self, err: int, ioctl: str, args: str = "") -> None:
        self.ioctl = ioctl
        self.call_args = args
        name = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{ioctl}({args}) -> {name} ({os.strerror(err)})")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class HarnessError(Exception):
    """Misuse of the harness or a set-up step that cannot work (not a kernel verdict)."""


class GuestBuildError(HarnessError):
    """A guest payload is missing or older than its sources."""
