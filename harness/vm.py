"""A VM: its fd, the memslot table kept in step with the kernel, vCPUs, and VM-wide ioctls."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from harness._kvm_cffi import ffi
from harness.caps import KVM_MEM_GUEST_MEMFD
from harness.errors import HarnessError
from harness.hostmem import Mapping, view
from harness.stats import Stats
from harness.sys import kvm_ioctl
from harness.vcpu import Vcpu

if TYPE_CHECKING:
    from harness.kvm import Kvm


class Backing(Protocol):
    """What a memslot's memory must offer the VM (harness.memory implements it per kind)."""

    addr: int
    length: int

    def close(self) -> None: ...


@dataclass
class Memslot:
    slot: int
    gpa: int
    size: int
    hva: int
    flags: int = 0
    guest_memfd: int = -1
    guest_memfd_offset: int = 0
    backing: Any = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end

    def describe(self) -> str:
        s = f"slot={self.slot}, gpa={self.gpa:#x}, size={self.size:#x}, hva={self.hva:#x}, flags={self.flags:#x}"
        if self.flags & KVM_MEM_GUEST_MEMFD:
            s += f", guest_memfd={self.guest_memfd}, offset={self.guest_memfd_offset:#x}"
        return s


class Vm:
    """A KVM VM. Closing it closes its vCPUs, its stats fd, and the backings it owns."""

    def __init__(self, kvm: Kvm, vm_type: int = 0) -> None:
        self.kvm = kvm
        self.type = vm_type
        self.fd = kvm_ioctl(kvm.fd, "KVM_CREATE_VM", vm_type, lambda: f"type={vm_type}")
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: list[Vcpu] = []
        self._owned: list[Any] = []
        self._stats: Stats | None = None
        self.closed = False

    # ---- capabilities --------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        return kvm_ioctl(self.fd, "KVM_CHECK_EXTENSION", int(cap), lambda: f"vm, cap={int(cap)}")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        c = ffi.new("struct kvm_enable_cap *")
        c.cap = cap
        c.flags = flags
        for i, a in enumerate(args):
            c.args[i] = a
        kvm_ioctl(self.fd, "KVM_ENABLE_CAP", c, lambda: f"vm, cap={int(cap)}, args={[hex(a) for a in args]}")

    # ---- vCPUs ---------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        vid = len(self.vcpus) if vcpu_id is None else vcpu_id
        v = Vcpu(self, vid)
        self.vcpus.append(v)
        return v

    # ---- memslots ------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                               backing: Any = None) -> None:
        """KVM_SET_USER_MEMORY_REGION (v1); on success the slot table follows the kernel."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, hva
        kvm_ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", r,
                  lambda: f"slot={slot}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x}, flags={flags:#x}")
        self._track(Memslot(slot, gpa, size, hva, flags, backing=backing))

    def set_user_memory_region2(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0,
                                backing: Any = None) -> None:
        """KVM_SET_USER_MEMORY_REGION2; on success the slot table follows the kernel."""
        r = ffi.new("struct kvm_userspace_memory_region2 *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, hva
        r.guest_memfd = guest_memfd & 0xFFFFFFFF
        r.guest_memfd_offset = guest_memfd_offset
        kvm_ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION2", r,
                  lambda: f"slot={slot}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x}, flags={flags:#x}, "
                  f"guest_memfd={guest_memfd}, offset={guest_memfd_offset:#x}")
        gm = guest_memfd if flags & KVM_MEM_GUEST_MEMFD else -1
        self._track(Memslot(slot, gpa, size, hva, flags, gm, guest_memfd_offset, backing))

    def _track(self, m: Memslot) -> None:
        old = self.memslots.get(m.slot)
        if m.size == 0:
            self.memslots.pop(m.slot, None)
            return
        if old is not None and m.backing is None:
            m.backing = old.backing
        self.memslots[m.slot] = m

    def free_slot_id(self) -> int:
        i = 0
        while i in self.memslots:
            i += 1
        return i

    def add_memslot(self, gpa: int, size: int, *, slot: int | None = None, flags: int = 0,
                    backing: Any = None) -> Memslot:
        """Add a slot at gpa backed by `backing` (anonymous private memory when None).

        The VM owns an anonymous mapping it made; a caller's backing stays the caller's.
        """
        sid = self.free_slot_id() if slot is None else slot
        if backing is None:
            backing = Mapping(size)
            self._owned.append(backing)
        self.set_user_memory_region(sid, gpa, size, backing.addr, flags, backing=backing)
        return self.memslots[sid]

    def delete_memslot(self, slot: int) -> None:
        m = self.memslots.get(slot)
        if m is None:
            raise HarnessError(f"no memslot {slot} in this VM")
        if m.flags & KVM_MEM_GUEST_MEMFD:
            self.set_user_memory_region2(slot, m.gpa, 0, m.hva, m.flags, m.guest_memfd, m.guest_memfd_offset)
        else:
            self.set_user_memory_region(slot, m.gpa, 0, m.hva, m.flags)

    def move_memslot(self, slot: int, new_gpa: int) -> None:
        m = self.memslots[slot]
        self.set_user_memory_region(slot, new_gpa, m.size, m.hva, m.flags)

    def slot_for(self, gpa: int, size: int = 1) -> Memslot:
        for m in self.memslots.values():
            if m.contains(gpa, size):
                return m
        raise HarnessError(f"GPA range {gpa:#x}+{size:#x} is not inside one memslot of this VM "
                           f"(slots: {[m.describe() for m in self.memslots.values()]})")

    def gpa_to_hva(self, gpa: int, size: int = 1) -> int:
        m = self.slot_for(gpa, size)
        return m.hva + (gpa - m.gpa)

    def read(self, gpa: int, size: int) -> bytes:
        """Guest memory as the host sees it through the slot's mapping."""
        return bytes(view(self.gpa_to_hva(gpa, size), size))

    def write(self, gpa: int, data: bytes) -> None:
        view(self.gpa_to_hva(gpa, len(data)), len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & (2**64 - 1)).to_bytes(8, "little"))

    # ---- other VM ioctls -----------------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        g = ffi.new("struct kvm_create_guest_memfd *")
        g.size = size
        g.flags = flags
        return kvm_ioctl(self.fd, "KVM_CREATE_GUEST_MEMFD", g, lambda: f"size={size:#x}, flags={flags:#x}")

    def ioeventfd(self, addr: int, length: int, fd: int, flags: int = 0, datamatch: int = 0) -> None:
        e = ffi.new("struct kvm_ioeventfd *")
        e.addr, e.len, e.fd, e.flags, e.datamatch = addr, length, fd, flags, datamatch
        kvm_ioctl(self.fd, "KVM_IOEVENTFD", e,
                  lambda: f"addr={addr:#x}, len={length}, fd={fd}, flags={flags:#x}")

    def register_coalesced_mmio(self, addr: int, size: int) -> None:
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr, z.size = addr, size
        kvm_ioctl(self.fd, "KVM_REGISTER_COALESCED_MMIO", z, lambda: f"addr={addr:#x}, size={size:#x}")

    def unregister_coalesced_mmio(self, addr: int, size: int) -> None:
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr, z.size = addr, size
        kvm_ioctl(self.fd, "KVM_UNREGISTER_COALESCED_MMIO", z, lambda: f"addr={addr:#x}, size={size:#x}")

    def get_dirty_log(self, slot: int) -> bytes:
        m = self.memslots[slot]
        npages = m.size // 4096
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        d = ffi.new("struct kvm_dirty_log *")
        d.slot = slot
        d.dirty_bitmap = bitmap
        kvm_ioctl(self.fd, "KVM_GET_DIRTY_LOG", d, lambda: f"slot={slot}")
        return bytes(ffi.buffer(bitmap))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        buf = ffi.new("char[]", bitmap)
        c = ffi.new("struct kvm_clear_dirty_log *")
        c.slot, c.first_page, c.num_pages, c.dirty_bitmap = slot, first_page, num_pages, buf
        kvm_ioctl(self.fd, "KVM_CLEAR_DIRTY_LOG", c,
                  lambda: f"slot={slot}, first_page={first_page}, num_pages={num_pages}")

    def set_clock(self, clock_ns: int, flags: int = 0) -> None:
        c = ffi.new("struct kvm_clock_data *")
        c.clock = clock_ns
        c.flags = flags
        kvm_ioctl(self.fd, "KVM_SET_CLOCK", c, lambda: f"clock={clock_ns}")

    def get_clock(self) -> int:
        c = ffi.new("struct kvm_clock_data *")
        kvm_ioctl(self.fd, "KVM_GET_CLOCK", c, "")
        return c.clock

    def stats(self) -> Stats:
        if self._stats is None:
            self._stats = Stats(kvm_ioctl(self.fd, "KVM_GET_STATS_FD", 0, "vm"))
        return self._stats

    def own(self, resource: Any) -> Any:
        """Make the VM close `resource` (anything with close()) when it closes."""
        self._owned.append(resource)
        return resource

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        errors: list[BaseException] = []
        for v in self.vcpus:
            _try(v.close, errors)
        if self._stats is not None:
            _try(self._stats.close, errors)
        _try(lambda: os.close(self.fd), errors)
        # memory goes after the VM fd so KVM never sees a slot whose memory vanished first
        for r in reversed(self._owned):
            _try(r.close, errors)
        self._owned.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _try(fn: Any, errors: list[BaseException]) -> None:
    try:
        fn()
    except Exception as e:
        errors.append(e)
