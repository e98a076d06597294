"""Fixtures `kvm`, `vm`, `vcpu`; the requirement markers; a bound on every test's KVM_RUNs.

Cases say what they need and get it or a skip with the reason:

    @pytest.mark.guest("checksum", mode="long64")
    @pytest.mark.requires_cap(Cap.USER_MEMORY2)
    def test_x(vm, vcpu): ...

What cannot be had here raises Unsupported with the reason; harness.pytest.core makes it the skip.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator

import pytest

from harness.kvm.caps import Cap
from harness.kvm.checks import seconds_arg
from harness.kvm.errors import BadInput
from harness.kvm.system import Kvm
from harness.kvm.vcpu import Vcpu
from harness.kvm.vm import Vm
from harness.kvm.watchdog import WATCHDOG
from harness.lib.guestvm import GuestVm
from harness.pytest import options
from harness.unsupported import Unsupported

# health: `_kvm_bound` depends on its `_kernel_health`, so the bound is inside the case's window
pytest_plugins = ["harness.pytest.core", "harness.pytest.health"]


def _kvm_unavailable(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this machine)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by uid {os.getuid()}"
    return None


@pytest.fixture(scope="session")
def kvm(request: pytest.FixtureRequest) -> Iterator[Kvm]:
    """The system fd; the whole session skips with the reason when there is no usable KVM."""
    path = options.kvm_dev(request.config)
    why = _kvm_unavailable(path)
    if why:
        raise Unsupported(why)
    k = Kvm(path)
    yield k
    k.close()


def _cap_name(cap: int) -> str:
    return Cap(cap).name if cap in Cap._value2member_map_ else str(cap)


def _check_requirements(item: pytest.Item, kvm: Kvm | None) -> None:
    for m in item.iter_markers("requires_sysfs"):
        path = m.args[0]
        want = m.args[1] if len(m.args) > 1 else m.kwargs.get("value")
        if not os.path.exists(path):
            raise Unsupported(f"needs {path}, which does not exist")
        if want is not None:
            with open(path) as f:
                have = f.read().strip()
            if have != str(want):
                raise Unsupported(f"needs {path} = {want}, it is {have}")
    if kvm is None:
        return
    for m in item.iter_markers("requires_cap"):
        cap = m.args[0]
        need = m.args[1] if len(m.args) > 1 else m.kwargs.get("min", 1)
        have = kvm.check_extension(cap)
        if have < need:
            raise Unsupported(f"KVM_CAP_{_cap_name(cap)} is {have} on this kernel (needs >= {need})")


@pytest.fixture(autouse=True)
def _kvm_bound(request: pytest.FixtureRequest, _kernel_health: None) -> Iterator[None]:
    """Every KVM_RUN of the test is bounded: past the bound the watchdog kicks and fails it."""
    m = request.node.get_closest_marker("kvm_timeout")
    seconds = options.kvm_timeout(request.config)
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
def case_property(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """case_property(name, value): a fact of this run in the JUnit (<property>) and KTAP reports.
    pytest's record_property does the same but warns on every use under the default junit_family
    (xunit2), one warning per case in a run without xdist (the kernel runner's guests)."""
    def add(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))
    return add


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
        v = GuestVm(kvm, m.args[0], **kw)  # ModeUnsupported: this host cannot run the mode
    try:
        for cm in request.node.iter_markers("requires_vm_cap"):
            need = cm.args[1] if len(cm.args) > 1 else cm.kwargs.get("min", 1)
            have = v.check_extension(cm.args[0])
            if have < need:
                raise Unsupported(f"VM reports KVM_CAP_{Cap(cm.args[0]).name} = {have} (needs >= {need})")
        yield v
    finally:
        v.close()


@pytest.fixture
def vcpu(vm: Vm) -> Vcpu:
    """vCPU 0 of `vm` (created if the VM has none)."""
    return vm.vcpus[0] if vm.vcpus else vm.create_vcpu()

