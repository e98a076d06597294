"""Argument checks that refuse a value (BadInput) before any syscall sees it, and the closed twin
of an fd class (ClosedError on every method after close())."""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import operator
from typing import Any, NoReturn

from harness.kvm.errors import BadInput, ClosedError


# ---- use after close ---------------------------------------------------------------------------------
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
