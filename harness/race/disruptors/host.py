"""Disruptors that change the host side of the region: its mapping (munmap + mmap, mprotect),
its pages (madvise) or the file behind it (fallocate punch)."""

from __future__ import annotations

import errno
import random
from typing import TYPE_CHECKING, Any

from harness.kvm._cffi import ffi, lib
from harness.memory import PAGE_1G, PAGE_2M, Feature, hostmem
from harness.race import _cfast
from harness.race import protocol as P
from harness.race.disruptors.base import SCHEDULE_LEN, Disruptor, oserror
from harness.race.region import GPA_A

if TYPE_CHECKING:
    from harness.kvm.vm import Vm

MAP_FIXED_NOREPLACE = 0x100000  # refuse, instead of clobbering, whatever another thread mapped
PROT_RW = hostmem.PROT_READ | hostmem.PROT_WRITE
PUNCH = hostmem.FALLOC_FL_PUNCH_HOLE | hostmem.FALLOC_FL_KEEP_SIZE


class Remap(Disruptor):
    name = "remap"
    doc = "munmap + mmap(MAP_FIXED_NOREPLACE) of the hva range, fresh content"
    alt_half = True

    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        if kind_page == PAGE_1G:
            return "a 1 GiB page per remap is too slow for a race (each op refaults the whole page)"
        return None

    def prepare(self) -> None:
        super().prepare()
        b = self.ctx.backing
        size = self.mem.size
        self.addr = b.addr
        self.fd = b.fd
        self.anon = not b.supports(Feature.FD)
        self.gmem = b.supports(Feature.GUEST_MEMFD)
        # each new anonymous mapping gets its kind's page size back: MADV_HUGEPAGE for anon-thp,
        # MADV_NOHUGEPAGE for the 4 KiB kinds (THP "always" kernels would give them THPs)
        self.thp_advice = (hostmem.MADV_HUGEPAGE if b.supports(Feature.HUGE) else hostmem.MADV_NOHUGEPAGE) \
            if self.anon else 0
        self.thp = bool(self.thp_advice)
        m = b.mapping
        self.flags = (m.flags if m is not None else hostmem.MAP_SHARED) | MAP_FIXED_NOREPLACE
        self.base_off = m.offset if m is not None else 0
        # fd kinds flip each unit between the two halves of a double-size file: fresh pages, old
        # data, as a VMM mapping other memory at the same hva. guest_memfd maps its own offset
        # again (upstream faults gmem slots from the bound offset, not from the hva).
        self.flip = not self.anon and not self.gmem and b.length >= 2 * size
        self.half = bytearray(size // self.unit())

    def step(self, off: int, length: int) -> None:
        a = self.addr + off
        fo = self.base_off + off
        if self.flip:
            u = self.unit()
            h = self.half[off // u] ^ 1
            self.half[off // u : (off + length) // u] = bytes([h]) * (length // u)
            fo += h * self.mem.size
        self.begin(off, length)
        if lib.munmap(ffi.cast("void *", a), length):
            raise oserror(f"munmap({a:#x}, {length:#x})")
        p = lib.mmap(ffi.cast("void *", a), length, PROT_RW, self.flags, self.fd, fo)
        if int(ffi.cast("uintptr_t", p)) != a:
            err = oserror(f"mmap({a:#x}, {length:#x}, MAP_FIXED_NOREPLACE, fd={self.fd}, off={fo:#x})")
            if err.errno == errno.EEXIST:
                err = OSError(errno.EEXIST, f"{err}: another thread mapped into the hole between munmap "
                              "and mmap; the region is left unmapped there (harness, not kernel)")
            raise err
        if self.thp:
            lib.madvise(ffi.cast("void *", a), length, self.thp_advice)
        self.end(off, length)

    def fast_op(self) -> Any:
        d = _cfast.ffi.new("struct kh_disrupt *")
        d.op = _cfast.lib.KH_OP_REMAP
        d.fd, d.addr, d.prot, d.flags, d.base_off = self.fd, self.addr, PROT_RW, self.flags, self.base_off
        d.flip, d.unit = self.flip, self.unit()
        self._half_c = _cfast.ffi.from_buffer(self.half)  # the same bytes step() flips
        d.half = self._half_c
        d.thp, d.thp_advice = self.thp, self.thp_advice
        return d

    def fast_error(self, d: Any) -> OSError:
        a, length, fo = d.fail_a, d.fail_b, d.fail_c
        if d.fail == _cfast.lib.KH_FAIL_MUNMAP:
            return oserror(f"munmap({a:#x}, {length:#x})", d.err)
        err = oserror(f"mmap({a:#x}, {length:#x}, MAP_FIXED_NOREPLACE, fd={self.fd}, off={fo:#x})", d.err)
        if err.errno == errno.EEXIST:
            err = OSError(errno.EEXIST, f"{err}: another thread mapped into the hole between munmap "
                          "and mmap; the region is left unmapped there (harness, not kernel)")
        return err


class Madvise(Disruptor):
    name = "dontneed"
    doc = "madvise(MADV_DONTNEED)"
    advice = hostmem.MADV_DONTNEED

    def prepare(self) -> None:
        super().prepare()
        self.addr = self.ctx.backing.addr

    def step(self, off: int, length: int) -> None:
        self.begin(off, length)
        if lib.madvise(ffi.cast("void *", self.addr + off), length, self.advice):
            raise oserror(f"madvise({self.addr + off:#x}, {length:#x}, {self.advice})")
        self.end(off, length)

    def fast_op(self) -> Any:
        d = _cfast.ffi.new("struct kh_disrupt *")
        d.op, d.addr, d.advice = _cfast.lib.KH_OP_MADVISE, self.addr, self.advice
        return d

    def fast_error(self, d: Any) -> OSError:
        return oserror(f"madvise({d.fail_a:#x}, {d.fail_b:#x}, {self.advice})", d.err)

    def release_whole(self) -> str | None:
        # DONTNEED frees private anonymous memory only; shared kinds keep their pages in the object
        b = self.ctx.backing
        if self.advice != hostmem.MADV_DONTNEED or b.supports(Feature.SHARED) or b.supports(Feature.FD):
            return None
        hostmem.madvise(b.addr, self.mem.size, hostmem.MADV_DONTNEED)
        return "madvise(MADV_DONTNEED) of the whole region"


class PartialThp(Madvise):
    name = "partial-thp"
    doc = "madvise(MADV_DONTNEED) of a few 4 KiB pages inside a THP (splits the huge mapping)"

    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        if kind != "anon-thp":
            return "partial-THP DONTNEED needs the anon-thp backing"
        return None

    def schedule(self, rng: random.Random) -> list[tuple[int, int]]:
        s = self.mem.stride
        per = PAGE_2M // s
        out = []
        for _ in range(SCHEDULE_LEN):
            huge = rng.randrange(0, self.mem.size // PAGE_2M)
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
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        if Feature.FD not in features and kind != "anon-shared":
            return f"{kind} has no file to punch a hole in (its release is MADV_DONTNEED: the dontneed disruptor)"
        if Feature.PRIVATE in features:
            return "the private side of convertible memory is punched by punch-private (pages are shared at rest)"
        return None

    def prepare(self) -> None:
        super().prepare()
        b = self.ctx.backing
        self.fd = b.fd
        self.addr = b.addr

    def step(self, off: int, length: int) -> None:
        self.begin(off, length)
        if self.fd >= 0:
            if lib.fallocate(self.fd, PUNCH, off, length):
                raise oserror(f"fallocate(fd={self.fd}, PUNCH_HOLE|KEEP_SIZE, {off:#x}, {length:#x})")
        elif lib.madvise(ffi.cast("void *", self.addr + off), length, hostmem.MADV_REMOVE):
            raise oserror(f"madvise({self.addr + off:#x}, {length:#x}, MADV_REMOVE)")
        self.end(off, length)

    def fast_op(self) -> Any:
        d = _cfast.ffi.new("struct kh_disrupt *")
        d.addr, d.fd = self.addr, self.fd
        if self.fd >= 0:
            d.op, d.advice = _cfast.lib.KH_OP_FALLOCATE, PUNCH
        else:
            d.op, d.advice = _cfast.lib.KH_OP_MADVISE, hostmem.MADV_REMOVE
        return d

    def fast_error(self, d: Any) -> OSError:
        if d.fail == _cfast.lib.KH_FAIL_FALLOCATE:
            return oserror(f"fallocate(fd={self.fd}, PUNCH_HOLE|KEEP_SIZE, {d.fail_a:#x}, {d.fail_b:#x})", d.err)
        return oserror(f"madvise({d.fail_a:#x}, {d.fail_b:#x}, MADV_REMOVE)", d.err)

    def preflight(self) -> None:
        if self.ctx.kind_page == PAGE_1G:
            return  # each punch of a 1 GiB page refaults the whole page: too slow to spend here
        super().preflight()

    def release_whole(self) -> str | None:
        b = self.ctx.backing
        if self.fd >= 0:
            hostmem.punch_hole(self.fd, 0, self.mem.size)
            return "fallocate(PUNCH_HOLE) of the whole region"
        hostmem.madvise(b.addr, self.mem.size, hostmem.MADV_REMOVE)
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
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        from harness import backends
        if Feature.GUEST_MEMFD in features and not backends.current().gmem_from_userspace_addr:
            # guest_memfd-only slots are faulted from the guest_memfd, not through the host
            # mapping: its protection does not govern guest writes
            return "upstream KVM does not fault guest_memfd slots through the host mapping: mprotect " \
                   "on it does not govern guest writes"
        return None

    def prepare(self) -> None:
        super().prepare()
        self.addr = self.ctx.backing.addr
        self.ro: tuple[int, int] | None = None
        self.snap: dict[int, list[int]] = {}
        self.toggles = 0

    def _columns(self, off: int, length: int) -> dict[int, list[int]]:
        m = self.mem
        q = m.stride // 8
        p0, p1 = m.pages_of(off, length)
        return {v: m.words[p0 * q + 1 + v : p1 * q : q].tolist() for v in m.writers}

    def step(self, off: int, length: int) -> None:
        if self.ro is None:
            self.sample_in_run()
            if lib.mprotect(ffi.cast("void *", self.addr + off), length, hostmem.PROT_READ):
                raise oserror(f"mprotect({self.addr + off:#x}, {length:#x}, PROT_READ)")
            self.count_op(length)
            self.snap = self._columns(off, length)
            self.ro = (off, length)
            self.pause()
        else:
            off, length = self.ro
            now = self._columns(off, length)
            m = self.mem
            p0, _ = m.pages_of(off, length)
            self.ctx.landed.extend(P.landed_writes(self.snap, now, p0, (GPA_A, self.addr, m.stride)))
            self.sample_in_run()
            if lib.mprotect(ffi.cast("void *", self.addr + off), length, PROT_RW):
                raise oserror(f"mprotect({self.addr + off:#x}, {length:#x}, PROT_READ|PROT_WRITE)")
            self.count_op(length)
            self.ro = None

    def preflight(self) -> None:
        off, n = self.sched[0]
        self.step(off, n)
        self.step(off, n)

    fast_pauses = True  # the read-only half of a toggle sleeps its seeded gap

    def fast_op(self) -> Any:
        m = self.mem
        d = _cfast.ffi.new("struct kh_disrupt *")
        d.op, d.addr = _cfast.lib.KH_OP_MPROTECT, self.addr
        nw = len(m.writers)
        self._writers_c = _cfast.ffi.new("uint32_t[]", list(m.writers) or [0])
        self._snap_c = _cfast.ffi.new("uint64_t[]", max(1, nw * m.npages))
        cap = max(1, nw * m.npages)
        self._landed_c = _cfast.ffi.new("uint64_t[]", 4 * cap)
        d.writers, d.nwriters, d.snap, d.landed, d.landed_cap = self._writers_c, nw, self._snap_c, self._landed_c, cap
        if self.ro is not None:  # a toggle left half-done by step(): the C loop finishes it
            off, length = self.ro
            for k, v in enumerate(m.writers):
                for i, word in enumerate(self.snap[v]):
                    d.snap[k * m.npages + i] = word
            d.ro, d.ro_off, d.ro_len = 1, off, length
        return d

    def fast_after(self, d: Any) -> None:
        """Landed writes the C loop found go to the ro-write oracle; a range it left read-only
        becomes step()'s (finish() restores it)."""
        m = self.mem
        s = m.stride
        for k in range(d.nlanded):
            v, p, before, after = (int(d.landed[4 * k + j]) for j in range(4))
            self.ctx.landed.append(P.LandedWrite(v, p, GPA_A + p * s + 8 * (1 + v), self.addr + p * s + 8 * (1 + v),
                                                 before, after))
        d.nlanded = 0
        if d.ro:
            off, length = int(d.ro_off), int(d.ro_len)
            p0, p1 = m.pages_of(off, length)
            self.ro = (off, length)
            self.snap = {v: [int(d.snap[k * m.npages + i]) for i in range(p1 - p0)] for k, v in enumerate(m.writers)}
        else:
            self.ro = None

    def fast_error(self, d: Any) -> OSError:
        prot = "PROT_READ" if d.fail == _cfast.lib.KH_FAIL_MPROTECT_RO else "PROT_READ|PROT_WRITE"
        return oserror(f"mprotect({d.fail_a:#x}, {d.fail_b:#x}, {prot})", d.err)

    def finish(self) -> None:
        if self.ro is not None:
            self.step(*self.ro)
