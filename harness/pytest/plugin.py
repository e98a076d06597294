"""pytest integration: fixtures `kvm`, `vm`, `vcpu`; capability markers; a bound on every test.

Loaded from the top-level conftest.py. Cases say what they need and get it or a skip with the reason:

    @pytest.mark.guest("checksum", mode="long64")
    @pytest.mark.requires_cap(Cap.USER_MEMORY2)
    def test_x(vm, vcpu): ...
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from harness import backends as backend
from harness import known_issues
from harness.health import case as case_health
from harness.health import diagnostics, leaks
from harness.health.exclusive import KmsgLock
from harness.health.oracle import MODES, Finding, KmsgOracle, known_splats
from harness.kvm.caps import Cap
from harness.kvm.system import Kvm
from harness.kvm.vcpu import Vcpu
from harness.kvm.vm import Vm
from harness.kvm.watchdog import WATCHDOG
from harness.lib.failures import BadInput, VcpuTimeout, seconds_arg
from harness.lib.guestvm import GuestVm, ModeUnsupported
from harness.pytest.ktap import HEALTH_PROPERTY, TIMEOUT_PROPERTY, KtapReporter, redirect_terminal_to_stderr
from harness.x86.modes import Mode

DEFAULT_TEST_TIMEOUT = 60.0


class KernelHealthWarning(UserWarning):
    """--kmsg=warn / --leaks=warn: what would have failed the case."""


class _Health:
    """Per-process state of the health checks (one per pytest process, xdist workers included)."""

    def __init__(self, config: pytest.Config) -> None:
        self.kmsg_mode: str = config.getoption("--kmsg")
        self.leaks_mode: str = config.getoption("--leaks")
        self.limits = leaks.Limits(rss_mb=config.getoption("--leak-rss-mb"),
                                   anon_mb=config.getoption("--leak-anon-mb"))
        self.kmsg_dev: str = config.getoption("--kmsg-dev")
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


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kvm-harness")
    g.addoption("--kvm-dev", default=os.environ.get("KVM_HARNESS_DEV", "/dev/kvm"),
                help="KVM device node (default /dev/kvm)")
    g.addoption("--kvm-timeout", type=seconds_arg, default=DEFAULT_TEST_TIMEOUT,
                help="bound on all KVM_RUNs of one test, in seconds (default %(default)s)")
    g.addoption("--kmsg", choices=MODES, default="fail",
                help="kernel-log oracle: fail a case on a new splat or taint change, warn only, or off "
                     "(default %(default)s)")
    g.addoption("--kmsg-dev", default="/dev/kmsg", help=argparse.SUPPRESS)
    g.addoption("--leaks", choices=MODES, default="fail",
                help="leak check after each case: fds, threads, mappings, RSS, hugepage pools, mounts "
                     "(default %(default)s)")
    g.addoption("--leak-rss-mb", type=int, default=leaks.DEFAULT_RSS_MB,
                help="RSS growth over one case that counts as a leak (default %(default)s MiB)")
    g.addoption("--leak-anon-mb", type=int, default=leaks.DEFAULT_ANON_MB,
                help="anonymous-mapping growth over one case that counts as a leak (default %(default)s MiB)")
    g.addoption("--ktap", nargs="?", const="-", default=None, metavar="PATH",
                help="write KTAP v1 results to PATH (default: stdout; pytest's own output then goes to stderr)")
    g.addoption("--bisect", action="store_true",
                help="exit 0 good / 1 bad / 125 cannot test here / 128 the selection is wrong (aborts), "
                     "for `git bisect run`")


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists (--ktap to stdout moves it)
def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "guest(payload, mode='long64', nr_vcpus=1, arg=0): the `vm` fixture builds a GuestVm running this payload",
        "requires_cap(cap, min=1): skip unless KVM_CHECK_EXTENSION(cap) >= min (system fd)",
        "requires_vm_cap(cap, min=1): skip unless the VM fd reports cap >= min",
        "requires_sysfs(path, value=None): skip unless the file exists (and holds value)",
        "kvm_timeout(seconds): this test's bound on KVM_RUN instead of --kvm-timeout",
        "kmsg_accept_user: the kernel-log oracle also counts user-space records (tests that inject one)",
        "kmsg_exclusive: the case is expected to splat: it runs with no other case beside it, so the kernel "
        "log's records are pinned to it (set automatically for cases a known issue with a `kmsg` pattern names)",
    ):
        config.addinivalue_line("markers", line)
    config.stash[_HEALTH] = _Health(config)
    WATCHDOG.add_collector(diagnostics.collect_hang)
    if diagnostics.prepare_vcpu not in WATCHDOG.register_hooks:
        WATCHDOG.register_hooks.append(diagnostics.prepare_vcpu)
    is_worker = hasattr(config, "workerinput")
    ktap = config.getoption("--ktap")
    if ktap and not is_worker:
        rep = KtapReporter(config, ktap)
        if ktap == "-":
            redirect_terminal_to_stderr(config)
        rep.header(f"backend {backend.name()}")  # the matrix keys known issues by (release, backend)
        rep.header(f"paging {backend.paging()}")  # and emulator artefacts by how the guest is walked
        if config.getoption("--kmsg") != "off":
            why = _kmsg_unreadable(config.getoption("--kmsg-dev"))
            rep.header(f"kernel-log oracle: {why or config.getoption('--kmsg')}")
        config.pluginmanager.register(rep, "kvm-harness-ktap")
    if config.getoption("--bisect") and not is_worker:
        from harness.cli.bisect import BisectVerdict

        config.pluginmanager.register(BisectVerdict(), "kvm-harness-bisect")


def _kmsg_unreadable(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return f"off: cannot open {path} ({e.strerror}); cases are not checked against the kernel log"
    os.close(fd)
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    mode = config.getoption("--kmsg")
    why = _kmsg_unreadable(config.getoption("--kmsg-dev")) if mode != "off" else "off"
    lines.append(f"kvm-harness: kernel-log oracle {why or mode}, leak checks {config.getoption('--leaks')}")
    return lines


def pytest_unconfigure(config: pytest.Config) -> None:
    h = config.stash.get(_HEALTH, None)
    if h is not None:
        h.close()
    WATCHDOG.remove_collector(diagnostics.collect_hang)
    if diagnostics.prepare_vcpu in WATCHDOG.register_hooks:
        WATCHDOG.register_hooks.remove(diagnostics.prepare_vcpu)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Known kernel issues in force on this kernel become xfails of the cases they name (strict unless
    the entry says the bug reproduces by chance); those whose bug prints a splat (`kmsg`) also run
    alone, so the splat is pinned to them (harness/health/exclusive.py)."""
    issues = known_issues.in_force()
    if not issues:
        return
    for item in items:
        for ki in issues:
            if ki.matches(item.nodeid):
                item.add_marker(pytest.mark.xfail(reason=ki.xfail_reason(), strict=ki.strict))
                item.user_properties.append(("known_issue", ki.id))
                if ki.kmsg:
                    item.add_marker(pytest.mark.kmsg_exclusive)
                break


