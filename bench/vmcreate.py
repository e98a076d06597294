"""vm_create_to_ucall: VMs/s from "create a VM" to the guest's first ucall, in long mode.

The harness side is what a case's set-up costs (`vm_with_vcpus`, the selftests'
vm_create_with_one_vcpu): open /dev/kvm, KVM_CREATE_VM, the 16 MiB boot slot, the checksum
payload's ELF, GDT and 4-level page tables, one vCPU in long mode; then a 64-byte buffer and its
descriptor in scratch memory, the argument register, and the run to the guest's SYNC with the sum.

bench/vm_create.c does the same work with plain syscalls, step for step (the harness side's
calls on the left, as strace shows them):

  Kvm()  (vm_with_vcpus opens its own)          open("/dev/kvm")
  kvm.supported_cpuid (mode check, cached)       KVM_GET_SUPPORTED_CPUID (64 entries, x2 on E2BIG)
  Vm.__init__                                    KVM_CREATE_VM
  add_memslot(0, 16 MiB)                         mmap 16 MiB anonymous, KVM_SET_USER_MEMORY_REGION
  ELF segments, GDT, page tables (Vm.write)      memcpy of the same ranges (image.bin, below)
  add_vcpu: KVM_GET_VCPU_MMAP_SIZE (cached),     the same ioctls: GET_VCPU_MMAP_SIZE, CREATE_VCPU,
    KVM_CREATE_VCPU, mmap kvm_run,               mmap, SET_CPUID2, GET_SREGS + SET_SREGS,
    SET_CPUID2, GET/SET_SREGS, GET/SET_REGS,     GET_REGS + SET_REGS twice
    set_args: GET/SET_REGS
  vm.alloc + vm.write (buffer, descriptor)       (in image.bin: written with the rest)
  vcpu.set_args(desc): GET/SET_REGS              GET_REGS + SET_REGS (the dumped regs, rsi = desc)
  run_until_ucall(): KVM_RUN, ucall decode       KVM_RUN loop to the ucall port, struct ucall read
  check SYNC and the sum                         the same check
  -- timed up to here: `vms_per_s` --
  vm.close(): vCPU munmap + close, VM fd,        the same, in the same order
    Kvm fd, munmap of the boot slot
  -- and up to here: `cycles_per_s` (secondary) --

The C program does not parse the ELF or build page tables: it copies the ranges the harness wrote
into a boot slot (bench/image.py dumps them once per run from a GuestVm built exactly like the
timed ones, with the buffer and descriptor in place), and sets the registers the harness set. So
the C side is the floor for this set-up: ioctls, page faults on the boot slot, the first entry of
the vCPU; everything above it on the harness side is Python (image load cache lookup, page-table
builder, cffi, the watchdog's deadline). Both sides make one untimed VM first (the harness starts
its watchdog thread with the first vCPU of a process).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import image
from bench.registry import BUILD_DIR, Bench, register
from harness.kvm.system import Kvm
from harness.lib.guestvm import vm_with_vcpus
from harness.lib.ucall import SYNC

PAYLOAD = "checksum"
MODE = "long64"
DATA = bytes(range(64))


def expected_sum(data: bytes) -> int:
    s = 0
    for b in data:
        s = (s * 31 + b) & (2**64 - 1)
    return s


SUM = expected_sum(DATA)


def one_vm() -> tuple[float, float]:
    """One VM from open(/dev/kvm) to its first ucall, then closed: (to_ucall, with_close) seconds."""
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    vm = vm_with_vcpus(PAYLOAD, MODE)
    try:
        buf = vm.alloc(len(DATA))
        vm.write(buf, DATA)
        desc = vm.alloc(16)
        vm.write_u64(desc, buf)
        vm.write_u64(desc + 8, len(DATA))
        vm.vcpu.set_args(desc)
        uc = vm.vcpu.run_until_ucall()
        if uc.cmd != SYNC or uc.args[0] != SUM:
            raise RuntimeError(f"checksum answered {uc!r}, expected SYNC({SUM:#x})")
        t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
    finally:
        vm.close()
    t2 = time.clock_gettime(time.CLOCK_MONOTONIC)
    return t1 - t0, t2 - t0


def harness_vm_create(n: int) -> dict[str, float]:
    one_vm()  # warm-up: the watchdog thread, the image cache
    to_ucall = total = 0.0
    for _ in range(n):
        a, b = one_vm()
        to_ucall += a
        total += b
    return {"vms_per_s": n / to_ucall, "cycles_per_s": n / total}


def _make_image(d: Path) -> None:
    kvm = Kvm()
    try:
        vm = image.RecordingGuestVm(kvm, PAYLOAD, MODE)
        try:
            buf = vm.alloc(len(DATA))
            vm.write(buf, DATA)
            desc = vm.alloc(16)
            vm.write_u64(desc, buf)
            vm.write_u64(desc + 8, len(DATA))
            vm.vcpu.set_args(desc)
            image.dump(vm, d, {"sum": SUM})
        finally:
            vm.close()
    finally:
        kvm.close()


def c_cmd(count: int) -> list[str]:
    d = image.cached_dir(("vmcreate",), _make_image)
    return [str(BUILD_DIR / "vm_create"), str(d), str(count)]


VM_CREATE_TO_UCALL = register(Bench(
    name="vm_create_to_ucall",
    label="VM create to first ucall (long64, checksum)",
    c_cmd=c_cmd,
    c_rate_key="vms_per_s",
    py=harness_vm_create,
    count_option="vms",
    default_count=200,
    target=0.5,
    secondary=("cycles_per_s",),
    unit="VMs/s",
    params={"payload": PAYLOAD, "mode": MODE, "buffer": len(DATA)},
))
