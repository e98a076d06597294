"""Disruptors of private memory (a SW-protected VM's PrivateMemory region, harness.memory.private):
private <-> shared conversions under the vCPUs, and punches of the private side.

The region's judged state is shared: the host publishes each generation's tags in the shared side,
which is all it can write. `convert` makes a range private for a seeded moment (its pages odd in the
seqlock, so reads of the private side are not judged) and converts it back; after that every read
must return the new shared tag again: a translation to the private page KVM kept across the
conversion shows as a zero or another page's data. `punch-private` punches the guest_memfd under
the same ranges without the seqlock (what the guest reads at rest, the shared side, does not
change): with `convert`, the private pages a vCPU just faulted in are freed under it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.kvm._cffi import lib
from harness.memory import Feature
from harness.race.disruptors.base import Disruptor, oserror
from harness.race.disruptors.host import PUNCH

if TYPE_CHECKING:
    from harness.kvm.vm import Vm


def _private_only(kind: str, features: Feature) -> str | None:
    if Feature.PRIVATE not in features:
        return f"{kind} is not convertible memory (only the 'private' backing has a private side)"
    return None


class Convert(Disruptor):
    name = "convert"
    doc = "KVM_SET_MEMORY_ATTRIBUTES PRIVATE on a range, a seeded pause, then shared again"
    GAPS = (0.0, 0.0, 0.00005, 0.0002, 0.001)  # how long the range stays private

    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        return _private_only(kind, features)

    def prepare(self) -> None:
        super().prepare()
        self.set_attrs = self.ctx.vm.set_memory_attributes

    def step(self, off: int, length: int) -> None:
        gpa = self.mem.gpa_now + off
        self.begin(off, length)
        self.set_attrs(gpa, length, 8)  # KVM_MEMORY_ATTRIBUTE_PRIVATE
        self.pause()
        self.set_attrs(gpa, length, 0)
        self.end(off, length)


class PunchPrivate(Disruptor):
    name = "punch-private"
    doc = "fallocate(PUNCH_HOLE|KEEP_SIZE) on the private side (the guest_memfd)"
    bumps_generation = False

    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        return _private_only(kind, features)

    def prepare(self) -> None:
        super().prepare()
        self.fd = self.ctx.backing.guest_memfd

    def step(self, off: int, length: int) -> None:
        self.sample_in_run()
        if lib.fallocate(self.fd, PUNCH, off, length):
            raise oserror(f"fallocate(guest_memfd={self.fd}, PUNCH_HOLE|KEEP_SIZE, {off:#x}, {length:#x})")
        self.count_op(length)
