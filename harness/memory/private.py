"""Convertible guest memory: a private side the host cannot reach and a shared side it can.

    vm = kvm.create_vm(VmType.SW_PROTECTED)          # or GuestVm(..., vm_type=...)
    mem = PrivateMemory(vm, 2 << 20)                  # guest_memfd (no MMAP) + anonymous shared memory
    vm.add_memslot(GPA, 2 << 20, backing=mem)         # KVM_MEM_GUEST_MEMFD, userspace_addr = shared side
    vm.set_private(GPA, 4096)                         # the guest now reaches the guest_memfd page there

Which side a guest access reaches is the range's KVM memory attribute (KVM_SET_MEMORY_ATTRIBUTES),
not anything in this object: `addr` is the shared side's host mapping (the slot's userspace_addr)
and `guest_memfd` the private side. The host reads and writes only the shared side; the private
side is observable through the guest alone, which is the point of it (seed 001).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.kvm.caps import GUEST_MEMFD_FLAG_MMAP, Cap, MemoryAttributes, VmType
from harness.kvm.errors import HarnessError, KvmError
from harness.memory import hostmem
from harness.memory.backings import AnonBacking, Backing, BackingUnavailable, Feature

if TYPE_CHECKING:
    from harness.kvm.system import Kvm
    from harness.kvm.vm import Vm


def private_memory_reason(kvm: Kvm) -> str | None:
    """Why this kernel cannot give a VM private memory, or None when it can (a SW-protected VM
    type with the PRIVATE memory attribute and guest_memfd)."""
    if VmType.SW_PROTECTED not in kvm.vm_types:
        return (f"KVM_CAP_VM_TYPES = {sum(1 << t for t in kvm.vm_types):#x} has no KVM_X86_SW_PROTECTED_VM "
                f"(bit 1): a kernel built with CONFIG_KVM_SW_PROTECTED_VM=y has it, e.g. the runner's "
                f"debian:7.3.4+KVM_SW_PROTECTED_VM=y")
    if not kvm.check_extension(Cap.GUEST_MEMFD):
        return "KVM_CAP_GUEST_MEMFD is 0: no guest_memfd for the private side"
    return None


def require_private_memory(vm: Vm) -> None:
    """Raise BackingUnavailable (a skip) unless `vm` can convert memory to private."""
    if vm.type != VmType.SW_PROTECTED:
        raise BackingUnavailable(f"private memory needs a VM of type SW_PROTECTED ({VmType.SW_PROTECTED:d}); "
                                 f"this VM is type {vm.type}")
    have = vm.check_extension(Cap.MEMORY_ATTRIBUTES)
    if not have & MemoryAttributes.PRIVATE:
        raise BackingUnavailable(f"KVM_CAP_MEMORY_ATTRIBUTES = {have:#x} on a SW-protected VM: no PRIVATE "
                                 f"attribute ({int(MemoryAttributes.PRIVATE):#x})")
    if not vm.check_extension(Cap.GUEST_MEMFD):
        raise BackingUnavailable("KVM_CAP_GUEST_MEMFD is 0: no guest_memfd for the private side")


class PrivateMemory(Backing):
    """A guest_memfd made without GUEST_MEMFD_FLAG_MMAP (the host cannot map it) as the private side,
    and `shared` (anonymous memory by default; any harness backing of at least `size` bytes) as the
    shared side, whose mapping is the slot's userspace_addr."""

    kind = "private"
    features = Feature.FD | Feature.GUEST_MEMFD | Feature.NEEDS_VM | Feature.PRIVATE
    punch_method = "fallocate(PUNCH_HOLE|KEEP_SIZE) on the guest_memfd (the private side)"
    footprint_method = "(not observable from the host: the private side has no mapping)"

    def __init__(self, vm: Vm, size: int, shared: Backing | None = None, gmem_flags: int = 0) -> None:
        super().__init__(size)
        require_private_memory(vm)
        if gmem_flags & GUEST_MEMFD_FLAG_MMAP:
            raise HarnessError("PrivateMemory's guest_memfd is the private side: made without "
                               "GUEST_MEMFD_FLAG_MMAP (use GuestMemfdBacking for a mapped one)")
        self.vm = vm
        self.gmem_flags = gmem_flags
        self._own_shared = shared is None
        self.shared: Backing = AnonBacking(self.length) if shared is None else shared
        if self.shared.length < self.length:
            raise HarnessError(f"the shared side ({self.shared.describe()}) is smaller than the "
                               f"{self.length:#x} bytes of private memory")
        try:
            self.fd = vm.create_guest_memfd(self.length, gmem_flags)
        except KvmError as e:
            self.close()
            raise BackingUnavailable(f"KVM_CREATE_GUEST_MEMFD(size={self.length:#x}, flags={gmem_flags:#x}) "
                                     f"failed: {e}") from e
        self.guest_memfd = self.fd
        self.addr = self.shared.addr

    # the host's view is the shared side's
    def view(self, offset: int = 0, length: int | None = None) -> Any:
        return self.shared.view(offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """Release [offset, offset+length) of the private side (the guest_memfd)."""
        self._check_range(offset, length)
        hostmem.punch_hole(self.fd, offset, length)

    def punch_shared(self, offset: int, length: int) -> None:
        """Release [offset, offset+length) of the shared side (its own punch: DONTNEED on anon)."""
        self.shared.punch_hole(offset, length)

    def remap(self, offset: int = 0, length: int | None = None) -> None:
        self.shared.remap(offset, length)

    def footprint(self) -> int:
        raise HarnessError("the private side of PrivateMemory has no host mapping to measure")

    def close(self) -> None:
        if self.closed:
            return
        super().close()  # the guest_memfd
        self.guest_memfd = -1
        if self._own_shared:
            self.shared.close()

    def describe(self) -> str:
        return (f"private {self.length:#x} bytes: guest_memfd fd {self.fd} (flags {self.gmem_flags:#x}), "
                f"shared side {self.shared.describe()}")
