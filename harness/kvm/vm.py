"""A VM: its fd, the memslot table kept in step with the kernel, vCPUs, and VM-wide ioctls.

(Over 400 lines: one class per fd, as the uapi groups the ioctls; the memslot table is most of it.)
"""

from __future__ import annotations

import contextlib
import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.kvm._cffi import ffi
from harness.kvm.caps import KVM_MEM_GUEST_MEMFD, Cap, MemoryAttributes
from harness.kvm.checks import check_size, check_uint, closed_class
from harness.kvm.dirty import bitmap_page_array, page_array_bitmap, pages_bitmap
from harness.kvm.errors import BadInput, ClosedError, HarnessError
from harness.kvm.ioctl import kvm_ioctl
from harness.kvm.stats import Stats
from harness.kvm.vcpu import Vcpu, enable_cap_struct
from harness.memory.hostmem import MADV_NOHUGEPAGE, PAGE_SIZE, Mapping, madvise, view


class System(Protocol):
    """What a VM uses of the Kvm that made it (harness.kvm.system.Kvm, which imports this module)."""

    fd: int
    closed: bool

    @property
    def vcpu_mmap_size(self) -> int: ...

    def _closed_what(self) -> str: ...


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

    _vcpu_class: type[Vcpu] = Vcpu  # what create_vcpu makes; a subclass may make its own (GuestVm)

    # After close() the object is switched to closed_class(type(self)): every public method raises
    # ClosedError (the open class checks nothing) and fd is -1, so nothing reaches another VM that got
    # the same fd number. Dropped without close(), __del__ releases the fds and mappings: vCPUs hold
    # their VM weakly (Vcpu.vm), so no Vm <-> Vcpu cycle waits for the garbage collector.

    def __init__(self, kvm: System, vm_type: int = 0) -> None:
        self.closed = True  # until the fd exists: a half-made VM has nothing to close
        if kvm.closed:
            raise ClosedError(kvm._closed_what(), "Vm(kvm)")
        vm_type = check_uint("KVM_CREATE_VM", "vm_type", vm_type, 64)
        self.kvm = kvm
        self.type = vm_type
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: list[Vcpu] = []
        self._owned: list[Any] = []
        self._stats: Stats | None = None
        self.fd = kvm_ioctl(kvm.fd, "KVM_CREATE_VM", vm_type, lambda: f"type={vm_type}")
        self.closed = False

    # ---- capabilities --------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        cap = check_uint("Vm.check_extension", "cap", cap, 64)
        return kvm_ioctl(self.fd, "KVM_CHECK_EXTENSION", cap, lambda: f"vm, cap={cap}")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        c = enable_cap_struct("Vm.enable_cap", cap, args, flags)
        kvm_ioctl(self.fd, "KVM_ENABLE_CAP", c, lambda: f"vm, cap={int(cap)}, args={[hex(a) for a in args]}")

    # ---- vCPUs ---------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        vid = len(self.vcpus) if vcpu_id is None else check_uint("Vm.create_vcpu", "vcpu_id", vcpu_id, 32)
        v = self._vcpu_class(self, vid)
        self.vcpus.append(v)
        return v

    # ---- memslots ------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                               backing: Any = None, backing_offset: int | None = None) -> None:
        """KVM_SET_USER_MEMORY_REGION (v1); on success the slot table follows the kernel.

        The raw ioctl: any value that fits the uapi's fields goes to the kernel (cases pass bad
        ones on purpose); KvmError carries the errno and leaves the table as it was. A value that
        does not fit (negative, slot >= 2**32...) is BadInput: the kernel would see another one."""
        slot, gpa, size, hva, flags = self._region_fields("KVM_SET_USER_MEMORY_REGION", slot, gpa, size,
                                                          hva, flags)
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, hva
        kvm_ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", r,
                  lambda: f"slot={slot}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x}, flags={flags:#x}")
        self._track(Memslot(slot, gpa, size, hva, flags, backing=backing), backing_offset)

    def set_user_memory_region2(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0,
                                backing: Any = None, backing_offset: int | None = None) -> None:
        """KVM_SET_USER_MEMORY_REGION2; on success the slot table follows the kernel (values are
        checked as set_user_memory_region's are)."""
        where = "KVM_SET_USER_MEMORY_REGION2"
        slot, gpa, size, hva, flags = self._region_fields(where, slot, gpa, size, hva, flags)
        guest_memfd = check_uint(f"{where} memslot {slot}", "guest_memfd", guest_memfd, 32)
        guest_memfd_offset = check_uint(f"{where} memslot {slot}", "guest_memfd_offset", guest_memfd_offset, 64)
        r = ffi.new("struct kvm_userspace_memory_region2 *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, hva
        r.guest_memfd = guest_memfd
        r.guest_memfd_offset = guest_memfd_offset
        kvm_ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION2", r,
                  lambda: f"slot={slot}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x}, flags={flags:#x}, "
                  f"guest_memfd={guest_memfd}, offset={guest_memfd_offset:#x}")
        gm = guest_memfd if flags & KVM_MEM_GUEST_MEMFD else -1
        self._track(Memslot(slot, gpa, size, hva, flags, gm, guest_memfd_offset, backing, v2=True),
                    backing_offset)

    def _region_fields(self, where: str, slot: Any, gpa: Any, size: Any, hva: Any,
                       flags: Any) -> tuple[int, int, int, int, int]:
        """The memslot fields as the uapi's u32/u64, or BadInput naming the slot and the field. Only
        the width is checked: alignment, limits and overlaps are the kernel's to judge."""
        slot = self._check_slot(where, slot)
        w = f"{where} memslot {slot}"
        return (slot, check_uint(w, "gpa", gpa, 64), check_uint(w, "size", size, 64),
                check_uint(w, "hva", hva, 64), check_uint(w, "flags", flags, 32))

    def _check_slot(self, where: str, slot: Any) -> int:
        try:
            return check_uint(where, "slot", slot, 32)
        except BadInput as e:  # say what the field holds (costs ioctls only on this error path)
            raise BadInput(where, "slot", slot, e.need + self._slot_layout()) from None

    def _slot_layout(self) -> str:
        """What a slot field holds, with this VM's limits when they can be read."""
        try:
            nr = self.check_extension(Cap.NR_MEMSLOTS)
            spaces = max(1, self.check_extension(Cap.MULTI_ADDRESS_SPACE))
        except Exception:  # only decorates the message
            return " (bits 16-31 the address space, bits 0-15 the slot id)"
        return (f" (bits 16-31 the address space id, {spaces} address space(s) here; bits 0-15 the slot "
                f"id, below KVM_CAP_NR_MEMSLOTS = {nr} here)")

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
        Arguments are checked before anything is mapped or issued (BadInput names the slot): size
        > 0 (0 would delete), whole pages when the harness maps the memory, inside the backing.
        """
        if slot is None:
            sid = self.free_slot_id()
        else:
            sid = self._check_slot("Vm.add_memslot", slot)
        where = f"Vm.add_memslot memslot {sid}"
        check_uint(where, "gpa", gpa, 64)
        check_uint(where, "flags", flags, 32)
        size = check_size(where, "size", size, page=PAGE_SIZE if backing is None else None)
        offset = check_size(where, "offset", offset, zero_ok=True)
        if backing is None:
            if offset:
                raise BadInput(where, "offset", offset, "needs a backing (the VM maps its own memory at 0)")
            backing = Mapping(size)
            # 4 KiB pages: on THP "always" kernels the first touch of each 2 MiB of a boot slot
            # zeroed a whole THP (~25 ms apiece under the runner's TCG)
            madvise(backing.addr, size, MADV_NOHUGEPAGE)
            self._owned.append(backing)
        length = getattr(backing, "length", None)
        if length is not None and offset + size > length:
            raise BadInput(where, "size", size, f"at backing offset {offset:#x} does not fit the backing's "
                           f"{length:#x} bytes")
        gmem = getattr(backing, "guest_memfd", -1)
        if not getattr(backing, "addr", 0) and (gmem is None or gmem < 0):
            # a closed backing: its address 0 would make a slot the guest cannot use
            raise BadInput(where, "backing", backing, "has no host mapping (closed?) and no guest_memfd")
        hva = backing.addr + offset if backing.addr else 0
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

    def _slot(self, slot: int, where: str = "Vm") -> Memslot:
        m = self.memslots.get(slot)
        if m is None:
            raise BadInput(where, "slot", slot, f"is not a memslot of this VM (slots: {sorted(self.memslots)})")
        return m

    def delete_memslot(self, slot: int) -> None:
        m = self._slot(slot, "Vm.delete_memslot")
        self._update(m, m.gpa, 0, m.flags)

    def move_memslot(self, slot: int, new_gpa: int) -> None:
        """KVM_MR_MOVE: same memory, new GPA (KVM refuses it for guest_memfd slots: EINVAL)."""
        m = self._slot(slot, "Vm.move_memslot")
        new_gpa = check_uint(f"Vm.move_memslot memslot {slot}", "new_gpa", new_gpa, 64)
        self._update(m, new_gpa, m.size, m.flags)

    def note_memslot_changed(self, slot: int, gpa: int, size: int) -> None:
        """Record a move (new gpa) or delete (size 0) of `slot` that already succeeded through a raw
        ioctl on self.fd outside this object (harness/race's C loop): no ioctl, only the table."""
        m = self._slot(slot, "Vm.note_memslot_changed")
        self._track(Memslot(m.slot, gpa, size, m.hva, m.flags, m.guest_memfd, m.guest_memfd_offset, m.backing,
                            m.backing_offset, m.v2))

    def set_memslot_flags(self, slot: int, flags: int) -> None:
        """KVM_MR_FLAGS_ONLY: e.g. toggle KVM_MEM_LOG_DIRTY_PAGES (KVM refuses READONLY changes)."""
        m = self._slot(slot, "Vm.set_memslot_flags")
        flags = check_uint(f"Vm.set_memslot_flags memslot {slot}", "flags", flags, 32)
        self._update(m, m.gpa, m.size, flags)

    def resize_memslot(self, slot: int, new_size: int) -> Memslot:
        """KVM cannot resize a slot in place (EINVAL): delete it and add it again with the new size,
        same id, GPA, backing, offset and flags, as a VMM does. Not atomic: between the two ioctls
        the range has no memory. If the re-add fails the slot stays deleted and the error is raised."""
        m = self._slot(slot, "Vm.resize_memslot")
        backing = m.backing
        if backing is None:
            raise HarnessError(f"memslot {slot} has no backing the harness knows: cannot re-add it")
        # checked before the delete: a refused size must not leave the slot deleted
        where = f"Vm.resize_memslot memslot {slot}"
        new_size = check_size(where, "new_size", new_size)
        length = getattr(backing, "length", None)
        if length is not None and m.backing_offset + new_size > length:
            raise BadInput(where, "new_size", new_size, f"at backing offset {m.backing_offset:#x} does not fit "
                           f"the backing's {length:#x} bytes")
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
        m = self._slot(slot, "Vm.map_slot")
        if page_size is None:
            big = 1 << 21
            page_size = big if not (gva | m.gpa | m.size) % big else 4096
        self.map(gva, m.gpa, m.size, page_size, **perm)
        return gva

    def slot_for(self, gpa: int, size: int = 1) -> Memslot:
        check_uint("Vm.slot_for", "gpa", gpa, 64)
        check_size("Vm.slot_for", "size", size, zero_ok=True)
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
        try:
            memoryview(data)
        except TypeError:
            raise BadInput("Vm.write", "data", type(data).__name__, "must be bytes-like") from None
        view(self.gpa_to_hva(gpa, len(data)), len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & (2**64 - 1)).to_bytes(8, "little"))

    # ---- other VM ioctls -----------------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        # width only: size 0 or unaligned and unknown flags are the kernel's EINVALs to give
        size = check_uint("KVM_CREATE_GUEST_MEMFD", "size", size, 64)
        flags = check_uint("KVM_CREATE_GUEST_MEMFD", "flags", flags, 64)
        g = ffi.new("struct kvm_create_guest_memfd *")
        g.size = size
        g.flags = flags
        return kvm_ioctl(self.fd, "KVM_CREATE_GUEST_MEMFD", g, lambda: f"size={size:#x}, flags={flags:#x}")

    def set_memory_attributes(self, gpa: int, size: int, attributes: int = MemoryAttributes.SHARED,
                              flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES on [gpa, gpa+size): PRIVATE makes guest accesses go to the
        slot's guest_memfd, SHARED (0) to its userspace_addr. The raw ioctl: alignment, unknown bits
        and flags are the kernel's EINVALs to give (cases pass bad ones on purpose)."""
        w = "KVM_SET_MEMORY_ATTRIBUTES"
        a = ffi.new("struct kvm_memory_attributes *")
        a.address = check_uint(w, "gpa", gpa, 64)
        a.size = check_uint(w, "size", size, 64)
        a.attributes = check_uint(w, "attributes", int(attributes), 64)
        a.flags = check_uint(w, "flags", flags, 64)
        kvm_ioctl(self.fd, w, a, lambda: f"gpa={gpa:#x}, size={size:#x}, attributes={_attrs(attributes)}, "
                  f"flags={flags:#x}")

    def set_private(self, gpa: int, size: int) -> None:
        """Convert [gpa, gpa+size) to private (KVM_SET_MEMORY_ATTRIBUTES PRIVATE)."""
        self.set_memory_attributes(gpa, size, MemoryAttributes.PRIVATE)

    def set_shared(self, gpa: int, size: int) -> None:
        """Convert [gpa, gpa+size) to shared (KVM_SET_MEMORY_ATTRIBUTES 0)."""
        self.set_memory_attributes(gpa, size, MemoryAttributes.SHARED)

    def ioeventfd(self, addr: int, length: int, fd: int, flags: int = 0, datamatch: int = 0) -> None:
        w = "KVM_IOEVENTFD"
        if not isinstance(fd, int) or not 0 <= fd < 1 << 31:
            raise BadInput(w, "fd", fd, "must be an open fd (an int in [0, 2**31))")
        e = ffi.new("struct kvm_ioeventfd *")
        e.addr, e.len, e.fd, e.flags, e.datamatch = (
            check_uint(w, "addr", addr, 64), check_uint(w, "len", length, 32), fd,
            check_uint(w, "flags", flags, 32), check_uint(w, "datamatch", datamatch, 64))
        kvm_ioctl(self.fd, "KVM_IOEVENTFD", e,
                  lambda: f"addr={addr:#x}, len={length}, fd={fd}, flags={flags:#x}")

    def register_coalesced_mmio(self, addr: int, size: int) -> None:
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr = check_uint("KVM_REGISTER_COALESCED_MMIO", "addr", addr, 64)
        z.size = check_uint("KVM_REGISTER_COALESCED_MMIO", "size", size, 32)
        kvm_ioctl(self.fd, "KVM_REGISTER_COALESCED_MMIO", z, lambda: f"addr={addr:#x}, size={size:#x}")

    def unregister_coalesced_mmio(self, addr: int, size: int) -> None:
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr = check_uint("KVM_UNREGISTER_COALESCED_MMIO", "addr", addr, 64)
        z.size = check_uint("KVM_UNREGISTER_COALESCED_MMIO", "size", size, 32)
        kvm_ioctl(self.fd, "KVM_UNREGISTER_COALESCED_MMIO", z, lambda: f"addr={addr:#x}, size={size:#x}")

    def get_dirty_log(self, slot: int) -> bytes:
        return bytes(ffi.buffer(self._get_dirty_bitmap(slot, "Vm.get_dirty_log")))

    def _get_dirty_bitmap(self, slot: int, where: str) -> Any:
        m = self._slot(slot, where)
        npages = m.size // 4096
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        d = ffi.new("struct kvm_dirty_log *")
        d.slot = slot
        d.dirty_bitmap = bitmap
        kvm_ioctl(self.fd, "KVM_GET_DIRTY_LOG", d, lambda: f"slot={slot}")
        return bitmap

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        w = f"KVM_CLEAR_DIRTY_LOG memslot {slot}"
        slot = check_uint("KVM_CLEAR_DIRTY_LOG", "slot", slot, 32)
        first_page = check_uint(w, "first_page", first_page, 64)
        num_pages = check_uint(w, "num_pages", num_pages, 32)
        need = (num_pages + 63) // 64 * 8  # KVM copies whole u64 words: a shorter buffer is read past
        if len(bitmap) < need:
            raise BadInput(w, "bitmap", f"{len(bitmap)} bytes", f"is shorter than the {need} bytes KVM reads for "
                           f"num_pages={num_pages}")
        self._clear_dirty_bitmap(slot, first_page, num_pages, ffi.new("char[]", bitmap))

    def _clear_dirty_bitmap(self, slot: int, first_page: int, num_pages: int, buf: Any) -> None:
        c = ffi.new("struct kvm_clear_dirty_log *")
        c.slot, c.first_page, c.num_pages, c.dirty_bitmap = slot, first_page, num_pages, buf
        kvm_ioctl(self.fd, "KVM_CLEAR_DIRTY_LOG", c,
                  lambda: f"slot={slot}, first_page={first_page}, num_pages={num_pages}")

    def set_clock(self, clock_ns: int, flags: int = 0) -> None:
        c = ffi.new("struct kvm_clock_data *")
        c.clock = check_uint("KVM_SET_CLOCK", "clock_ns", clock_ns, 64)
        c.flags = check_uint("KVM_SET_CLOCK", "flags", flags, 32)
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

    # ---- dirty tracking (additions for harness.kvm.dirty) ------------------------------------------
    def enable_manual_dirty_log_protect(self, flags: int = 1) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG stops re-protecting; CLEAR_DIRTY_LOG does it.
        flags: KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1) | KVM_DIRTY_LOG_INITIALLY_SET (2)."""
        self.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, flags)

    def enable_dirty_ring(self, size_bytes: int, *, acq_rel: bool = False) -> None:
        """KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) with a per-vCPU ring of size_bytes; before any vCPU exists."""
        self.enable_cap(Cap.DIRTY_LOG_RING_ACQ_REL if acq_rel else Cap.DIRTY_LOG_RING, size_bytes)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: KVM re-protects harvested (RESET) entries; returns how many."""
        return kvm_ioctl(self.fd, "KVM_RESET_DIRTY_RINGS", 0, "vm")

    def get_dirty_pages(self, slot: int) -> set[int]:
        """KVM_GET_DIRTY_LOG as a set of page numbers within the slot."""
        return set(self.get_dirty_page_array(slot))

    def get_dirty_page_array(self, slot: int) -> array:
        """KVM_GET_DIRTY_LOG as an array('I') of page numbers, ascending (the bitmap walked in C)."""
        npages = self._slot(slot, "Vm.get_dirty_page_array").size // 4096
        return bitmap_page_array(self._get_dirty_bitmap(slot, "Vm.get_dirty_page_array"), npages)

    def clear_dirty_pages(self, slot: int, pages: Iterable[int] | array | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG over the whole slot for `pages` (all pages when None); an array('I')
        (get_dirty_page_array's) becomes the bitmap in C."""
        npages = self._slot(slot, "Vm.clear_dirty_pages").size // 4096
        if isinstance(pages, array) and pages.typecode == "I":
            slot = check_uint("KVM_CLEAR_DIRTY_LOG", "slot", slot, 32)
            self._clear_dirty_bitmap(slot, 0, npages, page_array_bitmap(pages, npages))
            return
        self.clear_dirty_log(slot, 0, npages, pages_bitmap(range(npages) if pages is None else pages, npages))

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
        """Close the vCPUs, the stats fd, the VM fd, then the memory the VM owns (idempotent). The
        object stays as a closed shell: fd is -1 and every method raises ClosedError."""
        if self.closed:
            return
        self._close("")

    def _close(self, why: str) -> None:
        self.closed = True
        fd, self._fd_was, self.fd = self.fd, self.fd, -1
        self._closed_why = why
        self.__class__ = closed_class(type(self))
        errors: list[BaseException] = []
        vwhy = f"closed with its {self._closed_what()}"
        if why:
            vwhy += f", which was {why}: keep a reference to the Vm while its vCPUs are in use"
        for v in self.vcpus:
            _try(lambda v=v: v._close(vwhy), errors)
        if self._stats is not None:
            _try(self._stats.close, errors)
        _try(lambda: os.close(fd), errors)
        # memory goes after the VM fd so KVM never sees a slot whose memory vanished first
        for r in reversed(self._owned):
            _try(r.close, errors)
        self._owned.clear()
        if errors:
            raise errors[0]

    def _closed_what(self) -> str:
        return f"{type(self).__name__}(fd={self.__dict__.get('_fd_was', self.__dict__.get('fd', '?'))})"

    def __del__(self) -> None:
        # dropped without close(): give the fds and mappings back now, not at exit
        if self.__dict__.get("closed") is False:
            with contextlib.suppress(Exception):
                self._close("dropped without close()")

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.__dict__.get("closed") is False:
            return f"<{type(self).__name__} fd={self.fd}, {len(self.memslots)} memslots, {len(self.vcpus)} vcpus>"
        return f"<{self._closed_what()} closed>"


def _attrs(a: int) -> str:
    names = [m.name for m in MemoryAttributes if m and a & m]
    rest = a & ~sum(int(m) for m in MemoryAttributes)
    return "|".join([*(n or "" for n in names), *([f"{rest:#x}"] if rest else [])]) or "SHARED"


def _try(fn: Any, errors: list[BaseException]) -> None:
    try:
        fn()
    except Exception as e:
        errors.append(e)
