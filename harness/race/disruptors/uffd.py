"""Faults held open on purpose (harness/race/uffd.py says why): userfaultfd stops a vCPU's fault
inside KVM's get_user_pages while the host invalidates the range under it, on every operation.

`uffd` (UFFDIO_REGISTER_MODE_MISSING over the whole region), one op on [off, off+length):

    begin()                         the range's pages odd in the seqlock
    release the range               anon: MADV_DONTNEED; shmem/hugetlb files: fallocate(PUNCH_HOLE);
                                    anon-shared: MADV_REMOVE. The pages are missing now
    wait for the fault              a vCPU touching the range faults; KVM's hva_to_pfn -> GUP ->
                                    handle_userfault() blocks and the message names the page and the
                                    vCPU thread (UFFD_FEATURE_THREAD_ID): the fault is held
    invalidate while held           MADV_DONTNEED of the range again, or an mprotect(PROT_READ) /
                                    PROT_READ|PROT_WRITE toggle of it: invalidate_range_start/end,
                                    mmu_invalidate_seq moves under the held fault; then a seeded hold
    let it go                       UFFDIO_COPY of the new generation's page contents (wakes), or
                                    UFFDIO_ZEROPAGE (the publish below then writes the tags: a COW off
                                    the zero page on anon), or UFFDIO_COPY(DONTWAKE) + another
                                    invalidation + UFFDIO_WAKE, or (files) pwrite() of the new contents
                                    + UFFDIO_WAKE. The fault retries; KVM must drop its stale pfn
    end()                           the new generation's tags published

`uffd-wp` (UFFDIO_REGISTER_MODE_WP, where the kernel has it for the backing): the range is
write-protected, a writer vCPU's write fault (GUP with FOLL_WRITE) is held, the host clears the
protection without waking it, writes the new generation, invalidates, then UFFDIO_WAKE.

An op whose range no vCPU touches within HOLD_WAIT is resolved all the same (counted as unheld).
Every op leaves its range populated with the published generation; the userfaultfd is closed at the
end of the disruptor's thread and by Race.close() (closing it wakes every fault still held: nothing
can stay held past the race).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from array import array
from typing import TYPE_CHECKING, ClassVar

from harness.kvm._cffi import ffi, lib
from harness.memory import PAGE_1G, Feature, hostmem
from harness.memory import uffd as U
from harness.memory.backings import FileBacking
from harness.race import protocol as P
from harness.race.disruptors.base import SCHEDULE_LEN, Disruptor, oserror
from harness.race.disruptors.host import PROT_RW, PUNCH
from harness.race.uffd import ORACLE, HoldStats, verdict

if TYPE_CHECKING:
    from harness.kvm.vm import Vm
    from harness.race.report import RaceReport

HOLD_WAIT = 0.5  # seconds an op waits for a vCPU to fault into its range (a sweep under TCG: ~0.1 s)
STACK_SAMPLES = 5000  # held faults whose thread's kernel stack is read (while held), per race


def userfaultfd_reason(kind: str, features: Feature, kind_page: int, need: int) -> str | None:
    """Why userfaultfd cannot hold faults on this backing here (None: it can)."""
    if Feature.GUEST_MEMFD in features or Feature.PRIVATE in features:
        return "userfaultfd does not register guest_memfd mappings (KVM faults them from the guest_memfd)"
    from harness import memory
    if issubclass(memory.kind(kind).cls, FileBacking):
        return "userfaultfd registers anonymous, shmem and hugetlbfs memory only, not a disk file's mapping"
    if kind_page == PAGE_1G:
        return "a 1 GiB page per operation (released, copied or write-protected whole) is too slow for a race"
    try:
        have = U.Userfaultfd.available()
    except OSError as e:
        return f"no userfaultfd here: {e}"
    missing = need & ~have
    if missing:
        return f"this kernel's userfaultfd lacks UFFD_FEATURE_{', UFFD_FEATURE_'.join(U.feature_names(missing))}"
    return None


class _UffdBase(Disruptor):
    """What both modes share: the fd, the message wait, the evidence per held fault, the report."""

    REGISTER: ClassVar[int] = U.REGISTER_MISSING
    MODE: ClassVar[str] = "missing"
    # a held fault stays held this much longer after the invalidation (seeded per op)
    GAPS = (0.0, 0.0, 0.00005, 0.0002, 0.001)

    @classmethod
    def kind_features(cls, features: Feature) -> int:
        """The UFFD_FEATURE_* this backing needs for the mode."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        return userfaultfd_reason(kind, features, kind_page, cls.kind_features(features))

    def unit(self) -> int:
        """Whole tag strides: an op waits for a vCPU to fault into its range, and the vCPUs touch only
        the tags. With 4 KiB pages under 2 MiB guest pages (a tag every 8 KiB) one op in six was a page
        no vCPU reads: it waited out HOLD_WAIT unheld, and two such ops used up a 1 s race (a `uffd`
        oracle failure on debian:6.12, seed 1795870986)."""
        return max(self.ctx.kind_page, self.mem.stride)

    def prepare(self) -> None:
        super().prepare()
        b = self.ctx.backing
        self.addr = b.addr
        self.size = self.mem.size
        self.fd = b.fd
        self.fd_off = b.mapping.offset if b.mapping is not None else 0
        self.hugetlb = b.supports(Feature.HUGETLB)
        self.uffd: U.Userfaultfd | None = None
        self.range_ioctls = 0
        self.stats = HoldStats(mode=self.MODE)
        self._lock = threading.Lock()  # an op in progress; close() waits for it
        self._tids: dict[int, int] = {}  # native tid -> racing vCPU index
        self._me = 0
        # the source of UFFDIO_COPY / pwrite: the region's layout, a tag every stride, zeros elsewhere
        self.src = ctypes.create_string_buffer(self.size)
        self.src_addr = ctypes.addressof(self.src)
        self.src_words = memoryview(self.src).cast("B").cast("Q")
        self.qstride = self.mem.stride // 8

    def _open(self) -> None:
        """The fd and the registration (in preflight: a refusal is a skip with the kernel's answer)."""
        need = self.kind_features(self.ctx.backing.features)
        self.uffd = U.Userfaultfd.open(U.FEATURE_THREAD_ID | need, need)
        self.stats.features = "|".join(U.feature_names(self.uffd.features))
        self.range_ioctls = self.uffd.register(self.addr, self.size, self.REGISTER)

    def has_ioctl(self, name: str) -> bool:
        return bool(self.range_ioctls & U.ioctl_bit(name))

    # ---- the contents of a generation ---------------------------------------------------------------
    def content_generation(self) -> int:
        """The generation the held fault is let go with: the one end() is about to publish."""
        return self.mem.gen + 1

    def fill_src(self, off: int, length: int) -> None:
        """src[off, off+length): the tag of content_generation() every stride, zeros elsewhere (only
        the tag words are ever written: the rest stays as create_string_buffer made it)."""
        q = self.qstride
        p0, p1 = self.mem.pages_of(off, length)
        if p1 > p0:
            tb = P.tag_base(self.content_generation())
            self.src_words[p0 * q : p1 * q : q] = array("Q", range(tb + p0, tb + p1))

    # ---- the held fault -----------------------------------------------------------------------------
    def _vcpu_of(self, tid: int) -> int | None:
        """The racing vCPU whose thread is `tid` (inside KVM_RUN now), or None."""
        if tid not in self._tids:
            idents = {v.run_thread: i for i, v in enumerate(self.ctx.vcpus) if v.run_thread}
            for t in threading.enumerate():
                if t.ident in idents and t.native_id:
                    self._tids[t.native_id] = idents[t.ident]
        i = self._tids.get(tid)
        return i if i is not None and self.ctx.vcpus[i].in_run else None

    def _sample_stack(self, tid: int) -> None:
        try:
            with open(f"/proc/self/task/{tid}/stack") as f:
                text = f.read()
        except OSError as e:
            text = f"(unreadable: {e.strerror})"
        self.stats.add_stack(text)

    def _take(self, faults: list[U.Fault | U.Event], a: int, length: int, held: list[U.Fault]) -> None:
        """Sort messages: faults in [a, a+length) are held (evidence recorded), others are stray."""
        s = self.stats
        for f in faults:
            if not isinstance(f, U.Fault):
                s.stray.append(f"event {f.event:#x} (no event feature was asked for)")
                continue
            if not a <= f.address < a + length:
                s.stray.append(f"{f.describe()}, outside the op's range [{a:#x}, {a + length:#x})")
                self.uffd_wake(f.address & ~(self.ctx.kind_page - 1), self.ctx.kind_page)
                continue
            held.append(f)
            s.held += 1
            if f.write:
                s.write_faults += 1
            v = self._vcpu_of(f.ptid)
            if v is None:
                s.foreign.append(f"{f.describe()}: thread {f.ptid} is not a racing vCPU in KVM_RUN"
                                 + (" (it is the disruptor itself)" if f.ptid == self._me else ""))
                continue
            s.vcpu_faults += 1
            if s.held <= STACK_SAMPLES:
                self._sample_stack(f.ptid)

    def await_fault(self, a: int, length: int, t0: int) -> list[U.Fault]:
        """Wait (up to HOLD_WAIT) for a vCPU's fault in [a, a+length); the faults held, with the
        others that came with them."""
        assert self.uffd is not None
        held: list[U.Fault] = []
        end = t0 + int(HOLD_WAIT * 1e9)
        while not held:
            left = end - time.monotonic_ns()
            if left <= 0:
                break
            self._take(self.uffd.read(min(left / 1e9, 0.05)), a, length, held)
        if held:
            self.stats.wait_ns_total += time.monotonic_ns() - t0
        return held

    def drain(self, a: int, length: int, held: list[U.Fault]) -> None:
        """Messages queued now (faults that came in while the first one was held)."""
        assert self.uffd is not None
        self._take(self.uffd.read(0), a, length, held)

    def copy(self, off: int, length: int, *, wake: bool = True) -> None:
        """UFFDIO_COPY of src[off, off+length) into the region; one call per backing page where the
        range spans several VMAs (ENOENT: an mprotect toggle split a hugetlb VMA, which stays split)."""
        assert self.uffd is not None
        a = self.addr + off
        try:
            self.uffd.copy(a, self.src_addr + off, length, wake=wake)
            self.stats.copies += 1
        except U.UffdError as e:
            u = self.ctx.kind_page
            if e.errno != errno.ENOENT or length <= u:
                raise
            for k in range(0, length, u):
                self.uffd.copy(a + k, self.src_addr + off + k, u, wake=wake)
                self.stats.copies += 1

    def uffd_wake(self, a: int, length: int) -> None:
        assert self.uffd is not None
        self.uffd.wake(a, length)
        self.stats.wakes += 1

    # ---- invalidations (each fires the mmu_notifier on the range) -----------------------------------
    def zap(self, a: int, length: int) -> None:
        if lib.madvise(ffi.cast("void *", a), length, hostmem.MADV_DONTNEED):
            raise oserror(f"madvise({a:#x}, {length:#x}, MADV_DONTNEED)")
        self.stats.bump(self.stats.invalidations, "dontneed")

    def toggle(self, a: int, length: int) -> None:
        if lib.mprotect(ffi.cast("void *", a), length, hostmem.PROT_READ):
            raise oserror(f"mprotect({a:#x}, {length:#x}, PROT_READ)")
        if lib.mprotect(ffi.cast("void *", a), length, PROT_RW):
            raise oserror(f"mprotect({a:#x}, {length:#x}, PROT_READ|PROT_WRITE)")
        self.stats.bump(self.stats.invalidations, "mprotect")

    # ---- the op -------------------------------------------------------------------------------------
    def step(self, off: int, length: int) -> None:
        with self._lock:
            if self.uffd is None:
                raise RuntimeError("the userfaultfd is closed")
            self.op(off, length, wait=True)

    def op(self, off: int, length: int, *, wait: bool) -> None:
        raise NotImplementedError

    def held_for(self, held: list[U.Fault], t_held: int) -> None:
        s = self.stats
        if held:
            dt = time.monotonic_ns() - t_held
            s.held_ops += 1
            s.held_ns_total += dt * len(held)
            s.held_ns_max = max(s.held_ns_max, dt)
        else:
            s.unheld_ops += 1

    def preflight(self) -> None:
        self._me = threading.get_native_id()
        self._open()
        self.preflight_ops()
        self.stats.reset()

    def preflight_ops(self) -> None:
        """Every variant the schedule uses, once, with no vCPU running (the kernel refuses one: skip)."""
        off, n = self.sched[0]
        self.op(off, n, wait=False)

    def run(self, stop: threading.Event, limit: int | None = None, cpu: int | None = None) -> None:
        self._me = threading.get_native_id()
        super().run(stop, limit, cpu)

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the userfaultfd: anything still queued counts as left held; closing the fd wakes
        every fault still waiting (it retries without the registration). Waits for an op in
        progress (bounded by HOLD_WAIT)."""
        if getattr(self, "uffd", None) is None:
            return  # never opened (or already let go)
        got = self._lock.acquire(timeout=HOLD_WAIT + 5.0)
        try:
            u = self.uffd
            if u is None:
                return
            self.uffd = None
            try:
                left = [f for f in u.read(0) if isinstance(f, U.Fault)]
                self.stats.left_held += len(left)
                u.unregister(self.addr, self.size)
            finally:
                u.close()
        finally:
            if got:
                self._lock.release()

    # ---- the report ---------------------------------------------------------------------------------
    def report_into(self, rep: RaceReport) -> None:
        """The mode's counts (JUnit properties, summary lines) and the `uffd` oracle's verdict."""
        s = self.stats
        s.ops = self.ops
        rep.extra.update(s.properties())
        rep.extra_lines += s.summary()
        rep.extra_verdicts[ORACLE] = verdict(s, judged=not rep.stalls and not rep.errors)


class UffdMissing(_UffdBase):
    name = "uffd"
    doc = ("userfaultfd MISSING: release a range, hold the vCPU's fault in GUP, invalidate it while held, "
           "then UFFDIO_COPY/ZEROPAGE/WAKE the new generation")
    INVALIDATIONS = ("dontneed", "mprotect")

    @classmethod
    def kind_features(cls, features: Feature) -> int:
        if Feature.HUGETLB in features:
            return U.FEATURE_MISSING_HUGETLBFS
        if Feature.SHARED in features:
            return U.FEATURE_MISSING_SHMEM
        return 0

    def prepare(self) -> None:
        super().prepare()
        b = self.ctx.backing
        self.anon_private = not b.supports(Feature.SHARED) and not b.supports(Feature.FD)
        self.plan: list[tuple[str, str]] = []  # (invalidation, resolution) per op: drawn in preflight

    def resolution_kinds(self) -> tuple[str, ...]:
        """How held faults may be let go on this range (after UFFDIO_REGISTER said what it offers)."""
        out = ["copy", "copy", "copy-dontwake"]  # COPY of the new contents is the common case
        if self.has_ioctl("UFFDIO_ZEROPAGE"):  # not on hugetlb ranges
            out.append("zeropage")
        if self.fd >= 0 and not self.hugetlb:
            out.append("write-wake")  # pwrite into the file (hugetlbfs has no write())
        return tuple(out)

    def release(self, off: int, length: int) -> None:
        a = self.addr + off
        if self.fd >= 0:
            if lib.fallocate(self.fd, PUNCH, self.fd_off + off, length):
                raise oserror(f"fallocate(fd={self.fd}, PUNCH_HOLE|KEEP_SIZE, {self.fd_off + off:#x}, {length:#x})")
        elif self.anon_private:
            if lib.madvise(ffi.cast("void *", a), length, hostmem.MADV_DONTNEED):
                raise oserror(f"madvise({a:#x}, {length:#x}, MADV_DONTNEED)")
        elif lib.madvise(ffi.cast("void *", a), length, hostmem.MADV_REMOVE):
            raise oserror(f"madvise({a:#x}, {length:#x}, MADV_REMOVE)")

    def op(self, off: int, length: int, *, wait: bool, variant: tuple[str, str] | None = None) -> None:
        assert self.uffd is not None
        u = self.uffd
        s = self.stats
        inval, how = variant or self.plan[self.ops % SCHEDULE_LEN]
        a = self.addr + off
        self.begin(off, length)
        self.fill_src(off, length)
        t0 = time.monotonic_ns()
        self.release(off, length)
        held = self.await_fault(a, length, t0) if wait else []
        t_held = time.monotonic_ns()
        if held or not wait:
            (self.zap if inval == "dontneed" else self.toggle)(a, length)  # under the held fault
            s.invalidated += len(held)
            self.pause()
            self.drain(a, length, held)
        if how == "copy":
            self.copy(off, length)
        elif how == "copy-dontwake":
            self.copy(off, length, wake=False)
            self.toggle(a, length)  # the page is there, the fault still held: invalidate once more
            self.uffd_wake(a, length)
        elif how == "zeropage":
            u.zeropage(a, length)  # end() writes the tags: on anon a COW off the zero page
            s.zeropages += 1
        else:  # write-wake: the new contents through the file, then the held fault retries
            os.pwrite(self.fd, memoryview(self.src)[off : off + length], self.fd_off + off)
            s.host_writes += 1
            self.uffd_wake(a, length)
        if held:
            s.bump(s.resolutions, how, len(held))
        if wait:
            self.held_for(held, t_held)
        self.end(off, length)

    def preflight_ops(self) -> None:
        rng = self.ctx.rng(self.name + "/variants")
        kinds = self.resolution_kinds()
        self.plan = [(rng.choice(self.INVALIDATIONS), rng.choice(kinds)) for _ in range(SCHEDULE_LEN)]
        off, n = self.sched[0]
        for inval in self.INVALIDATIONS:
            for how in dict.fromkeys(kinds):
                self.op(off, n, wait=False, variant=(inval, how))


class UffdWp(_UffdBase):
    name = "uffd-wp"
    doc = ("userfaultfd WP: write-protect a range, hold a writer vCPU's write fault in GUP, unprotect without "
           "waking, write the new generation, invalidate, then UFFDIO_WAKE")
    REGISTER = U.REGISTER_WP
    MODE = "wp"

    @classmethod
    def kind_features(cls, features: Feature) -> int:
        need = U.FEATURE_PAGEFAULT_FLAG_WP
        if Feature.HUGETLB in features or Feature.SHARED in features:
            need |= U.FEATURE_WP_HUGETLBFS_SHMEM
        return need

    def op(self, off: int, length: int, *, wait: bool) -> None:
        assert self.uffd is not None
        u = self.uffd
        s = self.stats
        a = self.addr + off
        self.begin(off, length)
        t0 = time.monotonic_ns()
        u.writeprotect(a, length, True)
        held = self.await_fault(a, length, t0) if wait else []
        t_held = time.monotonic_ns()
        u.writeprotect(a, length, False, wake=False)  # the held write fault stays held
        s.unprotects += 1
        # the new generation's tags through the host mapping (writable again), then an invalidation
        p0, p1 = self.mem.pages_of(off, length)
        if p1 > p0:
            tb = P.tag_base(self.content_generation())
            self.mem.tags[p0:p1] = array("Q", range(tb + p0, tb + p1))
        s.host_writes += 1
        self.toggle(a, length)
        s.invalidated += len(held)
        self.pause()
        self.drain(a, length, held)
        self.uffd_wake(a, length)
        if held:
            s.bump(s.resolutions, "unprotect-write-wake", len(held))
        if wait:
            self.held_for(held, t_held)
        self.end(off, length)
