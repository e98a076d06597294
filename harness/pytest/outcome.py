"""A run in which every case skipped exits 4 (kselftest's KSFT_SKIP), not 0, and says so loudly.

A CI job whose machine cannot run the suite (no /dev/kvm, not root: the `kvm` fixture skips every
case) would otherwise look green while testing nothing. Registered from the top-level conftest.py.

Only "cases ran and every one skipped" changes the exit: a run with a pass, a failure, an xfail or
an xpass keeps pytest's code, and so does one that collected nothing (pytest's own 5). Under
`--bisect` the bisect verdict owns the exit code (harness/cli/bisect.py: all skipped is 125 there),
and xdist workers leave it to the controller, which sees every report.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from harness.pytest import options

pytest_plugins = ["harness.pytest.core"]

ALL_SKIPPED = 4  # KSFT_SKIP in tools/testing/selftests/kselftest.h (pytest's USAGE_ERROR is 4 as well)


class _Outcome:
    def __init__(self) -> None:
        self.ran: set[str] = set()  # node ids that passed, failed, xfailed or xpassed in some phase
        self.skipped: dict[str, str] = {}  # node id -> skip reason
        self.all_skipped = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.setdefault(report.nodeid, str(reason).removeprefix("Skipped: "))
        elif report.failed or report.when == "call" or hasattr(report, "wasxfail"):
            self.ran.add(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if (exitstatus == pytest.ExitCode.OK and self.skipped and not self.ran
                and not options.bisect(session.config)):
            self.all_skipped = True
            session.exitstatus = ALL_SKIPPED

    @pytest.hookimpl(wrapper=True, tryfirst=True)  # around the reporter's: after its short summary
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> Generator[None]:
        yield
        if not self.all_skipped:
            return
        n = len(self.skipped)
        reasons: dict[str, int] = {}
        for r in self.skipped.values():
            reasons[r] = reasons.get(r, 0) + 1
        tr = terminalreporter
        tr.write_sep("!", f"NOTHING WAS TESTED: all {n} selected case(s) skipped", red=True, bold=True)
        for r, k in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
            tr.write_line(f"  {k:4d} x {r}", red=True)
        tr.write_line(f"exit status {ALL_SKIPPED} (kselftest's skip code), not 0: a run that tests nothing "
                      "must not look green", red=True, bold=True)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # xdist workers: the controller decides
        config.pluginmanager.register(_Outcome(), "kvm-harness-outcome")
