"""`--ktap[=PATH]`: the run as KTAP v1, one result per case, streamed as cases finish.

Registered by harness.pytest.plugin in the process that sees every report: the only process
without xdist, the controller with it (workers send their reports there). The plan is the number
of collected cases (after deselection), known before the first result. Cases that never report
(the session was interrupted, a worker crashed) are written as `not ok N name # ERROR not run`.

To stdout (`--ktap` or `--ktap=-`) the stream stays pure KTAP: pytest's own terminal output moves to
stderr.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, TextIO

import pytest

from harness.report.ktap import KtapResult, KtapWriter, Outcome

HEALTH_PROPERTY = "kvm_health"  # set on a case failed by the kernel-log oracle or the leak check
TIMEOUT_PROPERTY = "kvm_timeout_report"  # set on a case the watchdog stopped


def _crash_line(rep: pytest.TestReport) -> str:
    crash = getattr(rep.longrepr, "reprcrash", None)
    msg = getattr(crash, "message", "") if crash is not None else ""
    crashed = next((ln for ln in rep.longreprtext.splitlines() if "crashed while running" in ln), "")
    if crashed:  # an xdist worker died (segfault, os._exit) in the middle of this case
        return crashed.strip()
    if not msg:
        msg = next((ln for ln in rep.longreprtext.splitlines() if ln.strip()), "")
    # "harness.lib.failures.VcpuTimeout: vcpu 0 ..." -> "vcpu 0 ..."; "Failed: x" -> "x"
    head, sep, tail = msg.partition(": ")
    if sep and " " not in head:
        msg = tail
    return msg.splitlines()[0] if msg else ""


def _skip_reason(rep: pytest.TestReport) -> str:
    if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        return str(rep.longrepr[2]).removeprefix("Skipped: ")
    return rep.longreprtext


def _sections(reports: list[pytest.TestReport]) -> list[str]:
    out = []
    for r in reports:
        for title, text in r.sections:
            if "kvm-harness" in title and text.strip():
                out.append(f"{title}:\n{text.rstrip()}")
    return out


def classify(reports: list[pytest.TestReport]) -> KtapResult | None:
    """One KTAP result from a case's setup/call/teardown reports (None if nothing arrived)."""
    if not reports:
        return None
    name = reports[0].nodeid
    by = {r.when: r for r in reports}
    props = dict(p for r in reports for p in r.user_properties)
    diags = _sections(reports)
    failed = [r for r in reports if r.failed]
    if failed:
        first = failed[0]
        text = "\n".join(r.longreprtext.rstrip() for r in failed)
        longrepr = first.longrepr
        if first.when == "call" and isinstance(longrepr, str) and longrepr.startswith("[XPASS(strict)]"):
            return KtapResult(name, "xpass", longrepr.removeprefix("[XPASS(strict)]").strip(), diags)
        outcome: Outcome
        if first.when == "call" and TIMEOUT_PROPERTY in props:
            outcome = "timeout"
        elif first.when == "call" or HEALTH_PROPERTY in props:
            outcome = "fail"
        else:
            outcome = "error"  # a fixture failed: the case itself never ran (or ran and then this)
        if outcome == "fail":
            return KtapResult(name, "fail", text, diags)
        return KtapResult(name, outcome, f"{_crash_line(first)}\n{text}", diags)
    for r in reports:
        if r.skipped:
            if hasattr(r, "wasxfail"):
                return KtapResult(name, "xfail", str(r.wasxfail), diags)
            return KtapResult(name, "skip", _skip_reason(r), diags)
    call = by.get("call")
    if call is not None and hasattr(call, "wasxfail"):  # non-strict xpass: passed, but say so
        diags.append(f"XPASS (non-strict): {call.wasxfail}")
    return KtapResult(name, "pass", "", diags)


class KtapReporter:
    def __init__(self, config: pytest.Config, target: str) -> None:
        self.config = config
        self.target = target
        self._own: TextIO | None = None
        self.writer: KtapWriter | None = None
        self.planned: list[str] = []
        self.pending: dict[str, list[pytest.TestReport]] = {}
        self.done: set[str] = set()
        self._header: list[str] = []

    # ---- set-up --------------------------------------------------------------------------------
    def stream(self) -> TextIO:
        if self.target == "-":
            return sys.stdout
        os.makedirs(os.path.dirname(os.path.abspath(self.target)), exist_ok=True)
        self._own = open(self.target, "w", encoding="utf-8")  # noqa: SIM115 - closed at session end
        return self._own

    def header(self, line: str) -> None:
        """A diagnostic line written right after the plan (kernel, backend, oracle state)."""
        self._header.append(line)

    def _start(self, ids: list[str]) -> None:
        if self.writer is not None:
            return
        self.planned = list(ids)
        self.writer = KtapWriter(self.stream(), len(ids), suite="kvm")
        self.writer.diagnostic(f"kernel {platform.release()} ({platform.machine()})")
        for h in self._header:
            self.writer.diagnostic(h)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self.config.option.collectonly:
            return
        if getattr(self.config.option, "numprocesses", None) and not hasattr(self.config, "workerinput"):
            return  # xdist controller: the plan comes from the workers' collection
        self._start([i.nodeid for i in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self._start(ids)

    # ---- results -------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.pending.setdefault(report.nodeid, []).append(report)
        if report.when == "teardown":
            self._emit(report.nodeid)

    def _emit(self, nodeid: str) -> None:
        result = classify(self.pending.pop(nodeid, []))
        if result is None or self.writer is None or nodeid in self.done:
            return
        if self.writer.plan is not None and self.writer.count >= self.writer.plan:
            return  # a report for something outside the plan (should not happen); keep KTAP valid
        self.done.add(nodeid)
        self.writer.add(result)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for nodeid in list(self.pending):  # interrupted between setup and teardown
            self._emit(nodeid)
        if self.writer is not None:
            self.writer.close(not_run=[n for n in self.planned if n not in self.done])
        if self._own is not None:
            self._own.close()


def redirect_terminal_to_stderr(config: pytest.Config) -> None:
    """Keep stdout for KTAP: pytest's terminal reporter writes to stderr instead."""
    tr = config.pluginmanager.getplugin("terminalreporter")
    if tr is None:
        return
    from _pytest.config import create_terminal_writer

    tr._tw = create_terminal_writer(config, sys.stderr)
