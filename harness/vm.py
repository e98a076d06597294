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

_U64 = (1 << 64) - 1


class Backing(Protocol):
    """What a memslot's memory must offer the VM (harness.memory implements it per kind).

    A backing may also carry `guest_memfd` (>= 0: bind it with KVM_MEM_GUEST_MEMFD) and
    `guest_memfd_offset`; add_memslot reads them with getattr.
    """

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
    backing: Any = field(default=None, repr=False, compare=False)
    backing_offset: int = 0  # where in `backing` the slot starts
    v2: bool = False  # made with KVM_SET_USER_MEMORY_REGION2 (changes go through it too)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end

    def describe(self) -> str:
        s = (f"slot={self.slot}, gpa={self.gpa:#x}, size={self.size:#x}, hva={self.hva:#x}, "
             f"flags={self.flags:#x}")
        if self.flags & KVM_MEM_GUEST_MEMFD:
            s += f", guest_memfd={self.guest_memfd}, offset={self.guest_memfd_offset:#x}"
        kind = getattr(self.backing, "kind", None)
        if kind:
            s += f", backing={kind}+{self.backing_offset:#x}"
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
                               backing: Any = None, backing_offset: int | None = None) -> None:
        """KVM_SET_USER_MEMORY_REGION (v1); on success the slot table follows the kernel.

        The raw ioctl: any value goes to the kernel (cases pass bad ones on purpose); KvmError
        carries the errno and leaves the table as it was."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = (
            slot & 0xFFFFFFFF, flags & 0xFFFFFFFF, gpa & _U64, size & _U64, hva & _U64)
        kvm_ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", r,
                  lambda: f"slot={slot}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x}, flags={flags:#x}")
        self._track(Memslot(slot, gpa, size, hva, flags, backing=backing), backing_offset)

    def set_user_memory_region2(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0,
                                backing: Any = None, backing_offset: int | None = None) -> None:
        """KVM_SET_USER_MEMORY_REGION2; on success the slot table follows the kernel."""
        r = ffi.new("struct kvm_userspace_memory_region2 *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = (
            slot & 0xFFFFFFFF, flags & 0xFFFFFFFF, gpa & _U64, size & _U64, hva & _U64)
        r.guest_memfd = guest_memfd & 0xFFFFFFFF
        r.guest_memfd_offset = guest_memfd_offset & _U64
        kvm_ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION2", r,
                  lambda: f"slot={slot}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x}, flags={flags:#x}, "
                  f"guest_memfd={guest_memfd}, offset={guest_memfd_offset:#x}")
        gm = guest_memfd if flags & KVM_MEM_GUEST_MEMFD else -1
        self._track(Memslot(slot, gpa, size, hva, flags, gm, guest_memfd_offset, backing, v2=True),
                    backing_offset)

    def _track(self, m: Memslot, backing_offset: int | None = None) -> None:
        old = self.memslots.get(m.slot)
        if m.size == 0:
            self.memslots.pop(m.slot, None)
            return
        if old is not None and m.backing is None:
            # a move or flags change of the same memory: it keeps its backing
            m.backing = old.backing
            m.backing_offset = old.backing_offset
        if backing_offset is not None:
            m.backing_offset = backing_offset
        elif m.backing is not None and (old is None or m.backing is not old.backing):
            base = getattr(m.backing, "addr", 0)
            m.backing_offset = m.hva - base if base and m.hva >= base else 0
        self.memslots[m.slot] = m

    def free_slot_id(self) -> int:
        i = 0
        while i in self.memslots:
            i += 1
        return i

    def add_memslot(self, gpa: int, size: int, *, slot: int | None = None, flags: int = 0,
                    backing: Any = None, offset: int = 0, v2: bool | None = None) -> Memslot:
        """Add a slot at gpa backed by [offset, offset+size) of `backing` (anonymous private memory
        when None). Any harness.memory backing works: a guest_memfd one is bound with
        KVM_MEM_GUEST_MEMFD through KVM_SET_USER_MEMORY_REGION2 with its host mapping (if any) as
        userspace_addr. v2=True sends other slots through the v2 ioctl too.

        The VM owns an anonymous mapping it made; a caller's backing stays the caller's.
        """
        sid = self.free_slot_id() if slot is None else slot
        if backing is None:
            backing = Mapping(size)
            self._owned.append(backing)
        length = getattr(backing, "length", None)
        if length is not None and (offset < 0 or offset + size > length):
            raise HarnessError(f"slot of {size:#x} bytes at backing offset {offset:#x} does not fit the "
                               f"backing's {length:#x} bytes")
        hva = backing.addr + offset if backing.addr else 0
        gmem = getattr(backing, "guest_memfd", -1)
        if gmem is not None and gmem >= 0:
            gm_off = getattr(backing, "guest_memfd_offset", 0) + offset
            self.set_user_memory_region2(sid, gpa, size, hva, flags | KVM_MEM_GUEST_MEMFD, gmem, gm_off,
                                         backing=backing, backing_offset=offset)
        elif v2:
            self.set_user_memory_region2(sid, gpa, size, hva, flags, backing=backing, backing_offset=offset)
        else:
            self.set_user_memory_region(sid, gpa, size, hva, flags, backing=backing, backing_offset=offset)
        return self.memslots[sid]

    def _update(self, m: Memslot, gpa: int, size: int, flags: int) -> None:
        """Re-issue slot m with a new gpa/size/flags through the ioctl that made it."""
        if m.v2 or m.flags & KVM_MEM_GUEST_MEMFD:
            gm = m.guest_memfd if m.guest_memfd >= 0 else 0
            self.set_user_memory_region2(m.slot, gpa, size, m.hva, flags, gm, m.guest_memfd_offset)
        else:
            self.set_user_memory_region(m.slot, gpa, size, m.hva, flags)

    def _slot(self, slot: int) -> Memslot:
        m = self.memslots.get(slot)
        if m is None:
            raise HarnessError(f"no memslot {slot} in this VM (slots: {sorted(self.memslots)})")
        return m

    def delete_memslot(self, slot: int) -> None:
        m = self._slot(slot)
        self._update(m, m.gpa, 0, m.flags)

    def move_memslot(self, slot: int, new_gpa: int) -> None:
        """KVM_MR_MOVE: same memory, new GPA (KVM refuses it for guest_memfd slots: EINVAL)."""
        m = self._slot(slot)
        self._update(m, new_gpa, m.size, m.flags)

    def set_memslot_flags(self, slot: int, flags: int) -> None:
        """KVM_MR_FLAGS_ONLY: e.g. toggle KVM_MEM_LOG_DIRTY_PAGES (KVM refuses READONLY changes)."""
        m = self._slot(slot)
        self._update(m, m.gpa, m.size, flags)

    def resize_memslot(self, slot: int, new_size: int) -> Memslot:
        """KVM cannot resize a slot in place (EINVAL): delete it and add it again with the new size,
        same id, GPA, backing, offset and flags, as a VMM does. Not atomic: between the two ioctls
        the range has no memory. If the re-add fails the slot stays deleted and the error is raised."""
        m = self._slot(slot)
        backing = m.backing
        if backing is None:
            raise HarnessError(f"memslot {slot} has no backing the harness knows: cannot re-add it")
        flags = m.flags & ~KVM_MEM_GUEST_MEMFD
        self.delete_memslot(slot)
        return self.add_memslot(m.gpa, new_size, slot=slot, flags=flags, backing=backing,
                                offset=m.backing_offset, v2=m.v2)

    def memslot_snapshot(self) -> dict[int, Memslot]:
        """A copy of the slot table (Memslots are replaced, never mutated: == compares tables)."""
        return dict(self.memslots)

    def map(self, gva: int, gpa: int, size: int, page_size: int = 4096, **perm: Any) -> None:
        """Map guest pages; only VMs with page tables (GuestVm) can."""
        raise HarnessError(f"{type(self).__name__} has no guest page tables to map {gva:#x} in")

    def map_slot(self, slot: int, gva: int, page_size: int | None = None, **perm: Any) -> int:
        """Map the whole of memslot `slot` at gva in the guest's page tables; returns gva.

        page_size defaults to 2 MiB when gva, the slot's GPA and size allow it (so a 1 GiB slot needs
        one table page), else 4 KiB. perm: writable, user, nx as PageTables.map takes them."""
        m = self._slot(slot)
        if page_size is None:
            big = 1 << 21
            page_size = big if not (gva | m.gpa | m.size) % big else 4096
        self.map(gva, m.gpa, m.size, page_size, **perm)
        return gva

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

    def get_clock_data(self) -> tuple[int, int]:
        """KVM_GET_CLOCK: (kvmclock ns, flags) — flags say e.g. KVM_CLOCK_TSC_STABLE."""
        c = ffi.new("struct kvm_clock_data *")
        kvm_ioctl(self.fd, "KVM_GET_CLOCK", c, "")
        return c.clock, c.flags

    # ---- dirty tracking (additions for harness.dirty) ------------------------------------------
    def enable_manual_dirty_log_protect(self, flags: int = 1) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG stops re-protecting; CLEAR_DIRTY_LOG does it.
        flags: KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1) | KVM_DIRTY_LOG_INITIALLY_SET (2)."""
        from harness.caps import Cap

        self.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, flags)

    def enable_dirty_ring(self, size_bytes: int, *, acq_rel: bool = False) -> None:
        """KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) with a per-vCPU ring of size_bytes; before any vCPU exists."""
        from harness.caps import Cap

        self.enable_cap(Cap.DIRTY_LOG_RING_ACQ_REL if acq_rel else Cap.DIRTY_LOG_RING, size_bytes)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: KVM re-protects harvested (RESET) entries; returns how many."""
        return kvm_ioctl(self.fd, "KVM_RESET_DIRTY_RINGS", 0, "vm")

    def get_dirty_pages(self, slot: int) -> set[int]:
        """KVM_GET_DIRTY_LOG as a set of page numbers within the slot."""
        from harness.dirty import bitmap_pages

        return bitmap_pages(self.get_dirty_log(slot), self.memslots[slot].size // 4096)

    def clear_dirty_pages(self, slot: int, pages: set[int] | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG over the whole slot for `pages` (all pages when None)."""
        from harness.dirty import pages_bitmap

        npages = self.memslots[slot].size // 4096
        bits = pages_bitmap(range(npages) if pages is None else pages, npages)
        self.clear_dirty_log(slot, 0, npages, bits)

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
