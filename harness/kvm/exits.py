"""KVM_RUN exits decoded into typed objects.

Decoding reads only what the exit reason says is valid; the objects are snapshots, so a test can
keep them after the next KVM_RUN has overwritten the shared kvm_run page.
"""

from __future__ import annotations

import enum
import errno as _errno
from typing import Any

from harness.kvm._cffi import ffi


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37
    MEMORY_FAULT = 39
    TDX = 40


class Exit:
    """Base of every decoded exit."""

    __slots__ = ()
    reason: ExitReason

    def describe(self) -> str:
        fields = ", ".join(
            f"{k}={_fmt(getattr(self, k))}" for k in self.__slots__ if not k.startswith("_")
        )
        return f"{self.reason.name}({fields})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return hex(v) if v > 9 else str(v)
    if isinstance(v, bytes):
        return v.hex()
    return repr(v)


class Io(Exit):
    __slots__ = ("count", "data", "direction", "port", "size")
    reason = ExitReason.IO
    IN = 0
    OUT = 1

    def __init__(self, direction: int, size: int, port: int, count: int, data: bytes) -> None:
        self.direction = direction
        self.size = size
        self.port = port
        self.count = count
        self.data = data  # OUT: what the guest wrote; IN: what will be returned (set via Vcpu.complete_io)

    @property
    def is_write(self) -> bool:
        return self.direction == Io.OUT

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.size], "little")


class Mmio(Exit):
    __slots__ = ("data", "is_write", "len", "phys_addr")
    reason = ExitReason.MMIO

    def __init__(self, phys_addr: int, data: bytes, length: int, is_write: bool) -> None:
        self.phys_addr = phys_addr
        self.data = data
        self.len = length
        self.is_write = is_write

    @property
    def value(self) -> int:
        """The written value (little endian, `len` bytes); meaningless for reads."""
        return int.from_bytes(self.data[: self.len], "little")


class CoalescedMmio:
    """One entry of the coalesced MMIO ring: a guest write KVM recorded without exiting
    (Vcpu.coalesced_mmio() drains them). Entries are writes only; `pio` marks a coalesced port."""

    __slots__ = ("data", "len", "phys_addr", "pio")
    is_write = True

    def __init__(self, phys_addr: int, length: int, data: bytes, pio: int = 0) -> None:
        self.phys_addr = phys_addr
        self.len = length
        self.data = data
        self.pio = pio

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.len], "little")

    def __repr__(self) -> str:
        kind = "PIO" if self.pio else "MMIO"
        return f"<Coalesced{kind} phys_addr={self.phys_addr:#x} len={self.len} data={self.data[: self.len].hex()}>"


class Hlt(Exit):
    __slots__ = ()
    reason = ExitReason.HLT


class Shutdown(Exit):
    __slots__ = ()
    reason = ExitReason.SHUTDOWN


class Intr(Exit):
    """KVM_RUN returned EINTR (a signal or immediate_exit); the vCPU can be run again."""

    __slots__ = ()
    reason = ExitReason.INTR


class FailEntry(Exit):
    __slots__ = ("cpu", "hardware_entry_failure_reason")
    reason = ExitReason.FAIL_ENTRY

    def __init__(self, hardware_entry_failure_reason: int, cpu: int) -> None:
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu


class InternalError(Exit):
    __slots__ = ("data", "suberror")
    reason = ExitReason.INTERNAL_ERROR
    SUBERRORS = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror = suberror
        self.data = data

    def describe(self) -> str:
        name = self.SUBERRORS.get(self.suberror, str(self.suberror))
        return f"INTERNAL_ERROR(suberror={name}, data=[{', '.join(hex(d) for d in self.data)}])"


_ERRNAMES = {133: "EHWPOISON"}  # Linux errnos Python's errno module does not name


