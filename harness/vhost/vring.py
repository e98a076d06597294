"""Split virtqueues in guest memory, driven from the guest's side (the harness is the driver).

Layout of one queue of `num` entries (virtio 1.x split ring, the legacy vring_init() placement):

    desc   num x struct vring_desc (16 bytes)                        at the queue's GPA, 16-aligned
    avail  le16 flags, le16 idx, le16 ring[num], le16 used_event     right after desc
    used   le16 flags, le16 idx, {le32 id, le32 len}[num], le16 avail_event   at the next `align`

The driver (here) writes descriptors, puts chain heads in avail.ring and then publishes avail.idx;
the device (vhost) takes heads in avail order, fills the buffers and appends {head, bytes written}
to used.ring, then bumps used.idx. Indexes are free-running u16s. Memory is reached through a
GuestMemory (read/write by GPA, gpa_to_hva for the addresses VHOST_SET_VRING_ADDR takes): a
harness.kvm Vm is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from harness.vhost import uapi


class GuestMemory(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def gpa_to_hva(self, gpa: int, size: int = 1) -> int: ...


class VringError(Exception):
    """The driver side was misused (no free descriptors, a bad layout) or the device returned
    something a correct device never does (an id that is not an outstanding head)."""


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class VringLayout:
    """Where one split queue lives (GPAs)."""

    num: int
    desc: int
    avail: int
    used: int

    @classmethod
    def at(cls, gpa: int, num: int, align: int = 4096) -> VringLayout:
        if num < 1 or num > uapi.VRING_MAX_NUM or num & (num - 1):
            raise VringError(f"queue size {num}: vhost wants a power of 2 up to {uapi.VRING_MAX_NUM}")
        if gpa % uapi.VRING_DESC_ALIGN:
            raise VringError(f"descriptor table at {gpa:#x} is not {uapi.VRING_DESC_ALIGN}-byte aligned")
        avail = gpa + cls.desc_size(num)
        used = _align(avail + cls.avail_size(num), align)
        return cls(num, gpa, avail, used)

    @staticmethod
    def desc_size(num: int) -> int:
        return uapi.VRING_DESC.size * num

    @staticmethod
    def avail_size(num: int) -> int:
        return 2 + 2 + 2 * num + 2

    @staticmethod
    def used_size(num: int) -> int:
        return 2 + 2 + uapi.VRING_USED_ELEM.size * num + 2

    @property
    def end(self) -> int:
        return self.used + self.used_size(self.num)

    @property
    def size(self) -> int:
        return self.end - self.desc

    # field addresses
    def desc_at(self, i: int) -> int:
        return self.desc + uapi.VRING_DESC.size * i

    @property
    def avail_idx(self) -> int:
        return self.avail + 2

    def avail_ring(self, slot: int) -> int:
        return self.avail + 4 + 2 * slot

    @property
    def used_idx(self) -> int:
        return self.used + 2

    def used_ring(self, slot: int) -> int:
        return self.used + 4 + uapi.VRING_USED_ELEM.size * slot


@dataclass(frozen=True)
class Seg:
    """One descriptor of a chain: guest-physical buffer, its length, device-writable or not."""

    gpa: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Used:
    """One used-ring entry as the device wrote it, with the chain it returns."""

    head: int
    length: int  # bytes the device says it wrote (device-writable buffers) / consumed
    chain: tuple[Seg, ...]
    seq: int  # position in the used ring since the queue started (free-running)


class SplitVring:
    """The driver's side of one split virtqueue. Not thread-safe: one thread drives a queue."""

    def __init__(self, mem: GuestMemory, layout: VringLayout, index: int = 0) -> None:
        self.mem = mem
        self.layout = layout
        self.index = index
        self.num = layout.num
        self.free = list(range(self.num))
        self.chains: dict[int, tuple[Seg, ...]] = {}  # outstanding head -> its segments
        self._ids: dict[int, list[int]] = {}  # outstanding head -> its descriptor indexes
        self.avail_shadow = 0  # next avail index the driver fills (free-running)
        self.published = 0  # avail.idx as last written
        self.last_used = 0  # next used index the driver harvests
        self.zero()

    def zero(self) -> None:
        lay = self.layout
        self.mem.write(lay.desc, bytes(lay.desc_size(self.num)))
        self.mem.write(lay.avail, bytes(lay.avail_size(self.num)))
        self.mem.write(lay.used, bytes(lay.used_size(self.num)))

    # ---- addresses for VHOST_SET_VRING_ADDR (userspace addresses of this process) ---------------
    def user_addrs(self) -> tuple[int, int, int]:
        lay = self.layout
        return (self.mem.gpa_to_hva(lay.desc, lay.desc_size(self.num)),
                self.mem.gpa_to_hva(lay.used, lay.used_size(self.num)),
                self.mem.gpa_to_hva(lay.avail, lay.avail_size(self.num)))

    # ---- driver operations -----------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        return len(self.chains)

    def add(self, chain: Sequence[Seg]) -> int:
        """Write a descriptor chain and queue its head in the avail ring (not yet published).
        Device-readable segments must come before device-writable ones (virtio's rule)."""
        if not chain:
            raise VringError("an empty chain")
        if len(chain) > len(self.free):
            raise VringError(f"queue {self.index}: {len(chain)} descriptors wanted, {len(self.free)} free "
                             f"({self.outstanding} chains outstanding)")
        seen_write = False
        for s in chain:
            if seen_write and not s.writable:
                raise VringError("a device-readable segment after a device-writable one")
            seen_write |= s.writable
            if not 0 < s.length < 1 << 32:
                raise VringError(f"segment length {s.length}")
        ids = [self.free.pop(0) for _ in chain]
        for k, (i, s) in enumerate(zip(ids, chain, strict=True)):
            last = k == len(chain) - 1
            flags = (uapi.VRING_DESC_F_WRITE if s.writable else 0) | (0 if last else uapi.VRING_DESC_F_NEXT)
            self.mem.write(self.layout.desc_at(i), uapi.VRING_DESC.pack(s.gpa, s.length, flags,
                                                                         0 if last else ids[k + 1]))
        head = ids[0]
        self.chains[head] = tuple(chain)
        self._ids[head] = ids
        self.mem.write(self.layout.avail_ring(self.avail_shadow % self.num), uapi.U16.pack(head))
        self.avail_shadow = (self.avail_shadow + 1) & 0xFFFF
        return head

    def publish(self) -> int:
        """Make the queued heads visible: write avail.idx (after the ring entries: x86 stores are
        ordered). Returns how many were new."""
        n = (self.avail_shadow - self.published) & 0xFFFF
        self.mem.write(self.layout.avail_idx, uapi.U16.pack(self.avail_shadow))
        self.published = self.avail_shadow
        return n

    def used_idx(self) -> int:
        return uapi.U16.unpack(self.mem.read(self.layout.used_idx, 2))[0]

    def avail_idx(self) -> int:
        return uapi.U16.unpack(self.mem.read(self.layout.avail_idx, 2))[0]

    def pending_used(self) -> int:
        return (self.used_idx() - self.last_used) & 0xFFFF

    def harvest(self) -> list[Used]:
        """The used entries the device added since the last harvest; their descriptors go back to
        the free list. An id that is not an outstanding head is a VringError (a device bug, or a
        used ring that memory corruption rewrote)."""
        end = self.used_idx()
        n = (end - self.last_used) & 0xFFFF
        if n > self.outstanding:
            raise VringError(f"queue {self.index}: used.idx {end} is {n} entries past the {self.last_used} "
                             f"harvested, but only {self.outstanding} chains are outstanding")
        out = []
        for _ in range(n):
            slot = self.last_used % self.num
            head, length = uapi.VRING_USED_ELEM.unpack(self.mem.read(self.layout.used_ring(slot), 8))
            chain = self.chains.pop(head, None)
            if chain is None:
                raise VringError(f"queue {self.index}: used.ring[{slot}] (entry {self.last_used}) returns id "
                                 f"{head}, which is not an outstanding chain head "
                                 f"(outstanding: {sorted(self.chains)[:16]}...)")
            self.free += self._ids.pop(head)
            out.append(Used(head, length, chain, self.last_used))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out
