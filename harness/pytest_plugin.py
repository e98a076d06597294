"""pytest integration: fixtures `kvm`, `vm`, `vcpu`; capability markers; a bound on every test.

Loaded from the top-level conftest.py. Cases say what they need and get it or a skip with the reason:

    @pytest.mark.guest("checksum", mode="long64")
    @pytest.mark.requires_cap(Cap.USER_MEMORY2)
    def test_x(vm, vcpu): ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from harness import known_issues
from harness.caps import Cap
from harness.kvm import Kvm
from harness.vcpu import Vcpu
from harness.vm import Vm
from harness.watchdog import WATCHDOG
from harness.x86.guestvm import GuestVm, ModeUnsupported
from harness.x86.modes import Mode

DEFAULT_TEST_TIMEOUT = 60.0


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kvm-harness")
    g.addoption("--kvm-dev", default=os.environ.get("KVM_HARNESS_DEV", "/dev/kvm"),
                help="KVM device node (default /dev/kvm)")
    g.addoption("--kvm-timeout", type=float, default=DEFAULT_TEST_TIMEOUT,
                help="bound on all KVM_RUNs of one test, in seconds (default %(default)s)")


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "guest(payload, mode='long64', nr_vcpus=1, arg=0): the `vm` fixture builds a GuestVm running this payload",
        "requires_cap(cap, min=1): skip unless KVM_CHECK_EXTENSION(cap) >= min (system fd)",
        "requires_vm_cap(cap, min=1): skip unless the VM fd reports cap >= min",
        "requires_sysfs(path, value=None): skip unless the file exists (and holds value)",
        "kvm_timeout(seconds): this test's bound on KVM_RUN instead of --kvm-timeout",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Known kernel issues in force on this kernel become strict xfails of the cases they name."""
    issues = known_issues.in_force()
    if not issues:
        return
    for item in items:
        for ki in issues:
            if ki.matches(item.nodeid):
                item.add_marker(pytest.mark.xfail(reason=ki.xfail_reason(), strict=True))
                item.user_properties.append(("known_issue", ki.id))
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


@pytest.fixture(autouse=True)
def _kvm_bound(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every KVM_RUN of the test is bounded: past the bound the watchdog kicks and fails it."""
    m = request.node.get_closest_marker("kvm_timeout")
    seconds = float(m.args[0]) if m else request.config.getoption("--kvm-timeout")
    kvm = request.getfixturevalue("kvm") if "kvm" in request.fixturenames else None
    _check_requirements(request.node, kvm)
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
def vcpu(vm: Vm) -> Vcpu:
    """vCPU 0 of `vm` (created if the VM has none)."""
    return vm.vcpus[0] if vm.vcpus else vm.create_vcpu()


def modes(*names: str | Mode) -> Any:
    """`@modes("real", "prot32", "long64")`: parametrize the `mode` fixture with readable ids."""
    ms = [Mode(n) for n in names] if names else list(Mode)
    return pytest.mark.parametrize("mode", ms, ids=[m.value for m in ms])