def _kvm_unavailable(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this machine)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by uid {os.getuid()}"
    return None


@pytest.fixture(scope="session")
def kvm(request: pytest.FixtureRequest) -> Iterator[Kvm]:
    """The system fd; the whole session skips with the reason when there is no usable KVM."""
    path = request.config.getoption("--kvm-dev")
    why = _kvm_unavailable(path)
    if why:
        pytest.skip(why)
    k = Kvm(path)
    yield k
    k.close()


def _check_requirements(item: pytest.Item, kvm: Kvm | None) -> None:
    for m in item.iter_markers("requires_sysfs"):
        path = m.args[0]
        want = m.args[1] if len(m.args) > 1 else m.kwargs.get("value")
        if not os.path.exists(path):
            pytest.skip(f"needs {path}, which does not exist")
        if want is not None:
            with open(path) as f:
                have = f.read().strip()
            if have != str(want):
                pytest.skip(f"needs {path} = {want}, it is {have}")
    if kvm is None:
        return
    for m in item.iter_markers("requires_cap"):
        cap = m.args[0]
        need = m.args[1] if len(m.args) > 1 else m.kwargs.get("min", 1)
        have = kvm.check_extension(cap)
        if have < need:
            name = Cap(cap).name if cap in Cap._value2member_map_ else str(cap)
            pytest.skip(f"KVM_CAP_{name} is {have} on this kernel (needs >= {need})")


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
    """Kernel log, taint and leaks around every case. Autouse and defined before the other function
    fixtures, so it is set up before them and torn down after them: their set-up and teardown (VM
    creation, close) are inside the case's window, and leaks are judged after they cleaned up.
    The case holds the kernel-log lock (exclusively if it is expected to splat) for the whole window."""
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


