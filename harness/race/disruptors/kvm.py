"""Disruptors that change KVM's side of the region: its memslot (delete + re-add, move) or its
translations (KVM_PRE_FAULT_MEMORY)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from harness.kvm._cffi import ffi, lib
from harness.kvm.caps import Cap
from harness.kvm.ioctl import kvm_ioctl
from harness.memory import Feature
from harness.race.disruptors.base import Disruptor
from harness.race.region import SLOT

if TYPE_CHECKING:
    from harness.kvm.vm import Vm


class _WholeRegion(Disruptor):
    """Ops that put every page in flux: back to back they would leave the guest almost no stable
    read to judge, so each op is followed by a seeded pause (0-1 ms, often 0): the reads right after
    a slot comes back are the ones that meet a stale translation."""

    whole_region = True
    GAPS = (0.0, 0.0, 0.0001, 0.0003, 0.001)


class SlotReadd(_WholeRegion):
    name = "slot-readd"
    doc = "memslot delete + re-add (same GPA, same memory)"

    def step(self, off: int, length: int) -> None:
        m = self.mem
        vm = self.ctx.vm
        self.begin(0, m.size)
        vm.delete_memslot(SLOT)
        vm.add_memslot(m.gpa_now, m.size, slot=SLOT, backing=self.ctx.backing)
        self.end(0, m.size)
        self.pause()


class SlotMove(_WholeRegion):
    name = "slot-move"
    doc = "memslot move (KVM_MR_MOVE) between two GPAs; the guest follows ctrl->loc"
    uses_gpa_b = True

    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        if Feature.GUEST_MEMFD in features:
            return "KVM refuses to move a guest_memfd memslot (EINVAL): only delete is allowed"
        return None

    def step(self, off: int, length: int) -> None:
        m = self.mem
        self.begin(0, m.size)
        new = m.loc ^ 1
        self.ctx.vm.move_memslot(SLOT, m.gpa_of_loc(new))
        m.set_loc(new)
        self.end(0, m.size)
        self.pause()

    def finish(self) -> None:
        if self.mem.loc:
            self.step(0, self.mem.size)


class Prefault(Disruptor):
    """KVM_PRE_FAULT_MEMORY on ranges of the region from a vCPU that never runs (vCPU ioctls
    serialize on the vCPU mutex, so a running vCPU's fd would wait for its KVM_RUN to end)."""

    name = "prefault"
    doc = "KVM_PRE_FAULT_MEMORY on the same range (where KVM offers it)"
    bumps_generation = False

    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        have = vm.check_extension(Cap.PRE_FAULT_MEMORY)
        if not have:
            return "KVM_CAP_PRE_FAULT_MEMORY is 0 on this kernel (KVM_PRE_FAULT_MEMORY not offered)"
        return None

    def prepare(self) -> None:
        super().prepare()
        self.vcpu = self.ctx.spare_vcpu()
        self.arg = ffi.new("struct kvm_pre_fault_memory *")
        self.eagain = 0

    def step(self, off: int, length: int) -> None:
        a = self.arg
        a.gpa = self.mem.gpa_now + off
        a.size = length
        a.flags = 0
        self.sample_in_run()
        while a.size:
            rc = lib.kh_ioctl_ptr(self.vcpu.fd, _PRE_FAULT, a)
            if rc < 0:
                if -rc in (errno.EINTR, errno.EAGAIN):
                    self.eagain += 1
                    continue
                if -rc == errno.ENOENT:
                    break  # the slot is momentarily gone (another disruptor): nothing to fault
                # raise through kvm_ioctl for its message
                kvm_ioctl(self.vcpu.fd, "KVM_PRE_FAULT_MEMORY", a,
                          lambda: f"gpa={a.gpa:#x}, size={a.size:#x}")
        self.count_op(length)


def _pre_fault_number() -> int:
    from harness.kvm.ioctls import IOCTLS

    return IOCTLS["KVM_PRE_FAULT_MEMORY"].number


_PRE_FAULT = _pre_fault_number()
