"""Failures of a guest or a vCPU, each with a message that explains itself.

They subclass AssertionError (through GuestFailure) so pytest reports them as test failures (F),
not harness errors. GuestFailure and VcpuTimeout are defined in harness.kvm.errors, since Vcpu.run
raises the timeout, and exported here too: a case catches every guest failure from this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from harness.kvm.errors import GuestFailure, VcpuTimeout, indented

if TYPE_CHECKING:
    from harness.kvm.exits import Exit
    from harness.kvm.vcpu import Vcpu

__all__ = [
    "VECTORS", "GuestAssertionError", "GuestExceptionError", "GuestFailure", "Livelock", "UnexpectedExitError",
    "UnexpectedUcall", "VcpuTimeout", "describe_pf_error",
]


class GuestReport(Protocol):
    """What a failure reads of a ucall (harness.lib.ucall.Ucall, which imports this module)."""

    cmd: int
    nargs: int
    args: tuple[int, ...]
    line: int
    file: str
    text: str


class GuestAssertionError(GuestFailure):
    def __init__(self, uc: GuestReport, vcpu: Vcpu) -> None:
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
    def __init__(self, uc: GuestReport, vcpu: Vcpu) -> None:
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
        msg += "\n" + indented(vcpu.dump_state())
        super().__init__(msg)


class UnexpectedUcall(GuestFailure):
    """A guest driver asked a command of its payload and the payload answered with another ucall
    (DONE where a SYNC was due, or the reverse)."""

    def __init__(self, uc: GuestReport, what: str, expected: str) -> None:
        self.ucall = uc
        super().__init__(f"{what}: expected {expected}, the guest answered {uc!r}")


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
        msg += "\n" + indented(vcpu.dump_state())
        super().__init__(msg)