@pytest.fixture(autouse=True)
def _kvm_bound(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every KVM_RUN of the test is bounded: past the bound the watchdog kicks and fails it."""
    m = request.node.get_closest_marker("kvm_timeout")
    seconds = request.config.getoption("--kvm-timeout")
    if m:
        try:
            seconds = seconds_arg(str(m.args[0]))
        except (argparse.ArgumentTypeError, IndexError) as e:
            pytest.fail(f"@pytest.mark.kvm_timeout{m.args}: {e or 'needs a number of seconds'}", pytrace=False)
    kvm = request.getfixturevalue("kvm") if "kvm" in request.fixturenames else None
    _check_requirements(request.node, kvm)
    request.node.user_properties.append(("kvm_bound_s", f"{seconds:g}"))
    WATCHDOG.set_global_deadline(seconds, f"test exceeded its {seconds:g} s bound on KVM_RUN")
    yield
    WATCHDOG.set_global_deadline(None)


@pytest.fixture
def vm(request: pytest.FixtureRequest, kvm: Kvm) -> Iterator[Vm]:
    """A GuestVm when the test carries @pytest.mark.guest(...) (mode may come from a `mode`
    parameter), otherwise a bare Vm. Closed after the test, failed or not."""
    m = request.node.get_closest_marker("guest")
    if m is None:
        v: Vm = kvm.create_vm()
    else:
        kw = dict(m.kwargs)
        n = kw.get("nr_vcpus", 1)
        if not (isinstance(n, int) and n >= 1):  # the marker promises a guest ready to run
            raise BadInput("@pytest.mark.guest", "nr_vcpus", n, "must be an int >= 1 (the `vcpu` fixture runs vCPU 0)")
        if "mode" not in kw and "mode" in request.fixturenames:
            kw["mode"] = request.getfixturevalue("mode")
        try:
            v = GuestVm(kvm, m.args[0], **kw)
        except ModeUnsupported as e:
            pytest.skip(str(e))
    try:
        for cm in request.node.iter_markers("requires_vm_cap"):
            need = cm.args[1] if len(cm.args) > 1 else cm.kwargs.get("min", 1)
            have = v.check_extension(cm.args[0])
            if have < need:
                pytest.skip(f"VM reports KVM_CAP_{Cap(cm.args[0]).name} = {have} (needs >= {need})")
        yield v
    finally:
        v.close()


@pytest.fixture
def kernel_health(request: pytest.FixtureRequest) -> case_health.CaseHealth:
    """The case's kernel-health check, for cases that check mid-body: `kernel_health.assert_healthy(where)`
    judges by the same rules as the check after the body (which then does not repeat what it reported)."""
    ch = request.node.stash.get(_CASE, None)
    if ch is None:  # --kmsg=off or an unreadable log: a check that finds nothing, saying why
        ch = case_health.CaseHealth(request.config.stash[_HEALTH].oracle, None)
    return ch


@pytest.fixture
def vcpu(vm: Vm) -> Vcpu:
    """vCPU 0 of `vm` (created if the VM has none)."""
    return vm.vcpus[0] if vm.vcpus else vm.create_vcpu()


def modes(*names: str | Mode) -> Any:
    """`@modes("real", "prot32", "long64")`: parametrize the `mode` fixture with readable ids."""
    ms = [Mode(n) for n in names] if names else list(Mode)
    return pytest.mark.parametrize("mode", ms, ids=[m.value for m in ms])
