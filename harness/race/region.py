"""The raced region as host and guest share it, and the host's side of the generation protocol.

Guest side: one memslot (SLOT) at GPA_A, mapped at GVA_A (and at GVA_B -> GPA_B when a disruptor
moves the slot there), plus a control page and gentab[] in the boot slot that race_toucher reads.
Host side: the backing's mapping, seen as 8-byte words (`words`) and one tag per stride (`tags`).
Writers of the protocol (protocol.py) bracket every change of the region with begin_change() and
end_change(): the range's pages odd in gentab[], the change, then the next generation's tags and
gentab[] even; one lock serializes the writers (several disruptors, the kvmclock reader).
The writers' state and lock are C (`struct kh_region`, harness.race._cfast): a disruptor's inner
loop in C (disruptors/base.py) and these Python methods publish through the same functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from harness import memory
from harness.kvm._cffi import ffi
from harness.memory import PAGE_1G, PAGE_2M, PAGE_4K
from harness.race import _cfast
from harness.race import protocol as P

if TYPE_CHECKING:
    from harness.lib.guestvm import GuestVm
    from harness.memory import Backing

GPA_A = 1 << 36
GPA_B = (1 << 36) + (4 << 30)  # memslot-move target: 4 GiB above, any page size fits
GVA_A = 1 << 39
GVA_B = (1 << 39) + (4 << 30)
SLOT = 1


def geometry(kind: str, page: int) -> tuple[int, int]:
    """(region bytes, tag stride) for a backing kind and guest page size: ~512-1024 tags a sweep,
    few enough that a sweep refaulting every one of them stays far inside the progress bound."""
    kp = memory.kind(kind).page_size
    if kp == PAGE_1G:
        return PAGE_1G, PAGE_2M
    if kp == PAGE_2M:
        if kind == "anon-thp":
            return 4 * PAGE_2M, 4 * PAGE_4K  # 512 tags; partial-THP zaps go down to 16 KiB
        return 4 * PAGE_2M, 4 * PAGE_4K
    if page == PAGE_2M:
        return 2 * PAGE_2M, 2 * PAGE_4K
    return PAGE_2M, PAGE_4K


class Region:
    """The region laid out in `vm` over `backing` (slot added, pages mapped, control page and
    gentab[] filled in, generation 1 published everywhere)."""

    def __init__(self, vm: GuestVm, backing: Backing, size: int, stride: int, *, page: int,
                 writers: Sequence[int], nvcpus: int, alias: bool) -> None:
        self.size = size
        self.stride = stride
        self.npages = size // stride
        self.writers = tuple(writers)
        self.nvcpus = nvcpus
        self.hva = backing.addr
        self.ctrl_gpa = vm.alloc(4096, 4096)
        vm.add_memslot(GPA_A, size, slot=SLOT, backing=backing)
        vm.map(GVA_A, GPA_A, size, page)
        if alias:
            vm.map(GVA_B, GPA_B, size, page)

        ctrl = ffi.cast("uint64_t *", vm.gpa_to_hva(self.ctrl_gpa))
        self.ctrl: Any = ctrl  # struct race_ctrl (protocol.CTRL_*): ctrl[0] is one aligned 8-byte store
        ctrl[1] = 0
        ctrl[2] = 0
        ctrl[3] = GVA_A
        ctrl[4] = GVA_B
        ctrl[5] = self.npages
        ctrl[6] = stride
        ctrl[7] = sum(1 << v for v in self.writers)
        ctrl[8] = nvcpus
        self.gentab_gpa = vm.alloc(self.npages * 8, 4096)
        ctrl[9] = self.gentab_gpa  # identity-mapped: GVA == GPA
        gentab = ffi.buffer(ffi.cast("char *", vm.gpa_to_hva(self.gentab_gpa)), self.npages * 8)
        self.gentab: Any = memoryview(gentab).cast("B").cast("Q")
        self.words: Any = memoryview(ffi.buffer(ffi.cast("char *", backing.addr), size)).cast("B").cast("Q")
        self.tags: Any = self.words[:: stride // 8]
        # gen, seq (host operations started, mirrored in ctrl[0]), page0_changes (changes that
        # covered the region's first page: kvmclock oracle) and the writers' lock, in C
        self.c: Any = _cfast.ffi.new("struct kh_region *")
        rc = _cfast.lib.kh_region_init(self.c, int(ffi.cast("uintptr_t", vm.gpa_to_hva(self.gentab_gpa))),
                                       int(ffi.cast("uintptr_t", ctrl)), backing.addr, size, stride)
        if rc:
            raise OSError(-rc, f"sem_init: {os.strerror(-rc)}")
        ctrl[0] = 0
        self._publish(0, size)  # generation 1 everywhere

    # the writers' state (struct kh_region): one copy, whichever path writes
    @property
    def gen(self) -> int:
        return int(self.c.gen)

    @gen.setter
    def gen(self, v: int) -> None:
        self.c.gen = v

    @property
    def seq(self) -> int:
        return int(self.c.seq)

    @property
    def page0_changes(self) -> int:
        return int(self.c.page0_changes)

    # ---- where things are ------------------------------------------------------------------------
    @property
    def loc(self) -> int:
        """0: the slot is at GPA_A, 1: at GPA_B. ctrl->loc itself (one copy, whichever path moves
        the slot: step() through set_loc, or slot-move's C loop)."""
        return int(self.ctrl[2])

    @property
    def gpa_now(self) -> int:
        return self.gpa_of_loc(self.loc)

    def gpa_of_loc(self, loc: int) -> int:
        return GPA_B if loc else GPA_A

    def set_loc(self, loc: int) -> None:
        """The slot now lives at gpa_of_loc(loc); the guest follows ctrl->loc."""
        self.ctrl[2] = loc

    def windows(self) -> tuple[tuple[int, int], ...]:
        """The GPA ranges [start, end) where the region may be (its slot at GPA_A, or GPA_B)."""
        return ((GPA_A, GPA_A + self.size), (GPA_B, GPA_B + self.size))

    def pages_of(self, off: int, length: int) -> tuple[int, int]:
        """Tag indices [p0, p1) inside [off, off+length)."""
        s = self.stride
        return -(-off // s), -(-(off + length) // s)

    def pvclock_gpa(self, vcpu: int) -> int:
        """Where vCPU's kvmclock lives: the region's first page, away from the tag and the words."""
        return GPA_A + P.PVCLOCK_OFFSET + P.PVCLOCK_SIZE * vcpu

    # ---- the protocol's writers (hot path) -------------------------------------------------------
    def begin_change(self, off: int, length: int) -> None:
        """Take the writers' lock; seq and ctrl[0] + 1, page0_changes + 1 when off == 0 (before the
        change: the kvmclock oracle then calls a miss inconclusive); seqlock odd for the pages of
        [off, off+length). Waits for the lock with the GIL released (a C loop may hold it)."""
        _cfast.lib.kh_begin(self.c, off, length)

    def end_change(self, off: int, length: int) -> None:
        """The next generation's tags in [off, off+length), published (seq even); drop the lock."""
        _cfast.lib.kh_end(self.c, off, length)

    def cancel_change(self) -> None:
        """Drop the lock without publishing: the range stays odd, never judged against a half-made
        generation."""
        _cfast.lib.kh_unlock(self.c)

    def _publish(self, off: int, length: int) -> None:
        """tag(gen + 1, p) into every page of the range, then gentab[p] = 2 (gen + 1); gen + 1."""
        _cfast.lib.kh_publish(self.c, off, length)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The writers' lock (no change): a reader that must not touch a page while it changes."""
        _cfast.lib.kh_lock(self.c)
        try:
            yield
        finally:
            _cfast.lib.kh_unlock(self.c)

    # ---- what the engine reads back --------------------------------------------------------------
    def counters(self, i: int) -> dict[str, int]:
        """vCPU i's record in the control page (protocol.VCPU_FIELDS)."""
        base = P.CTRL_VCPU0 // 8 + i * P.VCPU_SIZE // 8
        return {name: int(self.ctrl[base + k]) for k, name in enumerate(P.VCPU_FIELDS)}

    def sweeps(self) -> list[int]:
        base = P.CTRL_VCPU0 // 8
        step = P.VCPU_SIZE // 8
        return [int(self.ctrl[base + i * step]) for i in range(self.nvcpus)]

    def stop_guests(self) -> None:
        """ctrl->stop: every vCPU ends its sweep and reports DONE."""
        self.ctrl[1] = 1

    def read_pvclock(self, vcpu: int) -> tuple[int, int]:
        """(version, system_time) of vCPU's pvclock as the host mapping shows it (consistent read).

        Under the writers' lock: the host never touches a page while it is changing it (a read
        fault racing a hugetlb punch with an exactly sized pool gets SIGBUS)."""
        q = (P.PVCLOCK_OFFSET + P.PVCLOCK_SIZE * vcpu) // 8
        w = self.words
        with self.locked():
            while True:
                v1 = w[q] & 0xFFFFFFFF
                st = w[q + 2]
                v2 = w[q] & 0xFFFFFFFF
                if v1 == v2:
                    return v1, st

    def close(self) -> None:
        """Drop the views of guest and host memory (the VM and the backing outlive them only briefly)."""
        self.words = self.tags = self.gentab = None
