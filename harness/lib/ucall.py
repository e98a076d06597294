"""Host side of the ucall protocol (guests/ABI.md): decode a guest's report from its memory."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.lib.failures import GuestAssertionError, GuestExceptionError

if TYPE_CHECKING:
    from harness.kvm.exits import Io
    from harness.kvm.vcpu import Vcpu

UCALL_PORT = 0x1000
SYNC, ASSERT, DONE, PRINTF, EXCEPTION = 1, 2, 3, 4, 5
NAMES = {SYNC: "SYNC", ASSERT: "ASSERT", DONE: "DONE", PRINTF: "PRINTF", EXCEPTION: "EXCEPTION"}

_LAYOUT = struct.Struct("<9Q128s1024s")
UCALL_SIZE = _LAYOUT.size  # 1224, pinned by the guest's _Static_assert too


@dataclass
class Ucall:
    cmd: int
    nargs: int
    args: tuple[int, ...]
    line: int
    file: str
    text: str
    gpa: int

    @property
    def name(self) -> str:
        return NAMES.get(self.cmd, f"cmd{self.cmd}")

    def check(self, vcpu: Vcpu) -> None:
        """Raise the guest's own failure, if this ucall reports one."""
        if self.cmd == ASSERT:
            raise GuestAssertionError(self, vcpu)
        if self.cmd == EXCEPTION:
            raise GuestExceptionError(self, vcpu)

    def __repr__(self) -> str:
        return f"<Ucall {self.name} args={[hex(a) for a in self.args]} at {self.file}:{self.line}>"


def parse_ucall(raw: bytes, gpa: int = 0) -> Ucall:
    cmd, nargs, a0, a1, a2, a3, a4, a5, line, file, buf = _LAYOUT.unpack(raw)
    n = min(nargs, 6)
    return Ucall(
        cmd, nargs, (a0, a1, a2, a3, a4, a5)[:n], line,
        file.split(b"\0", 1)[0].decode(errors="replace"),
        buf.split(b"\0", 1)[0].decode(errors="replace"),
        gpa,
    )


def read_ucall(vcpu: Vcpu, ex: Io) -> Ucall:
    """The ucall the guest announced with `out %eax, $UCALL_PORT` (eax = its GPA)."""
    gpa = int.from_bytes(ex.data[:4], "little")
    return parse_ucall(vcpu.vm.read(gpa, UCALL_SIZE), gpa)
