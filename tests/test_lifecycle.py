"""Use after close and objects dropped without close, against the real /dev/kvm.

A closed Kvm/Vm/Vcpu raises ClosedError on every public method (its fd number may already belong to
another VM, its memory may be unmapped); closing a VM closes its vCPUs; one dropped without close()
gives its fds and mappings back at once, by reference counting alone (no Vm <-> Vcpu cycle).
"""

from __future__ import annotations

import errno
import gc
import inspect
import os
import time
from collections.abc import Iterator

import pytest

from harness.health.leaks import open_fds
from harness.kvm.errors import ClosedError, KvmError
from harness.kvm.system import Kvm
from harness.kvm.vcpu import Vcpu
from harness.kvm.vm import Vm
from harness.kvm.watchdog import WATCHDOG
from harness.lib.guestvm import GuestVcpu, GuestVm

CODE_GPA = 0x200000
SPIN = bytes([0xEB, 0xFE])  # jmp . : a guest that only moves if someone runs it


_fds = open_fds  # fd -> what it points at


def _vcpu_maps() -> int:
    """kvm_run mappings of this process (one per open vCPU)."""
    with open("/proc/self/maps") as f:
        return sum("anon_inode:kvm-vcpu" in line for line in f)


def _spinning_vm(kvm: Kvm) -> tuple[Vm, Vcpu]:
    """A VM whose vCPU 0 would run a real-mode `jmp .` at CODE_GPA (its RIP moves if it ever runs)."""
    vm = kvm.create_vm()
    vm.add_memslot(0, 4 << 20, slot=0)
    vm.write(CODE_GPA, SPIN)
    v = vm.create_vcpu()
    s = v.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    v.set_sregs(s)
    r = v.get_regs()
    r.rip, r.rflags = CODE_GPA, 2
    v.set_regs(r)
    return vm, v


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Prove release by reference counting: the cyclic collector does not run in the test."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---- use after close ------------------------------------------------------------------------------
def test_closed_vm_and_vcpu_do_not_reach_the_vm_that_reuses_their_fds(kvm):
    """The issue's scenario: close VM A, create VM B (same fd numbers). A's vCPU must not run B's
    guest, A must not add a slot to B, A's memory must not be read."""
    a, va = _spinning_vm(kvm)
    a_fd, va_fd = a.fd, va.fd
    a.close()
    b, vb = _spinning_vm(kvm)
    try:
        assert (b.fd, vb.fd) == (a_fd, va_fd), "the kernel did not reuse the fd numbers: the test proves nothing"
        rip0 = vb.get_regs().rip
        with pytest.raises(ClosedError, match=rf"Vcpu\(id=0, fd={va_fd}\) of Vm\(fd={a_fd}\) is closed: run\(\)"):
            va.run()
        assert vb.get_regs().rip == rip0 == CODE_GPA, "A's run() ran B's guest"
        assert vb.exit_count == 0

        before = b.memslot_snapshot()
        with pytest.raises(ClosedError, match=rf"Vm\(fd={a_fd}\) is closed: add_memslot\(\) after close\(\)"):
            a.add_memslot(1 << 32, 1 << 20, slot=5)
        assert b.memslots == before
        with pytest.raises(KvmError) as ei:  # deleting slot 5 in B: it must not exist in the kernel
            b.set_user_memory_region(5, 0, 0, 0)
        assert ei.value.errno == errno.EINVAL

        for call in (lambda: a.read(CODE_GPA, 2), lambda: a.read_u64(CODE_GPA), lambda: a.write(CODE_GPA, b"x")):
            with pytest.raises(ClosedError):
                call()
        assert b.read(CODE_GPA, 2) == SPIN
        assert a.fd == -1 and va.fd == -1 and a.closed and va.closed
    finally:
        b.close()


def _public(cls: type) -> list[str]:
    return [n for n in dir(cls) if not n.startswith("_") and n != "close"
            and (callable(inspect.getattr_static(cls, n)) or isinstance(inspect.getattr_static(cls, n), property)
                 or hasattr(inspect.getattr_static(cls, n), "__set_name__"))]


def _call(obj: object, name: str) -> None:
    attr = getattr(obj, name)  # a property raises here
    if callable(attr):
        attr()  # arguments do not matter: the closed object refuses before looking at them


@pytest.mark.parametrize("cls", [Kvm, Vm, Vcpu, GuestVm, GuestVcpu], ids=lambda c: c.__name__)
def test_every_public_method_raises_after_close(kvm, cls):
    """Enumerated from the open class, so a method added later is covered too."""
    if cls is Kvm:
        obj: object = Kvm()
    elif cls is Vm:
        obj = kvm.create_vm()
    elif cls is GuestVm:
        obj = GuestVm(kvm, "checksum")
    elif cls is GuestVcpu:
        vm = GuestVm(kvm, "checksum")
        obj = vm.vcpu
        vm.close()
    else:
        vm = kvm.create_vm()
        obj = vm.create_vcpu()
        vm.close()  # closing the VM closes its vCPUs
    obj.close()  # type: ignore[attr-defined]
    obj.close()  # type: ignore[attr-defined]  # idempotent
    names = _public(cls)
    usable = set(getattr(cls, "_USABLE_WHEN_CLOSED", ()))
    assert usable <= {"in_run", "vm"}, "only state the watchdog and race engine read may stay usable"
    checked = []
    for name in names:
        if name in usable:
            continue
        with pytest.raises(ClosedError, match=rf"is closed: {name}(\(\))? after close\(\)"):
            _call(obj, name)
        checked.append(name)
    assert len(checked) >= {"Kvm": 10, "Vm": 36, "Vcpu": 22, "GuestVm": 42, "GuestVcpu": 25}[cls.__name__], checked
    assert obj.fd == -1  # type: ignore[attr-defined]
    with pytest.raises(ClosedError, match=r"__enter__"), obj:  # type: ignore[attr-defined]
        pass
    assert isinstance(obj, cls) and type(obj).__name__ == cls.__name__


