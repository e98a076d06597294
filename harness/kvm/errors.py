"""Exceptions of the binding. Each message says what was asked and what the kernel (or the
harness, before any syscall) answered. The argument checks that raise BadInput are in
harness.kvm.checks; the failures read from a guest's reports are in harness.lib.failures.
"""

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


class ClosedError(HarnessError):
    """A method of a Kvm, Vm or Vcpu called after its close(): its fd number may already belong to
    another object, so nothing may reach the kernel (or its unmapped memory)."""

    def __init__(self, what: str, call: str, why: str = "") -> None:
        self.what = what
        self.call = call
        msg = f"{what} is closed: {call} after close()"
        if why:
            msg += f" ({why})"
        super().__init__(msg)


class BadInput(HarnessError, ValueError):
    """An argument the harness refused before any syscall: the message names where, which argument,
    its value and what it must be. (KvmError stays for what the kernel refused.)"""

    def __init__(self, where: str, arg: str, value: object, need: str) -> None:
        self.where = where
        self.arg = arg
        self.value = value
        self.need = need
        shown = repr(value)
        if isinstance(value, int) and not isinstance(value, bool) and not -10 < value < 10:
            shown = f"{value} ({value:#x})"
        super().__init__(f"{where}: {arg}={shown} {need}")


class GuestFailure(AssertionError):
    """Base class: the guest (or the kernel running it) did not do what the case expected.

    An AssertionError, so pytest reports a test failure (F), not a harness error. It lives here
    because the binding raises one (VcpuTimeout, from Vcpu.run); harness.lib.failures has the rest."""


class VcpuTimeout(GuestFailure):
    """The watchdog stopped a vCPU that did not finish within its bound."""

    def __init__(self, vcpu_id: int, report: str, state: str) -> None:
        self.report = report
        super().__init__(f"vcpu {vcpu_id} stopped by the watchdog: {report}\n" + indented(state))


def indented(text: str) -> str:
    """text with every line indented by two spaces (register dumps inside a failure message)."""
    return "\n".join("  " + line for line in text.splitlines())
