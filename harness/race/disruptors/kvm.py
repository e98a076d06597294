"""Disruptors that change KVM's side of the region: its memslot (delete + re-add, move) or its
translations (KVM_PRE_FAULT_MEMORY)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from harness.kvm._cffi import ffi, lib
from harness.kvm.caps import KVM_MEM_GUEST_MEMFD, Cap
from harness.kvm.errors import KvmError
from harness.kvm.ioctl import kvm_ioctl
from harness.kvm.ioctls import IOCTLS
from harness.kvm.vm import Memslot
from harness.memory import Feature
from harness.race import _cfast
from harness.race.disruptors.base import Disruptor
from harness.race.region import SLOT

if TYPE_CHECKING:
    from harness.kvm.vm import Vm

_V1, _V2 = "KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2"
assert _cfast.ffi.sizeof("struct kh_memslot") == ffi.sizeof("struct kvm_userspace_memory_region2")


class _WholeRegion(Disruptor):
    """Ops that put every page in flux: back to back they would leave the guest almost no stable
    read to judge, so each op is followed by a seeded pause (0-1 ms, often 0): the reads right after
    a slot comes back are the ones that meet a stale translation.

    The C loop (KH_OP_SLOT_*) issues the raw ioctls on the VM fd, each through the one the binding
    would use (Vm._update's choice for a change of the slot, add_memslot's for a re-add); the slot
    table (Vm.memslots) is brought to what the kernel has after each slice of it."""

    whole_region = True
    GAPS = (0.0, 0.0, 0.0001, 0.0003, 0.001)
    fast_pauses = True  # step() ends with pause(): the C loop sleeps the same gaps

    def _fast_slot(self, op: int) -> Any:
        d = _cfast.ffi.new("struct kh_disrupt *")
        d.op, d.vm_fd = op, self.ctx.vm.fd
        d.slot_gpa = [self.mem.gpa_of_loc(0), self.mem.gpa_of_loc(1)]
        self._v2 = [False, False]
        return d

    def _slot_call(self, d: Any, k: int, v2: bool, m: Memslot) -> None:
        """slot_arg[k] = the ioctl set_user_memory_region(2) would issue for m (all but the GPA)."""
        self._v2[k] = v2
        d.slot_req[k] = IOCTLS[_V2 if v2 else _V1].number
        a = d.slot_arg[k]
        a.slot, a.flags, a.memory_size, a.userspace_addr = m.slot, m.flags, m.size, m.hva
        if v2:
            a.guest_memfd = m.guest_memfd if m.guest_memfd >= 0 else 0
            a.guest_memfd_offset = m.guest_memfd_offset

    def _change(self, d: Any, k: int, m: Memslot, size: int) -> None:
        """slot_arg[k]: a change of slot m (size 0: its delete) as Vm._update issues it."""
        self._slot_call(d, k, bool(m.v2 or m.flags & KVM_MEM_GUEST_MEMFD),
                        Memslot(m.slot, m.gpa, size, m.hva, m.flags, m.guest_memfd, m.guest_memfd_offset))

    def fast_error(self, d: Any) -> OSError:
        """The KvmError the binding raises for the call that failed (its arguments as issued)."""
        if d.fail != _cfast.lib.KH_FAIL_SLOT:
            return super().fast_error(d)
        k = int(d.fail_a)
        a = d.slot_arg[k]
        slot, gpa, size, hva, flags = a.slot, a.guest_phys_addr, a.memory_size, a.userspace_addr, a.flags
        desc = f"slot={slot}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x}, flags={flags:#x}"
        if self._v2[k]:
            desc += f", guest_memfd={a.guest_memfd}, offset={a.guest_memfd_offset:#x}"
        return KvmError(d.err, _V2 if self._v2[k] else _V1, desc)


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

    def fast_op(self) -> Any:
        m = self.ctx.vm.memslots.get(SLOT)
        b = self.ctx.backing
        if m is None:
            return None
        # what step()'s add_memslot(gpa, size, slot=SLOT, backing=b) issues and records
        gmem = getattr(b, "guest_memfd", -1)
        v2 = gmem is not None and gmem >= 0
        add = Memslot(SLOT, self.mem.gpa_now, self.mem.size, b.addr or 0, KVM_MEM_GUEST_MEMFD if v2 else 0,
                      gmem if v2 else -1, getattr(b, "guest_memfd_offset", 0) if v2 else 0, v2=v2)
        if add != m:
            return None  # not the slot step() re-adds (step() would change the table): stay in Python
        d = self._fast_slot(_cfast.lib.KH_OP_SLOT_READD)
        self._change(d, 0, m, 0)
        self._slot_call(d, 1, v2, add)
        return d

    def fast_after(self, d: Any) -> None:
        """A re-add that failed after its delete: the slot is gone, as step() leaves it."""
        vm = self.ctx.vm
        if d.fail == _cfast.lib.KH_FAIL_SLOT and d.fail_a == 1 and SLOT in vm.memslots:
            vm.note_memslot_changed(SLOT, vm.memslots[SLOT].gpa, 0)


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

    def fast_op(self) -> Any:
        m = self.ctx.vm.memslots.get(SLOT)
        if m is None or m.gpa != self.mem.gpa_now:
            return None
        d = self._fast_slot(_cfast.lib.KH_OP_SLOT_MOVE)
        self._change(d, 0, m, m.size)
        return d

    def fast_after(self, d: Any) -> None:
        """The slot table follows the moves the C loop made (under the writers' lock: no slot op is
        half done while it is read)."""
        vm = self.ctx.vm
        with self.mem.locked():
            m = vm.memslots.get(SLOT)
            if m is not None and m.gpa != self.mem.gpa_now:
                vm.note_memslot_changed(SLOT, self.mem.gpa_now, m.size)

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
