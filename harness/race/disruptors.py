"""Host disruptors: threads that mutate a race region's backing while vCPUs fault on it.

Each disruptor's `step(off, length)` does one host operation on [off, off+length) of the region,
bracketed (when the operation can change what the guest may read) by the engine's seqlock:
`self.begin(off, length)` (the range's pages odd in the per-page seqlock) ... syscall ...
`self.end(off, length)` (the next generation's tag in every page of the range, then published).
The hot calls go straight to the cffi binding (the GIL is released inside each syscall), so the
host side keeps pace with a C loop (bench/race.py).

Which (disruptor, backing) pairs make sense is decided by `unsupported()` (static: the kind cannot
do it, or this kernel lacks the capability) and by a preflight of one operation before the vCPUs
start (the kernel refuses it: e.g. MADV_PAGEOUT on hugetlb), both turned into skips with the reason.
"""

from __future__ import annotations

import errno
import os
import random
import time
from typing import TYPE_CHECKING, ClassVar

from harness.kvm._cffi import ffi, lib
from harness.kvm.caps import Cap
from harness.kvm.ioctl import kvm_ioctl
from harness.memory import PAGE_1G, PAGE_2M, PAGE_4K, Feature, hostmem
from harness.race import protocol as P

if TYPE_CHECKING:
    from harness.race.engine import Race

MAP_FIXED_NOREPLACE = 0x100000  # refuse, instead of clobbering, whatever another thread mapped
PROT_RW = hostmem.PROT_READ | hostmem.PROT_WRITE
PUNCH = hostmem.FALLOC_FL_PUNCH_HOLE | hostmem.FALLOC_FL_KEEP_SIZE
SCHEDULE_LEN = 4096  # pre-drawn (offset, length) pairs, cycled: no RNG work in the hot loop


def _oserror(what: str) -> OSError:
    e = ffi.errno
    return OSError(e, f"{what}: {errno.errorcode.get(e, e)} ({os.strerror(e)})")


