"""A guest driver's mailbox: a descriptor in guest scratch memory whose GPA is the payload's
argument (guests/ABI.md: guest_main(vcpu_id, arg)). The host writes a command into it as
little-endian u64 words and runs the vCPU to the payload's answer; command 0 ends the payloads.

    mb = Mailbox(vm, 40)                            # allocated; vCPU 0's argument is its GPA
    uc = mb.call(CMD_WRITE, gva, length)            # write the words, run to the guest's SYNC
    mb.finish()                                     # all zeros (cmd 0), run to GUEST_DONE
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from harness.kvm.checks import check_size, check_uint
from harness.kvm.errors import BadInput
from harness.lib.failures import UnexpectedUcall
from harness.lib.ucall import DONE, NAMES, SYNC, Ucall

if TYPE_CHECKING:
    from harness.lib.guestvm import GuestVcpu, GuestVm
    from harness.lib.run import ExitHandler


class Mailbox:
    """`size` bytes from vm's scratch area; `vcpus` (vCPU 0 when None) get its GPA as their argument
    and `vcpu` (vCPU 0) is the one call() runs."""

    def __init__(self, vm: GuestVm, size: int, *, align: int = 64, vcpus: Iterable[GuestVcpu] | None = None) -> None:
        self.vm = vm
        self.size = check_size("Mailbox", "size", size)
        self.gpa = vm.alloc(self.size, align)
        self.vcpu = vm.vcpu
        self.payload = vm.guest.name.split(".")[0]
        for v in (self.vcpu,) if vcpus is None else vcpus:
            v.set_args(self.gpa)

    def post(self, *words: int) -> None:
        """Write `words` (u64 each) from the start of the descriptor; the rest keeps its bytes."""
        if 8 * len(words) > self.size:
            raise BadInput("Mailbox.post", "words", len(words), f"do not fit the {self.size}-byte descriptor")
        data = b"".join(check_uint("Mailbox.post", f"words[{i}]", w, 64).to_bytes(8, "little")
                        for i, w in enumerate(words))
        self.vm.write(self.gpa, data)

    def call(self, *words: int, expect: int = SYNC, what: str = "", timeout: float | None = None,
             on_exit: ExitHandler | None = None) -> Ucall:
        """post(*words), run the vCPU to its next ucall and return it. Another ucall than `expect`
        raises UnexpectedUcall, named `what` (default: the payload and the command word)."""
        self.post(*words)
        uc = self.vcpu.run_until_ucall(timeout, on_exit=on_exit)
        if uc.cmd != expect:
            raise UnexpectedUcall(uc, what or f"{self.payload} cmd {words[0] if words else 0}", NAMES[expect])
        return uc

    def finish(self, *, what: str = "", timeout: float | None = None, on_exit: ExitHandler | None = None) -> Ucall:
        """An all-zero descriptor (cmd 0), then run to GUEST_DONE."""
        self.vm.write(self.gpa, bytes(self.size))
        return self.call(expect=DONE, what=what, timeout=timeout, on_exit=on_exit)
