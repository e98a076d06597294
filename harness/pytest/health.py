"""Kernel health around every case: the kernel-log oracle (splats, taint) and the leak check.

`--kmsg` and `--leaks` (fail / warn / off) say what a finding does to the case. The autouse fixture
`_kernel_health` opens the case's window; a splat found right after the body fails the case itself
(F, not E); leaks are judged after every other fixture was torn down. `kernel_health` lets a case
check mid-body by the same rules.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from harness import known_issues
from harness.health import case as case_health
from harness.health import diagnostics, leaks
from harness.health.exclusive import KmsgLock
from harness.health.oracle import Finding, KmsgOracle, known_splats
from harness.kvm.watchdog import WATCHDOG
from harness.lib.failures import VcpuTimeout
from harness.pytest import options
from harness.pytest.ktap import HEALTH_PROPERTY, TIMEOUT_PROPERTY

pytest_plugins = ["harness.pytest.core"]


class KernelHealthWarning(UserWarning):
    """--kmsg=warn / --leaks=warn: what would have failed the case."""


class _Health:
    """Per-process state of the health checks (one per pytest process, xdist workers included)."""

    def __init__(self, config: pytest.Config) -> None:
        self.kmsg_mode = options.kmsg_mode(config)
        self.leaks_mode = options.leaks_mode(config)
        self.limits = options.leak_limits(config)
        self.kmsg_dev = options.kmsg_dev(config)
        # Per-case growth numbers for choosing the bounds: KVM_HARNESS_LEAK_LOG=/path/file.tsv
        self.leak_log = os.environ.get("KVM_HARNESS_LEAK_LOG", "")
        wi = getattr(config, "workerinput", None)  # xdist worker: how many workers share the log
        self.workers = int(wi.get("workercount", 1)) if wi else 1
        self._oracle: KmsgOracle | None = None
        self._lock: KmsgLock | None = None

    @property
    def oracle(self) -> KmsgOracle:
        if self._oracle is None:  # opened at the first case: the xdist controller never needs one
            known = known_splats({ki.id for ki in known_issues.in_force()}, known_issues.default_file())
            self._oracle = KmsgOracle(self.kmsg_mode, self.kmsg_dev, workers=self.workers, known=known)
        return self._oracle

    @property
    def lock(self) -> KmsgLock:
        if self._lock is None:
            self._lock = KmsgLock()
        return self._lock

    def close(self) -> None:
        if self._oracle is not None:
            self._oracle.close()
        if self._lock is not None:
            self._lock.close()


_HEALTH = pytest.StashKey[_Health]()
_CASE = pytest.StashKey[case_health.CaseHealth | None]()
_CALL_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_HEALTH] = _Health(config)
    WATCHDOG.add_collector(diagnostics.collect_hang)
    if diagnostics.prepare_vcpu not in WATCHDOG.register_hooks:
        WATCHDOG.register_hooks.append(diagnostics.prepare_vcpu)


def pytest_unconfigure(config: pytest.Config) -> None:
    h = config.stash.get(_HEALTH, None)
    if h is not None:
        h.close()
    WATCHDOG.remove_collector(diagnostics.collect_hang)
    if diagnostics.prepare_vcpu in WATCHDOG.register_hooks:
        WATCHDOG.register_hooks.remove(diagnostics.prepare_vcpu)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"kvm-harness: kernel-log oracle {options.kmsg_state(config)}, leak checks {options.leaks_mode(config)}"]


def _report_health(item: pytest.Item, when: str, what: str, mode: str, summary: str, msg: str,
                   already_failed: bool) -> str | None:
    """Record one health finding; returns the message when it must fail the case now."""
    if mode == "warn":
        item.user_properties.append((f"kvm_{what}_warning", summary))
        warnings.warn(KernelHealthWarning(msg), stacklevel=1)
        return None
    item.user_properties.append((HEALTH_PROPERTY, f"{what}: {summary}"))
    if already_failed:
        # The case failed already; the evidence goes next to that failure, not in a second one.
        item.add_report_section(when, f"kvm-harness {what}", msg)
        return None
    return msg


def _reporter(item: pytest.Item, h: _Health) -> case_health.Reporter:
    def report(phase: str, f: Finding) -> str | None:
        when = "teardown" if phase.startswith("teardown") else "call"
        return _report_health(item, when, "kmsg", h.kmsg_mode, f.summary(), f.message(phase),
                              item.stash.get(_CALL_FAILED, False))
    return report


@pytest.fixture(autouse=True)
def _kernel_health(request: pytest.FixtureRequest) -> Iterator[None]:
    """Kernel log, taint and leaks around every case. Set up before the other function fixtures and
    torn down after them (`_kvm_bound` depends on it; the rest are not autouse): their set-up and
    teardown (VM creation, close) are inside the case's window, and leaks are judged after they
    cleaned up. The case holds the kernel-log lock (exclusively if it is expected to splat) for the
    whole window."""
    item = request.node
    h = request.config.stash[_HEALTH]
    ch = None
    exclusive = item.get_closest_marker("kmsg_exclusive") is not None
    if h.kmsg_mode != "off" and h.oracle.active:
        h.lock.acquire(exclusive)
        try:
            if exclusive:
                item.user_properties.append(("kmsg_exclusive", f"waited {h.lock.waited:.2f} s"))
            w = h.oracle.begin(item.nodeid, accept_user=item.get_closest_marker("kmsg_accept_user") is not None,
                               exclusive=exclusive)
            ch = case_health.CaseHealth(h.oracle, w, _reporter(item, h))
        except BaseException:
            h.lock.release()  # never keep the other workers waiting for a case that did not start
            raise
    item.stash[_CASE] = ch
    case_health.set_current(ch)
    before = None
    try:
        before = leaks.snapshot() if h.leaks_mode != "off" else None
        yield
        fail_msgs = []
        if ch is not None:
            fail_msgs.append(ch.check(f"teardown (after the test body) of {item.nodeid}"))
    finally:
        case_health.set_current(None)
        if ch is not None:
            h.lock.release()
    if before is not None:
        if h.leak_log:
            leaks.log_growth(h.leak_log, item.nodeid, before)
        found = leaks.check(before, h.limits)
        if found:
            msg = f"leak check: {item.nodeid} left behind {len(found)} thing(s):\n" + \
                "\n".join(f"  {ln}" for ln in found)
            fail_msgs.append(_report_health(item, "teardown", "leaks", h.leaks_mode, "; ".join(found)[:500],
                                            msg, item.stash.get(_CALL_FAILED, False)))
    fail_msgs = [m for m in fail_msgs if m]
    if fail_msgs:
        pytest.fail("\n\n".join(fail_msgs), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[Any]:
    """Check the kernel log right after the test body, so a splat fails the case itself (F, not E)."""
    exc: BaseException | None = None
    res = None
    try:
        res = yield
    except BaseException as e:
        exc = e
    ch = item.stash.get(_CASE, None)
    if ch is not None:
        # A failure already there keeps its place; the kernel's evidence goes beside it.
        item.stash[_CALL_FAILED] = exc is not None
        m = ch.check("the test body")
        if m and exc is None:
            pytest.fail(m, pytrace=False)
    if exc is not None:
        raise exc
    return res


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    if call.when == "call" and call.excinfo is not None and call.excinfo.errisinstance(VcpuTimeout):
        # Before the report is made: it copies the properties (KTAP says TIMEOUT, JUnit shows it).
        item.user_properties.append((TIMEOUT_PROPERTY, str(call.excinfo.value).splitlines()[0]))
    rep = yield
    if rep.when == "call":
        item.stash[_CALL_FAILED] = rep.failed
    return rep


@pytest.fixture
def kernel_health(request: pytest.FixtureRequest) -> case_health.CaseHealth:
    """The case's kernel-health check, for cases that check mid-body: `kernel_health.assert_healthy(where)`
    judges by the same rules as the check after the body (which then does not repeat what it reported)."""
    ch = request.node.stash.get(_CASE, None)
    if ch is None:  # --kmsg=off or an unreadable log: a check that finds nothing, saying why
        ch = case_health.CaseHealth(request.config.stash[_HEALTH].oracle, None)
    return ch
