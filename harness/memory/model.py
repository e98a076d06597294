"""A model of what KVM_SET_USER_MEMORY_REGION(2) must accept or refuse, and with which errno.

It follows the checks of virt/kvm/kvm_main.c (__kvm_set_memory_region) in their order, so when a
request is wrong in two ways the model names the errno the kernel reaches first. The documented
contract (Documentation/virt/kvm/api.rst): slots may not overlap (EEXIST), a slot may be moved or
have its flags changed but not resized, deleting is memory_size 0; everything else malformed is
EINVAL. The stateful property test drives the kernel and this model side by side.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace

from harness.kvm.caps import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

PAGE = 4096
V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
V2_FLAGS = V1_FLAGS | KVM_MEM_GUEST_MEMFD
GPA_LIMIT = 1 << 52  # x86 with shadow paging: kvm_mmu_max_gfn() covers 52 bits
HVA_LIMIT = (1 << 47) - PAGE  # x86-64 TASK_SIZE_MAX with 4-level paging (access_ok)
MAX_NR_PAGES = (1 << 31) - 1  # KVM_MEM_MAX_NR_PAGES


@dataclass(frozen=True)
class SlotReq:
    """One KVM_SET_USER_MEMORY_REGION(2) request (slot holds the address-space id in bits 16..31)."""

    slot: int
    gpa: int
    size: int
    hva: int
    flags: int = 0
    guest_memfd: int = -1
    guest_memfd_offset: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def overlaps(self, other: SlotReq) -> bool:
        return self.gpa < other.end and other.gpa < self.end

    def __repr__(self) -> str:
        s = f"SlotReq(slot={self.slot:#x}, gpa={self.gpa:#x}, size={self.size:#x}, hva={self.hva:#x}, " \
            f"flags={self.flags:#x}"
        if self.guest_memfd >= 0:
            s += f", guest_memfd={self.guest_memfd}, offset={self.guest_memfd_offset:#x}"
        return s + ")"


class MemslotModel:
    """The slot table KVM should have, and the answer it should give to the next request."""

    def __init__(self, nr_memslots: int, address_spaces: int = 1, readonly: bool = True,
                 guest_memfd: bool = True) -> None:
        self.nr_memslots = nr_memslots
        self.address_spaces = max(1, address_spaces)
        self.v1_flags = KVM_MEM_LOG_DIRTY_PAGES | (KVM_MEM_READONLY if readonly else 0)
        self.v2_flags = self.v1_flags | (KVM_MEM_GUEST_MEMFD if guest_memfd else 0)
        self.slots: dict[int, SlotReq] = {}

    def predict(self, req: SlotReq, v2: bool = False) -> int:
        """0 if KVM must accept req, else the errno it must answer."""
        valid = self.v2_flags if v2 else self.v1_flags
        if req.flags & KVM_MEM_GUEST_MEMFD:
            valid &= ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)  # gmem slots: neither
        if req.flags & ~valid:
            return errno.EINVAL
        as_id, sid = req.slot >> 16, req.slot & 0xFFFF
        if as_id >= self.address_spaces or sid >= self.nr_memslots:
            return errno.EINVAL
        if req.size % PAGE or req.gpa % PAGE or req.hva % PAGE:
            return errno.EINVAL
        if not (req.hva >= 0 and req.hva + req.size <= HVA_LIMIT):
            return errno.EINVAL
        if req.flags & KVM_MEM_GUEST_MEMFD and (
                req.guest_memfd_offset % PAGE or req.guest_memfd_offset + req.size >= 1 << 64):
            return errno.EINVAL  # (whether the range fits the guest_memfd is checked later, at bind)
        if req.gpa + req.size >= 1 << 64 or req.size // PAGE > MAX_NR_PAGES:
            return errno.EINVAL
        old = self.slots.get(req.slot)
        if req.size == 0:
            return 0 if old is not None else errno.EINVAL
        if old is not None:
            if (req.flags | old.flags) & KVM_MEM_GUEST_MEMFD:
                return errno.EINVAL  # guest_memfd slots are immutable (even an identical request)
            if req.hva != old.hva or req.size != old.size or (req.flags ^ old.flags) & KVM_MEM_READONLY:
                return errno.EINVAL
            if req.gpa == old.gpa and req.flags == old.flags:
                return 0  # nothing to change
        moved = old is None or req.gpa != old.gpa
        others = (s for k, s in self.slots.items() if k != req.slot and k >> 16 == as_id)
        if moved and any(s.overlaps(req) for s in others):
            return errno.EEXIST
        if req.end > GPA_LIMIT:
            return errno.EINVAL
        return 0

    def apply(self, req: SlotReq) -> None:
        """Record an accepted request."""
        if req.size == 0:
            self.slots.pop(req.slot, None)
            return
        old = self.slots.get(req.slot)
        if old is not None and old.flags & KVM_MEM_GUEST_MEMFD:
            req = replace(req, guest_memfd=old.guest_memfd, guest_memfd_offset=old.guest_memfd_offset)
        self.slots[req.slot] = req

    def submit(self, req: SlotReq, v2: bool = False) -> int:
        """predict + apply on success; returns the predicted answer."""
        e = self.predict(req, v2)
        if e == 0:
            self.apply(req)
        return e

    def slot_at(self, gpa: int) -> SlotReq | None:
        for s in self.slots.values():
            if s.slot >> 16 == 0 and s.gpa <= gpa < s.end:
                return s
        return None
