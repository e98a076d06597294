"""Bounds every KVM_RUN: a daemon thread that kicks vCPUs out of the kernel when time is up.

A kick sets kvm_run.immediate_exit first and then signals the thread inside KVM_RUN (a no-op
handler installed without SA_RESTART), so KVM_RUN returns EINTR whether the signal lands before or
during the ioctl. The vCPU is then marked expired and its next run() raises VcpuTimeout, which
carries the diagnostics collected before the kick.
"""

from __future__ import annotations

import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from harness._kvm_cffi import lib

if TYPE_CHECKING:
    from harness.vcpu import Vcpu

POLL_S = 0.02
KICK_SIGNAL = lib.kh_kick_signal()
_rc = lib.kh_install_kick_handler()
if _rc < 0:  # pragma: no cover - sigaction on a valid signal does not fail
    raise OSError(-_rc, "sigaction(kick signal)")

Collector = Callable[["Vcpu", str], str]


class Watchdog:
    """Process-wide: tracks live vCPUs, a per-call deadline on each, and one global deadline."""

    def __init__(self) -> None:
        self._vcpus: weakref.WeakSet[Vcpu] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._global_deadline: float | None = None
        self._global_reason = ""
        self.collectors: list[Collector] = []  # run before the kick; their text goes in the failure
        self.expired_log: list[str] = []
        self._thread: threading.Thread | None = None

    def register(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._vcpus.add(vcpu)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kvm-watchdog", daemon=True)
                self._thread.start()

    def set_global_deadline(self, seconds: float | None, reason: str = "") -> None:
        """Bound everything that runs from now on (the pytest plugin does this per test)."""
        self._global_deadline = None if seconds is None else time.monotonic() + seconds
        self._global_reason = reason or (f"test exceeded its {seconds:g} s bound" if seconds else "")

    def _loop(self) -> None:
        while True:
            time.sleep(POLL_S)
            now = time.monotonic()
            gd = self._global_deadline
            with self._lock:
                vcpus = list(self._vcpus)
            for v in vcpus:
                if v._expired is not None:
                    if v._tid:
                        self._signal(v)  # still inside KVM_RUN: the first kick may have raced
                    continue
                if v._deadline is not None and now >= v._deadline:
                    self.expire(v, v._deadline_reason)
                elif gd is not None and now >= gd and not v.closed:
                    self.expire(v, self._global_reason)

    def expire(self, vcpu: Vcpu, reason: str) -> None:
        report = [reason]
        for collect in self.collectors:
            try:
                text = collect(vcpu, reason)
            except Exception as e:  # diagnostics must never mask the timeout itself
                text = f"(collector {getattr(collect, '__name__', collect)} failed: {e!r})"
            if text:
                report.append(text)
        vcpu._expired = "\n".join(report)
        self.expired_log.append(f"vcpu {vcpu.id}: {reason}")
        vcpu.kick()

    @staticmethod
    def _signal(vcpu: Vcpu) -> None:
        tid = vcpu._tid
        if tid:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass


WATCHDOG = Watchdog()
