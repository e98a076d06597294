"""What every disruptor is: the context it may use of the race, the schedule of its ranges, the
seqlock brackets around its operation and the counters the overlap oracle reads."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from harness.kvm._cffi import ffi
from harness.memory import Feature
from harness.race import _cfast
from harness.race import protocol as P

if TYPE_CHECKING:
    from harness.kvm.vcpu import Vcpu
    from harness.kvm.vm import Vm
    from harness.lib.guestvm import GuestVm
    from harness.memory import Backing
    from harness.race.region import Region

SCHEDULE_LEN = 4096  # pre-drawn (offset, length) pairs, cycled: no RNG work in the hot loop


def oserror(what: str, e: int | None = None) -> OSError:
    """The OSError for the call that just failed (its errno: the cffi call's, or `e` from a C
    loop), naming the call."""
    if e is None:
        e = ffi.errno
    return OSError(e, f"{what}: {errno.errorcode.get(e, e)} ({os.strerror(e)})")


# The C loop returns to Python this often (stop flag, op count for the monitor): cheap next to the
# ops it runs in between, short next to the engine's 10 ms poll.
FAST_SLICE_NS = 10_000_000


def fast_enabled() -> bool:
    """The disruptors' C loops may be used (HARNESS_RACE_FAST=0: always the Python step() path)."""
    return os.environ.get("HARNESS_RACE_FAST", "1") != "0"


@dataclass(frozen=True)
class HostContext:
    """What a disruptor may use of the race it disrupts; the engine builds one per race."""

    mem: Region  # the layout and the protocol's writers (begin_change / end_change)
    backing: Backing
    vm: GuestVm
    kind_page: int  # the backing's page size: the host granularity of one operation
    vcpus: tuple[Vcpu, ...]  # the racing vCPUs (only whether one is inside KVM_RUN is read)
    rng_key: str  # RaceSpec.rng_key()
    spare_vcpu: Callable[[], Vcpu]  # a vCPU that never runs (vCPU ioctls that must not wait)
    landed: list[P.LandedWrite]  # evidence for the ro-write oracle (mprotect appends)

    def rng(self, what: str) -> random.Random:
        """A generator per purpose, from (seed, case label, purpose): reruns draw the same ops."""
        return random.Random(f"{self.rng_key}/{what}")

    def in_run(self) -> bool:
        """A vCPU is inside KVM_RUN now."""
        # a loop, not any(<genexpr>) (half the cost): this runs twice per host op
        for v in self.vcpus:  # noqa: SIM110
            if v.in_run:
                return True
        return False


