"""Failures of a guest or a vCPU, each with a message that explains itself.

They subclass AssertionError so pytest reports them as test failures (F), not harness errors.
Two usage errors live here too (HarnessError, not failures): ClosedError, a method of a closed
Kvm/Vm/Vcpu, and BadInput, an argument the harness refused before any syscall saw it.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import operator
from typing import TYPE_CHECKING, Any, NoReturn

from harness.kvm.errors import HarnessError

if TYPE_CHECKING:
    from harness.kvm.exits import Exit
    from harness.kvm.vcpu import Vcpu
    from harness.lib.ucall import Ucall


class GuestFailure(AssertionError):
    """Base class: the guest (or the kernel running it) did not do what the case expected."""


class GuestAssertionError(GuestFailure):
    def __init__(self, uc: Ucall, vcpu: Vcpu) -> None:
        self.ucall = uc
        self.vcpu_id = vcpu.id
        where = f"{uc.file}:{uc.line}"
        msg = f"guest assertion failed at {where}: {uc.text}"
        if uc.nargs >= 2:
            a, b = uc.args[0], uc.args[1]
            msg += f"\n  left:  {a} ({a:#x})\n  right: {b} ({b:#x})"
        msg += f"\n  (vcpu {vcpu.id})"
        super().__init__(msg)


VECTORS = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP", 29: "#VC", 30: "#SX",
}


def describe_pf_error(code: int) -> str:
    bits = [("P", 0), ("W", 1), ("U", 2), ("RSVD", 3), ("I", 4), ("PK", 5), ("SS", 6), ("SGX", 15)]
    return "|".join(n for n, b in bits if code & (1 << b)) or "not-present read"


class GuestExceptionError(GuestFailure):
    def __init__(self, uc: Ucall, vcpu: Vcpu) -> None:
        self.ucall = uc
        vector, error_code, rip, cr2, rsp = (list(uc.args) + [0] * 5)[:5]
        self.vector, self.error_code, self.rip, self.cr2, self.rsp = vector, error_code, rip, cr2, rsp
        name = VECTORS.get(vector, "?")
        msg = f"unexpected guest exception {name} (vector {vector}) at rip={rip:#x}"
        guest = getattr(vcpu.vm, "guest", None)
        if guest is not None:
            msg += f" [{guest.symbolize(rip)}]"
        msg += f"\n  error_code={error_code:#x}"
        if vector == 14:
            msg += f" ({describe_pf_error(error_code)}) cr2={cr2:#x}"
        msg += f" rsp={rsp:#x} (vcpu {vcpu.id})"
        super().__init__(msg)


class UnexpectedExitError(GuestFailure):
    def __init__(self, vcpu: Vcpu, ex: Exit, note: str = "") -> None:
        self.exit = ex
        msg = f"unexpected exit {ex.describe()} on vcpu {vcpu.id}"
        if note:
            msg += f": {note}"
        msg += "\n" + _indent(vcpu.dump_state())
        super().__init__(msg)


class VcpuTimeout(GuestFailure):
    """The watchdog stopped a vCPU that did not finish within its bound."""

    def __init__(self, vcpu: Vcpu, report: str) -> None:
        self.report = report
        msg = f"vcpu {vcpu.id} stopped by the watchdog: {report}\n" + _indent(vcpu.dump_state())
        super().__init__(msg)


class Livelock(GuestFailure):
    """The vCPU keeps exiting at the same RIP (and, for MMIO, the same GPA) without reaching a ucall:
    the guest is stuck, e.g. an instruction KVM never completes or an address it reports wrongly."""

    def __init__(self, vcpu: Vcpu, rip: int, count: int, detail: str, *, gpa: int | None = None,
                 last_exit: Exit | None = None) -> None:
        self.rip = rip
        self.count = count
        self.gpa = gpa
        self.exit = last_exit
        where = f"rip={rip:#x}"
        guest = getattr(vcpu.vm, "guest", None)
        if guest is not None:
            where += f" [{guest.symbolize(rip)}]"
        if gpa is not None:
            where += f", gpa={gpa:#x}"
        msg = f"vcpu {vcpu.id} livelocked: {count} exits at {where} without progress (no ucall); {detail}"
        if last_exit is not None:
            msg += f"\n  last exit: {last_exit.describe()}"
        msg += "\n" + _indent(vcpu.dump_state())
        super().__init__(msg)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# ---- usage errors ----------------------------------------------------------------------------------
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


def closed_class(cls: type) -> type:
    """The closed twin of cls: a subclass whose every public method, property and `with` entry
    raises ClosedError. close() switches an object to it (`obj.__class__ = closed_class(...)`), so
    the open class checks nothing (KVM_RUN's hot path costs no more) and no method can be missed.

    The object must offer `_closed_what()` (how the error names it); `close`, `__exit__` and the
    names in cls._USABLE_WHEN_CLOSED keep working."""
    return _closed_class(cls)


@functools.cache
def _closed_class(cls: type) -> type:
    keep = {"close", *getattr(cls, "_USABLE_WHEN_CLOSED", ())}
    ns: dict[str, Any] = {"__doc__": f"A closed {cls.__name__}: every method raises ClosedError.",
                          "__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}(closed)"}
    for name in dir(cls):
        if name in keep or (name.startswith("_") and name != "__enter__"):
            continue
        attr = inspect.getattr_static(cls, name)
        if isinstance(attr, (property, functools.cached_property)):
            ns[name] = property(_raiser(name, ""))
        elif inspect.isfunction(attr) or isinstance(attr, (staticmethod, classmethod)):
            ns[name] = _raiser(name, "()")
    return type(cls.__name__, (cls,), ns)


def _raiser(name: str, suffix: str) -> Any:
    def closed(self: Any, *args: object, **kwargs: object) -> NoReturn:
        raise ClosedError(self._closed_what(), name + suffix, getattr(self, "_closed_why", ""))

    closed.__name__ = name
    return closed


# ---- argument checks (BadInput before any syscall) ---------------------------------------------------
def check_uint(where: str, name: str, value: Any, bits: int) -> int:
    """value as an int that fits the kernel's u<bits> field, else BadInput naming it. cffi would
    raise a bare OverflowError, and masking would hand the kernel another value (slot 2**40 is 0)."""
    try:
        v = operator.index(value)
    except TypeError:
        raise BadInput(where, name, value, "must be an int") from None
    if not 0 <= v < 1 << bits:
        raise BadInput(where, name, value, f"does not fit the kernel's u{bits} field [0, 2**{bits})")
    return v


def check_size(where: str, name: str, value: Any, *, page: int | None = None, zero_ok: bool = False) -> int:
    """A size the harness itself uses (to mmap, to index a mapping): an int > 0 (>= 0 when zero_ok),
    below 2**64 and, with `page`, a whole number of pages."""
    try:
        v = operator.index(value)
    except TypeError:
        raise BadInput(where, name, value, "must be an int") from None
    if v < 0 or (v == 0 and not zero_ok):
        raise BadInput(where, name, value, "must be >= 0" if zero_ok else "must be > 0")
    if v >= 1 << 64:
        raise BadInput(where, name, value, "must be below 2**64")
    if page and v % page:
        raise BadInput(where, name, value, f"must be a multiple of the page size ({page:#x})")
    return v


def check_seconds(where: str, name: str, value: Any) -> float:
    """A duration in seconds: a number > 0 (a bound of 0 or less would expire at once; NaN never)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadInput(where, name, value, "must be a number of seconds") from None
    if not v > 0:
        raise BadInput(where, name, value, "must be a number of seconds > 0")
    return v


def seconds_arg(text: str) -> float:
    """argparse `type=` of a duration option (--kvm-timeout, --race-seconds): a finite number > 0.
    A bound of 0 or less would expire at once (a spurious failure), a race of 0 s tests nothing."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds > 0")
    return v