class MemoryFault(Exit):
    """KVM_EXIT_MEMORY_FAULT: KVM could not resolve a guest access to [gpa, gpa+size) and hands it
    to userspace (KVM_RUN returned -1 with errno EFAULT or EHWPOISON). flags & PRIVATE: the access
    was to private memory (the range's attributes said private, or the fault was private)."""

    __slots__ = ("errno", "flags", "gpa", "size")
    reason = ExitReason.MEMORY_FAULT
    FLAG_PRIVATE = 1 << 3  # KVM_MEMORY_EXIT_FLAG_PRIVATE

    def __init__(self, flags: int, gpa: int, size: int, errno: int = 14) -> None:
        self.flags = flags
        self.gpa = gpa
        self.size = size
        self.errno = errno  # EFAULT (14) or EHWPOISON (133)

    @property
    def private(self) -> bool:
        return bool(self.flags & self.FLAG_PRIVATE)

    def describe(self) -> str:
        flags = f"{self.flags:#x}" + (" PRIVATE" if self.private else "")
        return (f"MEMORY_FAULT(gpa={self.gpa:#x}, size={self.size:#x}, flags={flags}, "
                f"errno={_ERRNAMES.get(self.errno) or _errno.errorcode.get(self.errno, self.errno)})")


class SystemEvent(Exit):
    __slots__ = ("data", "type")
    reason = ExitReason.SYSTEM_EVENT
    TYPES = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND", 6: "SEV_TERM", 7: "TDX_FATAL"}

    def __init__(self, type: int, data: tuple[int, ...]) -> None:
        self.type = type
        self.data = data


class Hypercall(Exit):
    __slots__ = ("args", "nr")
    reason = ExitReason.HYPERCALL

    def __init__(self, nr: int, args: tuple[int, ...]) -> None:
        self.nr = nr
        self.args = args


class Debug(Exit):
    __slots__ = ("dr6", "dr7", "exception", "pc")
    reason = ExitReason.DEBUG

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int) -> None:
        self.exception = exception
        self.pc = pc
        self.dr6 = dr6
        self.dr7 = dr7


class Msr(Exit):
    __slots__ = ("data", "index", "is_write", "why")
    reason = ExitReason.X86_RDMSR

    def __init__(self, is_write: bool, index: int, data: int, why: int) -> None:
        self.is_write = is_write
        self.index = index
        self.data = data
        self.why = why


class DirtyRingFull(Exit):
    __slots__ = ()
    reason = ExitReason.DIRTY_RING_FULL


class Other(Exit):
    """An exit reason the harness has no type for: keeps the raw number and union bytes."""

    __slots__ = ("raw", "raw_reason")
    reason = ExitReason.UNKNOWN

    def __init__(self, raw_reason: int, raw: bytes) -> None:
        self.raw_reason = raw_reason
        self.raw = raw

    def describe(self) -> str:
        try:
            name = ExitReason(self.raw_reason).name
        except ValueError:
            name = str(self.raw_reason)
        return f"exit {name}(raw={self.raw[:64].hex()})"


_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Intr()
_DIRTY_RING_FULL = DirtyRingFull()


def decode(run: Any, run_buf: Any) -> Exit:
    """Decode the exit currently described by the `struct kvm_run *` run (run_buf: its ffi.buffer)."""
    reason = run.exit_reason
    if reason == 2:
        io = run.io
        n = io.size * io.count
        off = io.data_offset
        return Io(io.direction, io.size, io.port, io.count, run_buf[off : off + n])
    if reason == 6:
        m = run.mmio
        return Mmio(m.phys_addr, bytes(ffi.buffer(m.data)), m.len, bool(m.is_write))
    if reason == 5:
        return _HLT
    if reason == 8:
        return _SHUTDOWN
    if reason == 17:
        i = run.internal
        return InternalError(i.suberror, tuple(i.data[k] for k in range(min(i.ndata, 16))))
    if reason == 9:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == 39:
        f = run.memory_fault
        return MemoryFault(f.flags, f.gpa, f.size)
    if reason == 24:
        e = run.system_event
        return SystemEvent(e.type, tuple(e.data[k] for k in range(min(e.ndata, 16))))
    if reason == 3:
        h = run.hypercall
        return Hypercall(h.nr, tuple(h.args))
    if reason == 4:
        d = run.debug.arch
        return Debug(d.exception, d.pc, d.dr6, d.dr7)
    if reason in (29, 30):
        m = run.msr
        return Msr(reason == 30, m.index, m.data, m.reason)
    if reason == 31:
        return _DIRTY_RING_FULL
    if reason == 10:
        return _INTR
    return Other(reason, bytes(ffi.buffer(run.padding)))