class Disruptor:
    """Base: one host operation per step(); subclasses set the class attributes."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    bumps_generation: ClassVar[bool] = True  # the op may change what the guest reads: seqlock it
    alt_half: ClassVar[bool] = False  # wants a backing twice the region (fresh file pages to map)
    whole_region: ClassVar[bool] = False  # every op covers the whole region (memslot ops)
    uses_gpa_b: ClassVar[bool] = False  # needs the region mapped in the guest at a second GPA too

    def __init__(self, ctx: HostContext) -> None:
        self.ctx = ctx
        self.mem = ctx.mem
        self.ops = 0
        self.bytes = 0
        self.overlapped = 0  # ops that began and ended with a vCPU inside KVM_RUN
        self.error: BaseException | None = None
        self.sched: list[tuple[int, int]] = []
        self._held = False
        self._was_in_run = False
        self.t_start = self.t_end = 0.0
        self.fast = fast_enabled()  # False: step() in Python even where a C loop exists
        self.ran_fast = False  # the last run() went through the C loop
        self._fast_d: Any = None

    # ---- what it applies to ------------------------------------------------------------------------
    @classmethod
    def unsupported(cls, kind: str, features: Feature, kind_page: int, vm: Vm) -> str | None:
        """Why this disruptor makes no sense on this backing / kernel (None: it does)."""
        return None

    def unit(self) -> int:
        """Host granularity of one operation: the backing's page size."""
        return self.ctx.kind_page

    def schedule(self, rng: random.Random) -> list[tuple[int, int]]:
        """(offset, length) per op, drawn once from the case's seed."""
        size = self.mem.size
        if self.whole_region:
            return [(0, size)]
        u = self.unit()
        n = size // u
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
        self.mem.begin_change(off, length)
        self._held = True
        self._was_in_run = self.ctx.in_run()

    def end(self, off: int, length: int) -> None:
        """New content for [off, off+length), then publish it (seq even)."""
        if self._was_in_run and self.ctx.in_run():
            self.overlapped += 1
        self.mem.end_change(off, length)
        self._held = False
        self.ops += 1
        self.bytes += length

    def abort(self) -> None:
        """The op failed inside begin()/end(): leave its pages odd (never judged against a
        half-made generation) and let the others go on."""
        if self._held:
            self._held = False
            self.mem.cancel_change()

    def sample_in_run(self) -> None:
        self._was_in_run = self.ctx.in_run()

    def count_op(self, length: int) -> None:
        """An op outside the seqlock (content unchanged): count it and whether it overlapped."""
        if self._was_in_run and self.ctx.in_run():
            self.overlapped += 1
        self.ops += 1
        self.bytes += length

    # ---- lifetime ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event, limit: int | None = None, cpu: int | None = None) -> None:
        """The disruptor's thread: step() through the schedule, cycled, until `stop` (or `limit`
        ops); then finish(). An error ends it (kept in `error`) with the seqlock released."""
        sched = self.sched
        n = len(sched)
        i = 0
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # 0: this thread
        self.t_start = time.monotonic()
        try:
            d = self._fast_loop()
            if d is not None:
                self.ran_fast = True
                self._run_fast(d, stop, limit)
                return
            while not stop.is_set():
                if limit is not None and self.ops >= limit:
                    break
                off, length = sched[i]
                i = i + 1 if i + 1 < n else 0
                self.step(off, length)
        except BaseException as e:
            self.error = e
            self.abort()
        finally:
            self.t_end = time.monotonic()
            try:
                self.finish()
            except BaseException as e:
                self.error = self.error or e

    # ---- the C loop (harness.race._cfast) ------------------------------------------------------------
    def fast_op(self) -> Any:
        """A `struct kh_disrupt *` with this disruptor's op filled in (op, fd, advice, addr, ...),
        or None: no C loop for it (step() in Python). The base fills in the rest."""
        return None

    def _fast_loop(self) -> Any:
        """The C loop's state for run(), or None when step() must run in Python: no C op, disabled,
        or a subclass changed what an op does (step, begin, end, pause: a planted fault)."""
        if not self.fast:
            return None
        cls = type(self)
        owner = next((k for k in cls.__mro__ if "fast_op" in k.__dict__), Disruptor)
        if owner is Disruptor:
            return None
        if next(k for k in cls.__mro__ if "step" in k.__dict__) is not owner:
            return None  # step() overridden below the class that wrote the C op
        if cls.begin is not Disruptor.begin or cls.end is not Disruptor.end or cls.pause is not Disruptor.pause:
            return None
        d = self.fast_op()
        if d is None:
            return None
        keep = [d]  # everything the struct points to lives as long as the loop
        d.r = self.mem.c
        offs = _cfast.ffi.new("uint64_t[]", [o for o, _ in self.sched])
        lens = _cfast.ffi.new("uint64_t[]", [n for _, n in self.sched])
        d.sched_off, d.sched_len, d.nsched, d.idx = offs, lens, len(self.sched), 0
        keep += [offs, lens]
        if self.fast_pauses and any(self.gaps):
            gaps = _cfast.ffi.new("uint64_t[]", [round(g * 1e9) for g in self.gaps])
            d.gaps_ns, d.ngaps = gaps, len(self.gaps)
            keep.append(gaps)
        vcpus = self.ctx.vcpus
        flags = _cfast.ffi.new("uintptr_t[]", [int(ffi.cast("uintptr_t", v.in_run_flag)) for v in vcpus] or [0])
        d.in_run, d.nvcpus = flags, len(vcpus)
        keep += [flags, vcpus]  # the vCPUs too: their in_run flags live in them
        self._fast_keep = keep
        return d

    def _run_fast(self, d: Any, stop: threading.Event, limit: int | None) -> None:
        """run()'s loop in C, a slice at a time: the same ops, counters and publications as step(),
        the GIL released in between; an error comes back as step()'s OSError, the range left odd."""
        self._fast_d = d
        d.ops, d.bytes, d.overlapped = self.ops, self.bytes, self.overlapped
        run = _cfast.lib.kh_disrupt_run
        try:
            while not stop.is_set():
                todo = (1 << 63) if limit is None else limit - self.ops
                if todo <= 0:
                    break
                rc = run(d, todo, FAST_SLICE_NS)  # 1: mprotect's landed[] is full, drained below
                self.ops, self.bytes, self.overlapped = d.ops, d.bytes, d.overlapped
                self.fast_after(d)
                if rc < 0:
                    raise self.fast_error(d)
        finally:
            self.ops, self.bytes, self.overlapped = d.ops, d.bytes, d.overlapped
            self.fast_after(d)  # idempotent: also on an exception between slices
            self._fast_d = None
            self._fast_keep = None  # the vCPUs may be closed from now on

    def fast_after(self, d: Any) -> None:
        """After each slice of the C loop (and at its end): hand what it found back to Python."""

    def request_stop(self) -> None:
        """Stop a C loop after its current op (the engine calls it next to setting the stop event,
        which the loop only sees between slices)."""
        d = self._fast_d
        if d is not None:
            d.stop = 1

    def fast_error(self, d: Any) -> OSError:
        """The OSError step() would have raised for the call the C loop saw fail."""
        return OSError(d.err, f"C race loop: op {d.op} failed ({os.strerror(d.err)})")

    GAPS: ClassVar[tuple[float, ...]] = (0.0,)  # seeded pauses pause() draws from (seconds)
    fast_pauses: ClassVar[bool] = False  # step() ends with pause(): the C loop sleeps the same gaps

    def prepare(self) -> None:
        self.sched = self.schedule(self.ctx.rng(self.name))
        rng = self.ctx.rng(self.name + "/gaps")
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
        """Release the whole region the way this disruptor does (for the memory-released oracle,
        which applies where a disruptor's ops give memory back to the kernel); returns the
        method, or None when this disruptor releases nothing on this backing."""
        return None

    def releases(self) -> bool:
        """This disruptor overrides release_whole() (the released oracle may apply)."""
        return type(self).release_whole is not Disruptor.release_whole
