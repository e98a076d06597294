"""System, VM and vCPU fds: API version, capabilities, lifetimes, and errors that name the ioctl."""

import errno

import psutil
import pytest

from harness.kvm.caps import Cap
from harness.kvm.errors import KvmError
from harness.kvm.ioctl import kvm_ioctl, raw_ioctl
from harness.kvm.ioctls import IOCTLS


def test_api_version(kvm):
    assert kvm.api_version == 12


def test_check_extension_known_and_unknown(kvm):
    assert kvm.check_extension(Cap.USER_MEMORY) == 1
    assert kvm.check_extension(Cap.NR_MEMSLOTS) >= 32
    assert kvm.check_extension(Cap.IMMEDIATE_EXIT) == 1
    # KVM answers 0 for a capability number it has never heard of
    assert kvm.check_extension(0x7FFF_FFF0) == 0


def test_vm_fd_check_extension_agrees(kvm, vm):
    assert vm.check_extension(Cap.NR_MEMSLOTS) == kvm.check_extension(Cap.NR_MEMSLOTS)


def test_vcpu_mmap_size_and_cpuid(kvm):
    assert kvm.vcpu_mmap_size >= 4096 and kvm.vcpu_mmap_size % 4096 == 0
    assert 36 <= kvm.maxphyaddr <= 52
    assert kvm.supported_cpuid.vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls")


def test_100_vms_do_not_leak_fds(kvm):
    proc = psutil.Process()
    before = proc.num_fds()
    for _ in range(100):
        with kvm.create_vm() as vm:
            vm.create_vcpu()
            vm.add_memslot(0, 1 << 20)
    assert proc.num_fds() == before


def test_duplicate_vcpu_id_is_eexist(vm):
    vm.create_vcpu(0)
    with pytest.raises(KvmError) as ei:
        vm.create_vcpu(0)
    assert ei.value.errno == errno.EEXIST
    assert "KVM_CREATE_VCPU(id=0) -> EEXIST" in str(ei.value)


@pytest.mark.parametrize("fdkind", ["system", "vm", "vcpu"])
def test_bogus_ioctl_raises_named_kvmerror(kvm, vm, fdkind):
    fd = {"system": lambda: kvm.fd, "vm": lambda: vm.fd, "vcpu": lambda: vm.create_vcpu().fd}[fdkind]()
    # an ioctl number no KVM fd knows
    bogus = 0xAEFF
    with pytest.raises(KvmError) as ei:
        raw_ioctl(fd, bogus, 0, name="KVM_BOGUS_0xff")
    assert ei.value.errno in (errno.ENOTTY, errno.EINVAL)
    assert "KVM_BOGUS_0xff" in str(ei.value)
    # a real ioctl issued on the wrong kind of fd is refused and named too
    wrong = next(n for n, io in IOCTLS.items() if fdkind not in io.fd and io.ctype is None and n != "KVM_RUN"
                 and n != "KVM_CREATE_VM")
    with pytest.raises(KvmError) as ei:
        kvm_ioctl(fd, wrong, 0, "probe")
    assert str(ei.value).startswith(f"{wrong}(probe) -> ")


def test_kvm_run_without_guest_state_on_wrong_fd(vm):
    with pytest.raises(KvmError) as ei:
        kvm_ioctl(vm.fd, "KVM_RUN", 0, "on a vm fd")
    assert ei.value.ioctl == "KVM_RUN"
