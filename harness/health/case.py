"""One kernel-health verdict per case, whoever asks: the autouse check around every case, a case's
own mid-body check (`kernel_health.assert_healthy(...)`) and the race engine's kernel oracle.

All of them judge the same `Window` of the same `KmsgOracle`, so a splat is reported once (the first
check that sees it), known issues are accepted by one rule, and --kmsg=warn/off mean the same
everywhere. The pytest plugin makes the case's `CaseHealth` current for the case's duration; code
running outside pytest (a script driving a `Race`) gets a standalone one with `standalone()`.
"""

from __future__ import annotations

from collections.abc import Callable

from harness import known_issues
from harness.health.oracle import Finding, KmsgOracle, Window, known_splats
from harness.kvm.errors import HarnessError

# (phase, finding) -> the message that must fail the case now, or None (reported as a warning,
# attached to a failure already there, or --kmsg=off).
Reporter = Callable[[str, Finding], "str | None"]


class KernelHealthError(HarnessError, AssertionError):
    """The kernel logged a splat or changed its taint during the case (message quotes the records)."""


class CaseHealth:
    """The kernel-log window of one case and how its findings are reported."""

    def __init__(self, oracle: KmsgOracle, window: Window | None, reporter: Reporter | None = None,
                 owns_oracle: bool = False) -> None:
        self.oracle = oracle
        self.window = window
        self._reporter = reporter
        self._owns = owns_oracle

    @property
    def active(self) -> bool:
        return self.window is not None and self.oracle.active

    @property
    def reason(self) -> str:
        """Why the log is not checked (empty when it is)."""
        if self.active:
            return ""
        return self.oracle.reason or f"--kmsg={self.oracle.mode}"

    def check(self, phase: str) -> str | None:
        """Read the log now: the message that must fail the case, or None. Each record is judged
        once per window, so a later check does not repeat what this one reported."""
        f = self.oracle.check(self.window)
        if not f:
            return None
        if self._reporter is not None:
            return self._reporter(phase, f)
        return f.message(phase) if self.oracle.mode == "fail" else None

    def assert_healthy(self, where: str) -> None:
        """Raise KernelHealthError when the kernel logged a splat (or changed taint) since the last check."""
        msg = self.check(where)
        if msg:
            raise KernelHealthError(msg)

    def close(self) -> None:
        if self._owns:
            self.oracle.close()


_current: CaseHealth | None = None


def current() -> CaseHealth | None:
    """The running case's CaseHealth (set by the pytest plugin), or None outside a case."""
    return _current


def set_current(ch: CaseHealth | None) -> None:
    global _current
    _current = ch


def standalone(label: str, mode: str = "fail") -> CaseHealth:
    """A CaseHealth of its own, opened now, with the known issues in force on this kernel (for code
    that runs outside pytest). Close it when done."""
    known = known_splats({ki.id for ki in known_issues.in_force()}, known_issues.default_file())
    oracle = KmsgOracle(mode, known=known)
    return CaseHealth(oracle, oracle.begin(label), owns_oracle=True)


def for_case(label: str) -> tuple[CaseHealth, bool]:
    """The current case's CaseHealth, or a standalone one; the flag says whether the caller owns it."""
    ch = current()
    if ch is not None:
        return ch, False
    return standalone(label), True