class Disruptor:
    """Base: one host operation per step(); subclasses set the class attributes."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    bumps_generation: ClassVar[bool] = True  # the op may change what the guest reads: seqlock it
    alt_half: ClassVar[bool] = False  # wants a backing twice the region (fresh file pages to map)
    whole_region: ClassVar[bool] = False  # every op covers the whole region (memslot ops)
    uses_gpa_b: ClassVar[bool] = False  # needs the region mapped in the guest at a second GPA too

    def __init__(self, race: Race) -> None:
        self.race = race
        self.ops = 0
        self.bytes = 0
        self.overlapped = 0  # ops that began and ended with a vCPU inside KVM_RUN
        self.error: BaseException | None = None
        self.sched: list[tuple[int, int]] = []
        self._held = False
        self._was_in_run = False
        self.t_start = self.t_end = 0.0

    # ---- what it applies to ------------------------------------------------------------------------
    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, race: Race) -> str | None:
        """Why this disruptor makes no sense on this backing / kernel (None: it does)."""
        return None

    def unit(self) -> int:
        """Host granularity of one operation: the backing's page size."""
        return self.race.kind_page

    def schedule(self, rng: random.Random) -> list[tuple[int, int]]:
        """(offset, length) per op, drawn once from the case's seed."""
        r = self.race
        if self.whole_region:
            return [(0, r.region)]
        u = self.unit()
        n = r.region // u
        out = []
        for _ in range(SCHEDULE_LEN):
            # mostly small ranges (faults meet invalidations of a few pages), sometimes larger
            k = min(n, rng.choice((1, 1, 1, 2, 2, 3, 4, 8, 16)))
            first = rng.randrange(0, n - k + 1)
            out.append((first * u, k * u))
        return out

    # ---- the seqlock and the counters (hot path) ----------------------------------------------------
    def begin(self, off: int, length: int) -> None:
        """Seqlock odd for the pages of [off, off+length): the host is about to change them."""
        r = self.race
        r._lock.acquire()
        self._held = True
        r.seq += 1
        r.ctrl[0] = r.seq  # one aligned 8-byte store (diagnostics: ops started)
        if off == 0:
            r.page0_changes += 1  # before the syscall: the kvmclock oracle calls later misses inconclusive
        r.mark(off, length)
        self._was_in_run = r.in_run()

    def end(self, off: int, length: int) -> None:
        """New content for [off, off+length), then publish it (seq even)."""
        r = self.race
        if self._was_in_run and r.in_run():
            self.overlapped += 1
        r.publish(off, length)
        self._held = False
        r._lock.release()
        self.ops += 1
        self.bytes += length

    def abort(self) -> None:
        """The op failed inside begin()/end(): leave its pages odd (never judged against a
        half-made generation) and let the others go on."""
        if self._held:
            self._held = False
            self.race._lock.release()

    def sample_in_run(self) -> None:
        self._was_in_run = self.race.in_run()

    def count_op(self, length: int) -> None:
        """An op outside the seqlock (content unchanged): count it and whether it overlapped."""
        if self._was_in_run and self.race.in_run():
            self.overlapped += 1
        self.ops += 1
        self.bytes += length

    # ---- lifetime ----------------------------------------------------------------------------------
    GAPS: ClassVar[tuple[float, ...]] = (0.0,)  # seeded pauses pause() draws from (seconds)

    def prepare(self) -> None:
        self.sched = self.schedule(self.race.rng(self.name))
        rng = self.race.rng(self.name + "/gaps")
        self.gaps = [rng.choice(self.GAPS) for _ in range(SCHEDULE_LEN)]

    def pause(self) -> None:
        """Sleep the next seeded gap (GIL released): room for the guest to meet the new state."""
        g = self.gaps[self.ops % SCHEDULE_LEN]
        if g:
            time.sleep(g)

    def preflight(self) -> None:
        """One op before the vCPUs run: a kernel refusal becomes a skip (OSError propagates)."""
        off, n = self.sched[0]
        self.step(off, n)

    def step(self, off: int, length: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Leave the region mapped, writable, in its slot, and every tag current."""

    def release_whole(self) -> str | None:
        """Release the whole region the way this disruptor does (for the memory-released oracle);
        returns the method, or None when this disruptor releases nothing."""
        return None


class Remap(Disruptor):
    name = "remap"
    doc = "munmap + mmap(MAP_FIXED_NOREPLACE) of the hva range, fresh content"
    alt_half = True

    @classmethod
    def unsupported(cls, kind, features, kind_page, race):
        if kind_page == PAGE_1G:
            return "a 1 GiB page per remap is too slow for a race (each op refaults the whole page)"
        return None

    def prepare(self) -> None:
        super().prepare()
        r = self.race
        b = r.backing
        self.addr = b.addr
        self.fd = b.fd
        self.anon = not b.supports(Feature.FD)
        self.gmem = b.supports(Feature.GUEST_MEMFD)
        self.thp = b.supports(Feature.HUGE) and self.anon
        m = b._mapping
        self.flags = (m.flags if m is not None else hostmem.MAP_SHARED) | MAP_FIXED_NOREPLACE
        self.base_off = m.offset if m is not None else 0
        # fd kinds flip each unit between the two halves of a double-size file: fresh pages, old
        # data, as a VMM mapping other memory at the same hva. guest_memfd maps its own offset
        # again (upstream faults gmem slots from the bound offset, not from the hva).
        self.flip = not self.anon and not self.gmem and b.length >= 2 * r.region
        self.half = bytearray(r.region // self.unit())

    def step(self, off: int, length: int) -> None:
        r = self.race
        a = self.addr + off
        fo = self.base_off + off
        if self.flip:
            u = self.unit()
            h = self.half[off // u] ^ 1
            self.half[off // u : (off + length) // u] = bytes([h]) * (length // u)
            fo += h * r.region
        self.begin(off, length)
        if lib.munmap(ffi.cast("void *", a), length):
            raise _oserror(f"munmap({a:#x}, {length:#x})")
        p = lib.mmap(ffi.cast("void *", a), length, PROT_RW, self.flags, self.fd, fo)
        if int(ffi.cast("uintptr_t", p)) != a:
            err = _oserror(f"mmap({a:#x}, {length:#x}, MAP_FIXED_NOREPLACE, fd={self.fd}, off={fo:#x})")
            if err.errno == errno.EEXIST:
                err = OSError(errno.EEXIST, f"{err}: another thread mapped into the hole between munmap "
                              "and mmap; the region is left unmapped there (harness, not kernel)")
            raise err
        if self.thp:
            lib.madvise(ffi.cast("void *", a), length, hostmem.MADV_HUGEPAGE)
        self.end(off, length)


class Madvise(Disruptor):
    name = "dontneed"
    doc = "madvise(MADV_DONTNEED)"
    advice = hostmem.MADV_DONTNEED

    def prepare(self) -> None:
        super().prepare()
        self.addr = self.race.backing.addr

    def step(self, off: int, length: int) -> None:
        self.begin(off, length)
        if lib.madvise(ffi.cast("void *", self.addr + off), length, self.advice):
            raise _oserror(f"madvise({self.addr + off:#x}, {length:#x}, {self.advice})")
        self.end(off, length)

    def release_whole(self) -> str | None:
        # DONTNEED frees private anonymous memory only; shared kinds keep their pages in the object
        b = self.race.backing
        if self.advice != hostmem.MADV_DONTNEED or b.supports(Feature.SHARED) or b.supports(Feature.FD):
            return None
        hostmem.madvise(b.addr, self.race.region, hostmem.MADV_DONTNEED)
        return "madvise(MADV_DONTNEED) of the whole region"


class PartialThp(Madvise):
    name = "partial-thp"
    doc = "madvise(MADV_DONTNEED) of a few 4 KiB pages inside a THP (splits the huge mapping)"

    @classmethod
    def unsupported(cls, kind, features, kind_page, race):
        if kind != "anon-thp":
            return "partial-THP DONTNEED needs the anon-thp backing"
        return None

    def schedule(self, rng: random.Random) -> list[tuple[int, int]]:
        r = self.race
        s = r.stride
        per = PAGE_2M // s
        out = []
        for _ in range(SCHEDULE_LEN):
            huge = rng.randrange(0, r.region // PAGE_2M)
            k = rng.choice((1, 1, 2, 3, 8))
            first = rng.randrange(0, per - k + 1)
            out.append((huge * PAGE_2M + first * s, k * s))
        return out


class Pageout(Madvise):
    name = "pageout"
    doc = "madvise(MADV_PAGEOUT) (reclaim now; without swap anonymous pages stay)"
    advice = hostmem.MADV_PAGEOUT
    bumps_generation = True


class Cold(Madvise):
    name = "cold"
    doc = "madvise(MADV_COLD) (deactivate)"
    advice = hostmem.MADV_COLD


class Punch(Disruptor):
    name = "punch"
    doc = "fallocate(PUNCH_HOLE|KEEP_SIZE) (anon-shared: madvise(MADV_REMOVE)), then rewrite"

    @classmethod
    def unsupported(cls, kind, features, kind_page, race):
        if Feature.FD not in features and kind != "anon-shared":
            return f"{kind} has no file to punch a hole in (its release is MADV_DONTNEED: the dontneed disruptor)"
        return None

    def prepare(self) -> None:
        super().prepare()
        b = self.race.backing
        self.fd = b.fd
        self.addr = b.addr

    def step(self, off: int, length: int) -> None:
        self.begin(off, length)
        if self.fd >= 0:
            if lib.fallocate(self.fd, PUNCH, off, length):
                raise _oserror(f"fallocate(fd={self.fd}, PUNCH_HOLE|KEEP_SIZE, {off:#x}, {length:#x})")
        elif lib.madvise(ffi.cast("void *", self.addr + off), length, hostmem.MADV_REMOVE):
            raise _oserror(f"madvise({self.addr + off:#x}, {length:#x}, MADV_REMOVE)")
        self.end(off, length)

    def preflight(self) -> None:
        if self.race.kind_page == PAGE_1G:
            return  # each punch of a 1 GiB page costs a 1 GiB refault (~2 s here): trust the first op
        super().preflight()

    def release_whole(self) -> str | None:
        b = self.race.backing
        if self.fd >= 0:
            hostmem.punch_hole(self.fd, 0, self.race.region)
            return "fallocate(PUNCH_HOLE) of the whole region"
        hostmem.madvise(b.addr, self.race.region, hostmem.MADV_REMOVE)
        return "madvise(MADV_REMOVE) of the whole region"


class Mprotect(Disruptor):
    """Toggles a range PROT_READ and back. Content never changes (no seqlock: every guest read is
    judged, also under PROT_READ); the oracle is on guest writes, which must not land while the
    range is read-only: the vCPU words are snapshotted right after mprotect(PROT_READ) returns and
    compared just before PROT_READ|PROT_WRITE is restored."""

    name = "mprotect"
    doc = "mprotect toggling PROT_READ / PROT_READ|PROT_WRITE"
    bumps_generation = False
    # a range stays read-only for a seeded 0-1 ms: long enough for guest writes to meet it
    GAPS = (0.0, 0.0002, 0.0005, 0.001)

    @classmethod
    def unsupported(cls, kind, features, kind_page, race):
        from harness import backends
        if Feature.GUEST_MEMFD in features and not backends.current().gmem_from_userspace_addr:
            # guest_memfd-only slots are faulted from the guest_memfd, not through the host
            # mapping: its protection does not govern guest writes
            return "upstream KVM does not fault guest_memfd slots through the host mapping: mprotect " \
                   "on it does not govern guest writes"
        return None

    def prepare(self) -> None:
        super().prepare()
        r = self.race
        self.addr = r.backing.addr
        self.ro: tuple[int, int] | None = None
        self.snap: dict[int, list[int]] = {}
        self.toggles = 0

    def _columns(self, off: int, length: int) -> dict[int, list[int]]:
        r = self.race
        q = r.stride // 8
        p0, p1 = r.pages_of(off, length)
        return {v: r.wordsQ[p0 * q + 1 + v : p1 * q : q].tolist() for v in r.writers}

    def step(self, off: int, length: int) -> None:
        r = self.race
        if self.ro is None:
            self.sample_in_run()
            if lib.mprotect(ffi.cast("void *", self.addr + off), length, hostmem.PROT_READ):
                raise _oserror(f"mprotect({self.addr + off:#x}, {length:#x}, PROT_READ)")
            self.count_op(length)
            self.snap = self._columns(off, length)
            self.ro = (off, length)
            self.pause()
        else:
            off, length = self.ro
            now = self._columns(off, length)
            p0, _ = r.pages_of(off, length)
            r.landed.extend(P.landed_writes(self.snap, now, p0, (r.gpa_a, self.addr, r.stride)))
            self.sample_in_run()
            if lib.mprotect(ffi.cast("void *", self.addr + off), length, PROT_RW):
                raise _oserror(f"mprotect({self.addr + off:#x}, {length:#x}, PROT_READ|PROT_WRITE)")
            self.count_op(length)
            self.ro = None

    def preflight(self) -> None:
        off, n = self.sched[0]
        self.step(off, n)
        self.step(off, n)

    def finish(self) -> None:
        if self.ro is not None:
            self.step(*self.ro)


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
        r = self.race
        self.begin(0, r.region)
        r.vm.delete_memslot(r.SLOT)
        r.vm.add_memslot(r.gpa_now, r.region, slot=r.SLOT, backing=r.backing)
        self.end(0, r.region)
        self.pause()


class SlotMove(_WholeRegion):
    name = "slot-move"
    doc = "memslot move (KVM_MR_MOVE) between two GPAs; the guest follows ctrl->loc"
    uses_gpa_b = True

    @classmethod
    def unsupported(cls, kind, features, kind_page, race):
        if Feature.GUEST_MEMFD in features:
            return "KVM refuses to move a guest_memfd memslot (EINVAL): only delete is allowed"
        return None

    def step(self, off: int, length: int) -> None:
        r = self.race
        self.begin(0, r.region)
        new = r.loc ^ 1
        r.vm.move_memslot(r.SLOT, r.gpa_of_loc(new))
        r.set_loc(new)
        self.end(0, r.region)
        self.pause()

    def finish(self) -> None:
        if self.race.loc:
            self.step(0, self.race.region)


class Prefault(Disruptor):
    """KVM_PRE_FAULT_MEMORY on ranges of the region from a vCPU that never runs (vCPU ioctls
    serialize on the vCPU mutex, so a running vCPU's fd would wait for its KVM_RUN to end)."""

    name = "prefault"
    doc = "KVM_PRE_FAULT_MEMORY on the same range (where KVM offers it)"
    bumps_generation = False

    @classmethod
    def unsupported(cls, kind, features, kind_page, race):
        have = race.vm.check_extension(Cap.PRE_FAULT_MEMORY)
        if not have:
            return "KVM_CAP_PRE_FAULT_MEMORY is 0 on this kernel (KVM_PRE_FAULT_MEMORY not offered)"
        return None

    def prepare(self) -> None:
        super().prepare()
        self.vcpu = self.race.spare_vcpu()
        self.arg = ffi.new("struct kvm_pre_fault_memory *")
        self.eagain = 0

    def step(self, off: int, length: int) -> None:
        r = self.race
        a = self.arg
        a.gpa = r.gpa_now + off
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

DISRUPTORS: dict[str, type[Disruptor]] = {
    d.name: d for d in (Remap, Madvise, PartialThp, Pageout, Cold, Punch, Mprotect, SlotReadd, SlotMove,
                        Prefault)
}

# (disruptor, kind) pairs whose ops give memory back to the kernel, so the memory-released oracle
# applies after the race (release_whole() returns None elsewhere).
__all__ = ["DISRUPTORS", "PAGE_4K", "Disruptor"]
