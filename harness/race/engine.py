"""The race engine: the threads and the monitor that run one race.

    race = Race(kvm, RaceSpec("shmem", ("punch",), vcpus=2, seconds=1, seed=7), make_backing)
    try:
        report = race.run()
    finally:
        race.close()
    assert not report.failures(), report.failure_message(report.failures(), rerun)

Threads: one per vCPU (KVM_RUN releases the GIL), one per disruptor (each syscall releases it),
the kvmclock setter when asked for, and the caller's thread, which watches progress and stops
everything. Every wait is bounded; the vCPUs are also bounded by the watchdog. Overlap is measured,
not assumed: per host op, whether a vCPU was inside KVM_RUN when it began and when it ended, and
per guest read, whether it saw the host's seqlock move (`influx`).

The engine hands the disruptors a HostContext (they never import it), runs the vCPUs through
vcpu.VcpuThread, shares everything host and guest see through region.Region, and stores the
end-of-race oracles' verdicts (oracles.py) in the RaceReport (report.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from harness import backends as backend
from harness import memory
from harness.health import case as case_health
from harness.kvm.caps import VmType
from harness.kvm.errors import HarnessError, KvmError
from harness.kvm.stats import delta as stats_delta
from harness.kvm.watchdog import WATCHDOG, kick_thread
from harness.lib.guestvm import GuestVm
from harness.memory import PAGE_2M, PAGE_4K, Feature
from harness.memory.private import private_memory_reason
from harness.race import clock
from harness.race import oracles as O
from harness.race import protocol as P
from harness.race.disruptors import DISRUPTORS, Disruptor, HostContext
from harness.race.plan import RaceSpec, RaceUnsupported
from harness.race.region import Region, geometry
from harness.race.report import RaceReport
from harness.race.vcpu import VcpuThread

if TYPE_CHECKING:
    from harness.kvm.system import Kvm
    from harness.kvm.vcpu import Vcpu
    from harness.kvm.vm import Vm
    from harness.memory import Backing

MakeBacking = Callable[[str, int, "Vm"], "Backing"]

POLL = 0.01  # seconds between the monitor's looks at the guests' sweep counters


class Race:
    """One race: a GuestVm running race_toucher on `vcpus` vCPUs over one memslot of a backing."""

    def __init__(self, kvm: Kvm, spec: RaceSpec, make_backing: MakeBacking) -> None:
        if not 1 <= spec.vcpus <= P.MAX_VCPUS:
            raise HarnessError(f"race: {spec.vcpus} vCPUs (1..{P.MAX_VCPUS})")
        unknown = [d for d in spec.disruptors if d not in DISRUPTORS]
        if unknown or not spec.disruptors:
            raise HarnessError(f"race: unknown disruptors {unknown} (known: {', '.join(DISRUPTORS)})")
        self.kvm = kvm
        self.spec = spec
        self.kind = spec.kind
        k = memory.kind(spec.kind)
        self.kind_page = k.page_size
        self.region, self.stride = geometry(spec.kind, spec.page)
        if spec.page not in (PAGE_4K, PAGE_2M):
            raise HarnessError(f"race: guest page size {spec.page:#x} (4 KiB or 2 MiB)")
        self._stop_disrupt = threading.Event()
        self.landed: list[P.LandedWrite] = []
        self.vm: GuestVm | None = None
        self.mem: Region | None = None
        self.backing: Any = None
        self._spare: Vcpu | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.report = RaceReport(spec, backend=backend.name(), region=self.region, stride=self.stride)
        try:
            self._setup(k, make_backing)
        except BaseException:
            self.close()
            raise

    # ---- set-up --------------------------------------------------------------------------------
    def _setup(self, k: memory.BackingKind, make_backing: MakeBacking) -> None:
        spec = self.spec
        vm_type = VmType.DEFAULT
        if Feature.PRIVATE in k.features:  # convertible memory lives in a SW-protected VM
            why = private_memory_reason(self.kvm)
            if why:
                raise RaceUnsupported(f"{spec.kind}: {why}")
            vm_type = VmType.SW_PROTECTED
        self.vm = vm = GuestVm(self.kvm, "race_toucher", "long64", nr_vcpus=spec.vcpus, vm_type=vm_type)
        classes = [DISRUPTORS[d] for d in spec.disruptors]
        for c in classes:
            why = c.unsupported(spec.kind, k.features, self.kind_page, vm)
            if why:
                raise RaceUnsupported(f"{c.name} on {spec.kind}: {why}")
        alt = any(c.alt_half for c in classes) and Feature.FD in k.features and \
            Feature.GUEST_MEMFD not in k.features
        self.backing = b = make_backing(spec.kind, self.region * (2 if alt else 1), vm)
        self.mem = mem = Region(vm, b, self.region, self.stride, page=spec.page, writers=self._writers(classes),
                                nvcpus=spec.vcpus, alias=any(c.uses_gpa_b for c in classes))
        for v in vm.vcpus:
            v.set_args(mem.ctrl_gpa)  # race_toucher's argument: its control page
        if spec.kvmclock:
            bad = [c.name for c in classes if c.name not in clock.CLOCK_DISRUPTORS]
            if bad:
                raise RaceUnsupported(f"the kvmclock oracle needs the first page mapped and writable; "
                                      f"{', '.join(bad)} can take it away")
            clock.enable(vm, mem)
        vcpus = tuple(vm.vcpus)  # the racing ones: a spare vCPU a disruptor makes below never runs
        ctx = HostContext(mem=mem, backing=b, vm=vm, kind_page=self.kind_page, vcpus=vcpus,
                          rng_key=spec.rng_key(), spare_vcpu=self.spare_vcpu, landed=self.landed)
        self.disruptors: list[Disruptor] = [c(ctx) for c in classes]
        for d in self.disruptors:
            d.prepare()
        for d in self.disruptors:
            try:
                d.preflight()
            except OSError as e:
                raise RaceUnsupported(f"{d.name} on {spec.kind}: the kernel refuses it: {e}") from e
        for d in self.disruptors:
            d.ops = d.bytes = d.overlapped = 0
        self.landed.clear()
        bound = spec.seconds + 4 * spec.progress_bound + 30
        self.guests = [VcpuThread(i, v, mem, self.report, bound=bound, cpu=spec.pin[1] if spec.pin else None)
                       for i, v in enumerate(vcpus)]
        self._vm_stats0 = self._read_stats()

    def _writers(self, classes: list[type[Disruptor]]) -> list[int]:
        if self.spec.writers is not None:
            return [v for v in range(self.spec.vcpus) if self.spec.writers >> v & 1]
        if any(c.name == "mprotect" for c in classes):
            return list(range(self.spec.vcpus))  # the read-only oracle needs writes from everyone
        return [v for v in range(self.spec.vcpus) if v % 2 == 0]  # writers and pure readers mixed

    def spare_vcpu(self) -> Vcpu:
        """A vCPU that never runs (for vCPU ioctls that must not wait on a running vCPU's mutex)."""
        if self._spare is None:
            assert self.vm is not None
            self._spare = self.vm.create_vcpu()
            self._spare.set_cpuid(self.kvm.supported_cpuid)
        return self._spare

    # what bench/race.py dumps for its C twin
    @property
    def ctrl_gpa(self) -> int:
        assert self.mem is not None
        return self.mem.ctrl_gpa

    @property
    def gentab_gpa(self) -> int:
        assert self.mem is not None
        return self.mem.gentab_gpa

    # ---- running -------------------------------------------------------------------------------
    def _sweeps(self) -> list[int]:
        assert self.mem is not None
        return self.mem.sweeps()

    def run(self) -> RaceReport:
        """Race for spec.seconds (or until the first disruptor made spec.max_ops ops); then a quiet
        sweep, stop, and the end-of-race oracles. Returns the report (failures() says what broke)."""
        assert self.vm is not None and self.mem is not None
        spec = self.spec
        rep = self.report
        # The case's own kernel-health window (or one of our own outside pytest): one verdict per case.
        health, own_health = case_health.for_case(spec.label or "race")
        setter = clock.ClockSetter(self.vm, self.mem, rep, spec.vcpus,
                                   lambda: any(g.done or g.error for g in self.guests),
                                   self._exit_counter() if spec.kvmclock else None)
        try:
            for g in self.guests:
                self._threads.append(g.thread)
                g.thread.start()
            # faults first: every vCPU completes a sweep before the host starts disrupting
            if self._wait_sweeps([1] * spec.vcpus, spec.progress_bound, "its first sweep (before any host op)"):
                t0 = time.monotonic()
                dthreads = []
                cpu = spec.pin[0] if spec.pin is not None else None
                for k, d in enumerate(self.disruptors):
                    limit = spec.max_ops if k == 0 else None  # the first one's ops end a bench run
                    th = threading.Thread(target=d.run, args=(self._stop_disrupt, limit, cpu), name=f"race-{d.name}",
                                          daemon=True)
                    dthreads.append(th)
                    self._threads.append(th)
                sw0 = self._sweeps()
                if spec.kvmclock:
                    th = threading.Thread(target=setter.main, args=(self._stop_disrupt,), name="race-kvmclock",
                                          daemon=True)
                    dthreads.append(th)
                    self._threads.append(th)
                for th in dthreads:
                    th.start()
                self._monitor(t0, sw0)
                rep.duration = time.monotonic() - t0
                rep.sweeps_in_race = sum(self._sweeps()) - sum(sw0)
                self._stop_disruptors(dthreads)
                # (a disruptor still stuck in the kernel holds the writers' lock the pvclock read takes)
                if spec.kvmclock and not self.report.stalls and not any(t.is_alive() for t in dthreads):
                    setter.once()  # the race is over: this one can only pass or miss
                # a quiet sweep: one started after the last host op, every read judged
                now = self._sweeps()
                self._wait_sweeps([s + 2 for s in now], spec.progress_bound, "a quiet sweep after the race")
            self._stop_vcpus()
        finally:
            self._stop_disrupt.set()
            self.mem.stop_guests()
        self._collect(rep)
        self._end_oracles(rep)
        rep.kernel = O.kernel(health)
        if own_health:
            health.close()
        return rep

    def _exit_counter(self) -> Callable[[int], int] | None:
        """vCPU i's VM exits so far from KVM's binary stats (None where there is no such counter)."""
        try:
            for g in self.guests:
                g.vcpu.stats().value("exits")
        except (KeyError, KvmError):
            return None
        return lambda i: self.guests[i].vcpu.stats().value("exits")

    def _goal_met(self, sw0: list[int], cur: list[int], elapsed: float) -> bool:
        goal = self.spec.goal
        assert goal is not None
        return elapsed >= goal.min_seconds \
            and all(c - s >= goal.sweeps or g.done for c, s, g in zip(cur, sw0, self.guests, strict=True)) \
            and all(d.overlapped >= goal.ops for d in self.disruptors) \
            and (not self.spec.kvmclock or self.report.clock_sets >= goal.ops)

    def _monitor(self, t0: float, sw0: list[int]) -> None:
        spec = self.spec
        end = t0 + spec.seconds
        last = self._sweeps()
        last_t = [t0] * spec.vcpus
        first = self.disruptors[0]
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            if any(g.error for g in self.guests) or any(d.error for d in self.disruptors):
                return
            if spec.goal is not None and self._goal_met(sw0, self._sweeps(), now - t0):
                self.report.ended = "goal"
                return
            if spec.max_ops is not None:
                if first.ops >= spec.max_ops:
                    return
                if now - t0 > max(spec.seconds, 1.0) * 600:
                    self.report.errors.append(f"max_ops {spec.max_ops} not reached in 600x the time")
                    return
            elif now >= end and not self._not_raced_yet(now - t0):
                return
            cur = self._sweeps()
            for i, (a, b) in enumerate(zip(last, cur, strict=True)):
                if b != a:
                    last[i], last_t[i] = b, now
                elif now - last_t[i] > spec.progress_bound:
                    self._stall(i, f"no sweep completed for {now - last_t[i]:.2f} s during the race "
                                   f"(bound {spec.progress_bound:g} s)")
                    return

    def _not_raced_yet(self, elapsed: float) -> bool:
        """A race to its goal that reached its cap before some disruptor made one operation overlapping
        KVM_RUN goes on, up to progress_bound: in a one-CPU guest under TCG a disruptor thread once
        got no CPU for the whole 1 s cap (0 ops; the overlap oracle failed a race that never began).
        The oracle is unchanged: past the bound a race without overlap still fails it."""
        return (self.spec.goal is not None and elapsed < self.spec.progress_bound
                and any(d.overlapped == 0 for d in self.disruptors))

    def _wait_sweeps(self, want: list[int], bound: float, what: str) -> bool:
        end = time.monotonic() + bound
        while True:
            cur = self._sweeps()
            lagging = [i for i, (c, w) in enumerate(zip(cur, want, strict=True))
                       if c < w and not self.guests[i].done]
            if not lagging:
                return True
            if any(g.error for g in self.guests):
                return False
            if time.monotonic() > end:
                for i in lagging:
                    self._stall(i, f"did not complete {what} within {bound:g} s "
                                   f"(sweeps {cur[i]}, needed {want[i]})")
                return False
            time.sleep(POLL)

    def _stall(self, i: int, why: str) -> None:
        """Progress oracle's evidence (oracles.describe_stall): the thread as the kernel shows it
        before the kick, the guest registers the vCPU thread dumps after it."""
        assert self.mem is not None
        g = self.guests[i]
        thread = O.thread_state(g.native_tid)
        in_run = g.vcpu.in_run
        regs = g.registers_after_kick()
        m = self.mem
        ops = {d.name: d.ops for d in self.disruptors}
        self.report.stalls.append(O.describe_stall(
            i, why, counters=m.counters(i), exits=g.exits(),
            host=f"ops {ops}, ops started {m.seq}, generation {m.gen}, loc {m.loc}",
            thread=thread, in_run=in_run, regs=regs))

    def _stop_disruptors(self, threads: list[threading.Thread]) -> None:
        """Bounded: a host operation stuck in the kernel (an interruptible sleep that never ends) is
        reported with its kernel stack, then interrupted by the watchdog's kick signal (no SA_RESTART:
        the syscall returns EINTR, the disruptor fails and releases the seqlock)."""
        self._stop_disrupt.set()
        for d in self.disruptors:
            d.request_stop()  # a C loop sees the event only between slices
        for th in threads:
            th.join(10.0)
            if th.is_alive():
                st = O.thread_state(th.native_id or 0)
                kick_thread(th.ident or 0)
                th.join(5.0)
                after = "still stuck after a kick signal" if th.is_alive() else "a kick signal ended the syscall"
                stack = "\n".join("    " + ln for ln in st.stack.strip().splitlines()) or "    (empty)"
                self.report.errors.append(f"disruptor thread {th.name} did not stop within 10 s ({after}); "
                                          f"tid {st.tid} state {st.state} wchan {st.wchan or '-'}, kernel stack:\n"
                                          f"{stack}")

    def _stop_vcpus(self) -> None:
        assert self.vm is not None and self.mem is not None
        self.mem.stop_guests()
        bound = self.spec.progress_bound + 2
        for i, t in enumerate(self._threads[: self.spec.vcpus]):
            t.join(bound)
            if t.is_alive():
                v = self.vm.vcpus[i]
                WATCHDOG.expire(v, f"race: vcpu {i} did not stop within {bound:g} s of ctrl->stop")
                t.join(5.0)
                if t.is_alive():
                    self.report.errors.append(f"vcpu {i} thread still alive after the stop and a kick "
                                              "(leaked: the VM cannot be closed safely)")

    # ---- after the race ------------------------------------------------------------------------
    def _collect(self, rep: RaceReport) -> None:
        assert self.mem is not None
        rep.host_ops = {d.name: d.ops for d in self.disruptors}
        d0 = self.disruptors[0]
        if d0.t_end > d0.t_start:
            rep.host_seconds = d0.t_end - d0.t_start
        rep.host_bytes = sum(d.bytes for d in self.disruptors)
        rep.overlapped_ops = sum(d.overlapped for d in self.disruptors)
        rep.generations = self.mem.gen - 1
        for d in self.disruptors:
            if d.error is not None:
                rep.errors.append(f"disruptor {d.name}: {d.error!r}")
        for i, g in enumerate(self.guests):
            c = self.mem.counters(i)
            g.counters = c
            rep.sweeps.append(c["sweeps"])
            rep.judged += c["judged"]
            rep.influx += c["influx"]
            rep.writes += c["writes"]
            rep.efault += g.efault
            rep.memory_faults += g.memory_faults
            rep.stray_faults += g.stray_faults
            rep.mmio_reads += g.mmio_reads
            rep.mmio_writes += g.mmio_writes
            if g.error is not None and not (rep.stalls and "watchdog" in str(g.error)):
                rep.errors.append(f"vcpu {i}: {type(g.error).__name__}: {g.error}")
            elif not g.done and not rep.stalls and not rep.errors:
                rep.errors.append(f"vcpu {i} never reached DONE")
        rep.landed_count = len(self.landed)
        rep.landed = self.landed[: O.MAX_DETAILS]
        # where a stale read came from, as the host sees it now (everything is mapped again)
        if not any(t.is_alive() for t in self._threads):
            for k, v in enumerate(rep.violations):
                try:
                    now = self.mem.tags[v.page]
                except (IndexError, ValueError):
                    continue
                rep.violations[k] = P.Violation(v.vcpu, v.page, v.seen, v.seq, v.ops, v.gva, v.gpa,
                                                v.hva, v.loc, now)
        for d in self.disruptors:
            into = getattr(d, "report_into", None)  # a disruptor with counts and an oracle of its own (uffd)
            if into is not None:
                into(rep)

    def _read_stats(self) -> dict[str, int]:
        assert self.vm is not None
        out: dict[str, int] = {}
        try:
            for k, v in self.vm.stats().read().items():
                if isinstance(v, int):
                    out[f"vm.{k}"] = v
            for vc in self.vm.vcpus:
                for k, v in vc.stats().read().items():
                    if isinstance(v, int):
                        out[f"vcpu.{k}"] = out.get(f"vcpu.{k}", 0) + v
        except (KvmError, OSError) as e:
            out["_error"] = 0
            self.report.stats_note = f"binary stats unavailable: {e}"
        return out

    def _end_oracles(self, rep: RaceReport) -> None:
        if any(t.is_alive() for t in self._threads):
            return
        after = self._read_stats()
        rep.stats = {k: v for k, v in stats_delta(self._vm_stats0, after).items() if not k.startswith("_")}
        if not rep.stats and not rep.stats_note:
            rep.stats_note = ("every binary stat stayed unchanged (this backend does not count faults "
                              "there: not observable, not a pass)")
        # memory released: the first disruptor that releases does it once more for the whole region
        d = next((d for d in self.disruptors if d.releases()), None)
        if d is not None:
            r = O.measure_release(self.backing, self.region, d.release_whole)
            if r is not None:
                rep.release = O.released(r)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and join every thread, restore the region, close the VM (the backing is the
        caller's: make_backing's owner closes it)."""
        if self._closed:
            return
        self._closed = True
        self._stop_disrupt.set()
        if self.vm is not None and self.mem is not None:
            self.mem.stop_guests()
        for d in getattr(self, "disruptors", ()):
            let_go = getattr(d, "close", None)  # a disruptor holding vCPU faults (uffd) lets them all go
            if let_go is not None:
                let_go()
        for t in self._threads:
            t.join(5.0)
            if t.is_alive() and self.vm is not None:
                for v in self.vm.vcpus:
                    if v.in_run:
                        WATCHDOG.expire(v, "race: closing")
                t.join(5.0)
        alive = [t.name for t in self._threads if t.is_alive()]
        if self.mem is not None:
            self.mem.close()
        if alive:
            raise HarnessError(f"race threads still alive at close: {alive} (the VM is left open)")
        if self.vm is not None:
            self.vm.close()
            self.vm = None

    def __enter__(self) -> Race:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
