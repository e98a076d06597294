"""Bounds every KVM_RUN: a daemon thread that kicks vCPUs out of the kernel when time is up.

A kick sets kvm_run.immediate_exit first and then signals the thread inside KVM_RUN (a no-op
handler installed without SA_RESTART), so KVM_RUN returns EINTR whether the signal lands before or
during the ioctl. The vCPU is then marked expired and its next run() raises VcpuTimeout, which
carries the diagnostics collected before the kick.

A vCPU registers itself (Watchdog.register) and offers the Bounded interface: the watchdog reads
and writes only those attributes and calls only kick().
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from harness.kvm._cffi import lib
from harness.kvm.errors import ClosedError

POLL_S = 0.02
COLLECT_TIMEOUT_S = 10.0  # bound on the diagnostics collected before a kick
KICK_SIGNAL = lib.kh_kick_signal()
_rc = lib.kh_install_kick_handler()
if _rc < 0:  # pragma: no cover - sigaction on a valid signal does not fail
    raise OSError(-_rc, "sigaction(kick signal)")


class Bounded(Protocol):
    """What the watchdog uses of a vCPU it bounds (harness.kvm.vcpu.Vcpu, which imports this module)."""

    id: int
    closed: bool
    run_thread: int  # threading ident of the thread inside (or entering) KVM_RUN, 0 outside
    deadline_at: float | None  # time.monotonic() when the innermost Vcpu.deadline() ends
    deadline_reason: str
    expired: str | None  # set by the watchdog: the report the vCPU's next run() raises with

    def kick(self) -> None: ...


Collector = Callable[[Bounded, str], str]


def kick_thread(ident: int) -> None:
    """Signal the thread `ident` (inside KVM_RUN) so the ioctl returns EINTR; 0 or a gone thread: no-op."""
    if ident:
        try:
            signal.pthread_kill(ident, KICK_SIGNAL)
        except (ProcessLookupError, OSError):
            pass


class _DiagJob:
    def __init__(self, vcpu: Bounded, reason: str) -> None:
        self.vcpu = vcpu
        self.reason = reason
        self.out: list[str] = []
        self.done = threading.Event()


class Watchdog:
    """Process-wide: tracks live vCPUs, a per-call deadline on each, and one global deadline."""

    def __init__(self) -> None:
        self._vcpus: weakref.WeakSet[Bounded] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._global_deadline: float | None = None
        self._global_reason = ""
        self.collectors: list[Collector] = []  # run before the kick; their text goes in the failure
        # Run when a vCPU registers (on its creating thread, before it can run): collectors must not
        # issue vCPU ioctls, which wait for the vcpu mutex KVM_RUN holds, so they prepare here.
        self.register_hooks: list[Callable[[Bounded], None]] = []
        self.expired_log: list[str] = []
        self._thread: threading.Thread | None = None
        self._diag_thread: threading.Thread | None = None
        self._diag_queue: queue.SimpleQueue[_DiagJob] = queue.SimpleQueue()
        self._diag_busy = threading.Event()

    def register(self, vcpu: Bounded) -> None:
        """Bound `vcpu` from now on (held weakly: a dropped vCPU leaves by itself)."""
        for hook in self.register_hooks:
            try:
                hook(vcpu)
            except Exception:  # diagnostics preparation must never break vCPU creation
                pass
        with self._lock:
            self._vcpus.add(vcpu)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kvm-watchdog", daemon=True)
                self._thread.start()
            if self._diag_thread is None or not self._diag_thread.is_alive():
                self._diag_thread = threading.Thread(target=self._diag_loop, name="kvm-watchdog-diag",
                                                     daemon=True)
                self._diag_thread.start()

    def set_global_deadline(self, seconds: float | None, reason: str = "") -> None:
        """Bound everything that runs from now on (the pytest plugin does this per test)."""
        self._global_deadline = None if seconds is None else time.monotonic() + seconds
        self._global_reason = reason or (f"test exceeded its {seconds:g} s bound" if seconds else "")

    def _loop(self) -> None:
        while True:
            time.sleep(POLL_S)
            try:
                self._tick()
            except Exception:  # the bound on every KVM_RUN must outlive any one bad vCPU object
                pass

    def _tick(self) -> None:
        now = time.monotonic()
        gd = self._global_deadline
        with self._lock:
            vcpus = list(self._vcpus)
        collected = False  # one report per tick for vCPUs outside KVM_RUN: it is the same process
        for v in vcpus:
            if v.expired is not None:
                kick_thread(v.run_thread)  # still inside KVM_RUN: the first kick may have raced
                continue
            reason = None
            deadline = v.deadline_at
            if deadline is not None and now >= deadline:
                reason = v.deadline_reason
            elif gd is not None and now >= gd and not v.closed:
                reason = self._global_reason
            if reason is None:
                continue
            collect = bool(v.run_thread) or not collected
            collected = collected or collect
            self.expire(v, reason, collect=collect)

    def add_collector(self, collect: Collector) -> None:
        """Run `collect(vcpu, reason)` on every expiry, before the kick (idempotent)."""
        if collect not in self.collectors:
            self.collectors.append(collect)

    def remove_collector(self, collect: Collector) -> None:
        if collect in self.collectors:
            self.collectors.remove(collect)

    def expire(self, vcpu: Bounded, reason: str, *, collect: bool = True) -> None:
        """Mark vcpu expired with `reason` (and the collectors' diagnostics), then kick it."""
        report = [reason]
        if self.collectors and collect:
            report += self._collect(vcpu, reason)
        vcpu.expired = "\n".join(report)
        self.expired_log.append(f"vcpu {vcpu.id}: {reason}")
        if vcpu.closed:
            return  # closed while the diagnostics ran: nothing to kick
        try:
            vcpu.kick()
        except (AttributeError, ClosedError):
            pass  # closed between the check and the kick (close() drops the kvm_run mapping)

    def _collect(self, vcpu: Bounded, reason: str) -> list[str]:
        """Run the collectors on the diagnostics thread, bounded: a collector that blocks (say, on
        a lock the stuck vCPU holds) must not stop the kick, or the bound on KVM_RUN would be gone.
        The thread is made once, up front: creating one at expiry needs a stack mmap, i.e. the
        mmap lock, which a vCPU faulting in a 1 GiB page can hold for seconds."""
        if self._diag_busy.is_set():
            return ["(diagnostics skipped: the previous collection has not finished)"]
        t0 = time.monotonic()
        job = _DiagJob(vcpu, reason)
        self._diag_busy.set()
        self._diag_queue.put(job)
        if not job.done.wait(COLLECT_TIMEOUT_S):
            return [*job.out, f"(diagnostics did not finish within {COLLECT_TIMEOUT_S:g} s; kicked without the rest)"]
        return [*job.out, f"(diagnostics took {time.monotonic() - t0:.2f} s, before the kick)"]

    def _diag_loop(self) -> None:
        while True:
            job = self._diag_queue.get()
            try:
                for collect in list(self.collectors):
                    try:
                        text = collect(job.vcpu, job.reason)
                    except Exception as e:  # diagnostics must never mask the timeout itself
                        text = f"(collector {getattr(collect, '__name__', collect)} failed: {e!r})"
                    if text:
                        job.out.append(text)
            finally:
                self._diag_busy.clear()
                job.done.set()


WATCHDOG = Watchdog()