def test_closing_a_vm_unmaps_and_closes_its_vcpus(kvm):
    fds0, maps0 = _fds(), _vcpu_maps()
    vm = kvm.create_vm()
    vcpus = [vm.create_vcpu() for _ in range(3)]
    vcpus[0].stats()  # its stats fd goes too
    assert _vcpu_maps() == maps0 + 3
    vm.close()
    assert _vcpu_maps() == maps0, "a closed VM's vCPUs kept their kvm_run mapping"
    assert _fds() == fds0
    for v in vcpus:
        assert v.closed and v.fd == -1 and not v.in_run
        with pytest.raises(ClosedError, match=r"closed with its Vm\(fd="):
            v.get_regs()


def test_closed_kvm_raises_even_for_cached_answers():
    k = Kvm()
    assert k.api_version == 12  # cached from now on
    k.close()
    with pytest.raises(ClosedError, match=r"Kvm\(/dev/kvm, fd=\d+\) is closed: api_version after close\(\)"):
        _ = k.api_version
    with pytest.raises(ClosedError, match="create_vm"):
        k.create_vm()
    with pytest.raises(ClosedError, match="is closed: Vm"):
        Vm(k)


def test_close_inside_a_deadline_and_the_watchdog(kvm):
    """A vCPU closed while its deadline is active: the watchdog still expires it (it reads the
    closed vCPU's state and must not call its methods), and the vCPU says it is closed."""
    vm, v = _spinning_vm(kvm)
    reason = f"short bound {id(v)}"
    with v.deadline(0.05, reason):
        vm.close()
        end = time.monotonic() + 15  # a tick every 20 ms, then the (bounded) diagnostics
        while not any(reason in e for e in WATCHDOG.expired_log) and time.monotonic() < end:
            time.sleep(0.02)
    assert any(reason in e for e in WATCHDOG.expired_log), "the watchdog stopped expiring deadlines"
    with pytest.raises(ClosedError):
        v.run()
    assert WATCHDOG._thread is not None and WATCHDOG._thread.is_alive()


# ---- dropped without close --------------------------------------------------------------------------
def test_50_dropped_vms_leak_no_fd_and_no_mapping(kvm, no_gc):
    fds0, maps0 = _fds(), _vcpu_maps()
    for _ in range(50):
        vm = kvm.create_vm()
        vm.create_vcpu().stats()
        vm.add_memslot(0, 1 << 20)
        vm.stats()
    del vm
    assert _vcpu_maps() == maps0
    assert _fds() == fds0, "dropped VMs kept fds (a reference cycle waiting for the collector?)"


def test_dropped_guest_vms_leak_nothing_without_the_collector(kvm, no_gc):
    """GuestVm's page tables refer back to it: weakly, or every dropped GuestVm waits for gc."""
    fds0, maps0 = _fds(), _vcpu_maps()
    for _ in range(10):
        g = GuestVm(kvm, "checksum", nr_vcpus=2)
        assert g.pt is not None
    del g
    assert (_fds(), _vcpu_maps()) == (fds0, maps0)


class _Device:
    """Something a VM owns that refers back to it (as a guest_memfd backing keeps its .vm)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.fd = os.memfd_create("kvm-harness-test-device", os.MFD_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def test_a_cycle_through_an_owned_resource_is_released_by_the_collector(kvm, no_gc):
    """VM -> owned device -> VM is a cycle only the collector frees; __del__ then closes all."""
    fds0, maps0 = _fds(), _vcpu_maps()
    vm = kvm.create_vm()
    vm.create_vcpu()
    vm.own(_Device(vm))
    del vm
    assert _fds() != fds0  # the cycle keeps it (what the weak Vcpu.vm avoids for vCPUs)
    gc.collect()
    assert (_fds(), _vcpu_maps()) == (fds0, maps0)


def test_vcpu_kept_after_its_vm_was_dropped_says_why(kvm):
    def make() -> Vcpu:
        return kvm.create_vm().create_vcpu()

    maps0 = _vcpu_maps()
    v = make()
    assert _vcpu_maps() == maps0, "the dropped VM left its vCPU's kvm_run mapped"
    with pytest.raises(ClosedError, match="dropped without close"):
        v.get_regs()
    with pytest.raises(ClosedError, match="keep a reference to the Vm"):
        _ = v.vm


def test_dropped_kvm_closes_its_fd(no_gc):
    fds0 = _fds()
    for _ in range(20):
        k = Kvm()
        assert k.api_version == 12
    del k
    assert _fds() == fds0


def test_vcpus_of_a_live_vm_stay_open(kvm, no_gc):
    """vCPUs live as long as their VM lists them (the weak back-reference must not drop them)."""
    vm = kvm.create_vm()
    try:
        for i in range(4):
            vm.create_vcpu(i)
        gc.collect()
        assert [v.id for v in vm.vcpus] == [0, 1, 2, 3]
        assert all(not v.closed and v.vm is vm for v in vm.vcpus)
        assert vm.vcpus[3].get_regs() is not None
    finally:
        vm.close()
