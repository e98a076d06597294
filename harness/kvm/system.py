"""The system fd (/dev/kvm): API version, capabilities, supported CPUID, VM creation."""

from __future__ import annotations

import contextlib
import functools
import os

from harness.kvm._cffi import ffi
from harness.kvm.caps import Cap
from harness.kvm.checks import check_uint, closed_class
from harness.kvm.cpuid import Cpuid
from harness.kvm.errors import KvmError
from harness.kvm.ioctl import kvm_ioctl
from harness.kvm.vm import Vm

KVM_API_VERSION = 12


class Kvm:
    # After close() the object is switched to closed_class(Kvm): every public method and property
    # (cached ones included) raises ClosedError, and fd is -1. VMs it made stay open: the kernel's
    # VM does not need the system fd, but their calls that need this Kvm's answers raise too.

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.closed = True  # until the fd exists
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.closed = False

    @functools.cached_property
    def api_version(self) -> int:
        return kvm_ioctl(self.fd, "KVM_GET_API_VERSION", 0, "")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 when absent, else the capability's value."""
        cap = check_uint("Kvm.check_extension", "cap", cap, 64)
        return kvm_ioctl(self.fd, "KVM_CHECK_EXTENSION", cap, lambda: f"cap={_capname(cap)}")

    def capabilities(self) -> dict[str, int]:
        """Every named capability with its value (absent ones included, as 0)."""
        return {c.name: self.check_extension(c) for c in Cap}

    @functools.cached_property
    def vcpu_mmap_size(self) -> int:
        return kvm_ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE", 0, "")

    @functools.cached_property
    def supported_cpuid(self) -> Cpuid:
        return self._get_cpuid("KVM_GET_SUPPORTED_CPUID")

    @functools.cached_property
    def emulated_cpuid(self) -> Cpuid:
        return self._get_cpuid("KVM_GET_EMULATED_CPUID")

    def _get_cpuid(self, name: str) -> Cpuid:
        n = 64
        while True:
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
            c = ffi.cast("struct kvm_cpuid2 *", raw)
            c.nent = n
            try:
                kvm_ioctl(self.fd, name, c, lambda n=n: f"nent={n}")
            except KvmError as e:
                if e.errno == 7 and n < 4096:  # E2BIG: the table is larger, ask again
                    n *= 2
                    continue
                raise
            return Cpuid.from_cdata(c)

    @functools.cached_property
    def maxphyaddr(self) -> int:
        return self.supported_cpuid.maxphyaddr

    @functools.cached_property
    def msr_index_list(self) -> list[int]:
        n = 1024
        raw = ffi.new("char[]", 4 + 4 * n)
        m = ffi.cast("struct kvm_msr_list *", raw)
        m.nmsrs = n
        kvm_ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", m, f"nmsrs={n}")
        return [m.indices[i] for i in range(m.nmsrs)]

    @functools.cached_property
    def vm_types(self) -> list[int]:
        """VM types KVM_CREATE_VM accepts (bit N of KVM_CAP_VM_TYPES = type N; 0 when absent)."""
        mask = self.check_extension(Cap.VM_TYPES) or 1
        return [t for t in range(32) if mask & (1 << t)]

    def create_vm(self, vm_type: int = 0) -> Vm:
        return Vm(self, vm_type)

    def close(self) -> None:
        """Close the system fd (idempotent); the object then raises ClosedError on every method."""
        if self.closed:
            return
        self.closed = True
        fd, self._fd_was, self.fd = self.fd, self.fd, -1
        self.__class__ = closed_class(type(self))
        os.close(fd)

    def _closed_what(self) -> str:
        return f"Kvm({self.path}, fd={self.__dict__.get('_fd_was', self.__dict__.get('fd', '?'))})"

    def __del__(self) -> None:
        # dropped without close(): the fd goes now, not at exit
        if self.__dict__.get("closed") is False:
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        return f"<{self._closed_what()}{'' if self.__dict__.get('closed') is False else ' closed'}>"

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _capname(cap: int) -> str:
    try:
        return Cap(cap).name
    except ValueError:
        return str(int(cap))
