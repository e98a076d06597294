"""The vCPU fast path (kh_run_fast) against the real /dev/kvm: exits absorbed in C are exactly the
ones asked for, counted, and the loop stays bounded by the watchdog.

Each guest is a few real-mode bytes at CODE_GPA, so what an absorbed exit carried is known.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from harness.kvm.errors import BadInput, VcpuTimeout
from harness.kvm.exits import Io, Mmio
from harness.kvm.system import Kvm
from harness.kvm.vcpu import Vcpu
from harness.kvm.vm import Vm
from harness.lib.guestvm import GuestVm
from harness.lib.ucall import UCALL_PORT
from harness.x86.modes import Mode

CODE_GPA = 0x1000
MEM = 0x10000
MMIO_SEG = 0x2000  # DS: linear 0x20000 + offset, above the only memslot: MMIO
OUT_80 = bytes([0xE6, 0x80, 0xEB, 0xFC])  # out %al, $0x80 ; jmp .-2


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    yield k
    k.close()


def _real_mode(kvm: Kvm, code: bytes, *, rax: int = 0, ds: int = 0) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm()
    vm.add_memslot(0, MEM)
    vm.write(CODE_GPA, code)
    v = vm.create_vcpu()
    s = v.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    s.ds.base, s.ds.selector = ds << 4, ds
    v.set_sregs(s)
    r = v.get_regs()
    r.rip, r.rflags, r.rax = CODE_GPA, 2, rax
    v.set_regs(r)
    return vm, v


def test_absorbed_outs_are_counted_and_the_last_one_returned(kvm: Kvm) -> None:
    vm, v = _real_mode(kvm, OUT_80, rax=0x5A)
    try:
        v.absorb_out(0x80)
        ex = v.run_absorbing(1000)
        got = v.absorbed_exits()
        assert type(ex) is Io and ex.port == 0x80 and ex.data == b"\x5a"
        assert got["pio_out"] == got["absorbed"] == 1000
        assert got["last_out"] == 0x5A
        assert got["kvm_run_returns"] == 1000  # one KVM_RUN per exit: nothing skipped, nothing extra
        assert v.exit_count == 1  # one run() call from Python
    finally:
        vm.close()


def test_an_exit_not_asked_for_leaves_the_fast_path(kvm: Kvm) -> None:
    # out 0x80 three times (dec %cx ; jnz), then out 0x81, then hlt
    code = bytes([
        0xB9, 0x03, 0x00,  # mov $3, %cx
        0xE6, 0x80,        # 1: out %al, $0x80
        0x49,              # dec %cx
        0x75, 0xFB,        # jnz 1b
        0xE6, 0x81,        # out %al, $0x81
        0xF4,              # hlt
    ])
    vm, v = _real_mode(kvm, code, rax=7)
    try:
        v.absorb_out(0x80)
        ex = v.run()
        assert type(ex) is Io and ex.port == 0x81, ex
        assert v.absorbed_exits()["pio_out"] == 3
        v.absorb_out()  # off: the next OUT to 0x80 would come back to Python
        assert v.absorbed_exits()["pio_out"] == 3
    finally:
        vm.close()


def test_mmio_in_the_window_completes_in_c(kvm: Kvm) -> None:
    # mov (0x10), %ax (MMIO read at 0x20010) ; out %al, $0x80 ; mov %ax, (0x20) (MMIO write) ; hlt
    code = bytes([0xA1, 0x10, 0x00, 0xE6, 0x80, 0xA3, 0x20, 0x00, 0xF4])
    vm, v = _real_mode(kvm, code, ds=MMIO_SEG)
    try:
        v.absorb_mmio(0x20000, 0x21000, read_value=0xBEEF)
        v.absorb_out(0x80)
        ex = v.run()
        got = v.absorbed_exits()
        assert (got["mmio_reads"], got["mmio_writes"], got["pio_out"]) == (1, 1, 1), got
        assert got["last_out"] == 0xEF  # the read's value reached the guest (al)
        assert type(ex).__name__ == "Hlt", ex
        # outside the window the exit is Python's again
        v.absorb_mmio(0x30000, 0x31000)
        r = v.get_regs()
        r.rip = CODE_GPA
        v.set_regs(r)
        ex = v.run()
        assert type(ex) is Mmio and ex.phys_addr == 0x20010 and not ex.is_write, ex
    finally:
        vm.close()


def test_an_endless_absorbed_loop_is_bounded_by_the_watchdog(kvm: Kvm) -> None:
    vm, v = _real_mode(kvm, OUT_80)
    try:
        v.absorb_out(0x80)
        t0 = time.monotonic()
        with pytest.raises(VcpuTimeout), v.deadline(0.3, "absorbed loop bound"):
            while time.monotonic() - t0 < 5:  # budget 0: only the kick ends a run()
                assert type(v.run()).__name__ == "Intr"
        assert time.monotonic() - t0 < 5
        assert v.absorbed_exits()["pio_out"] > 0
    finally:
        vm.close()


def test_in_run_flag_is_set_exactly_inside_kvm_run(kvm: Kvm) -> None:
    vm, v = _real_mode(kvm, bytes([0xEB, 0xFE]))  # jmp .
    try:
        flag = v.in_run_flag
        assert flag[0] == 0
        seen = []
        t = threading.Thread(target=lambda: seen.append(_run_bounded(v)), daemon=True)
        t.start()
        deadline = time.monotonic() + 5
        while flag[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert flag[0] == 1
        v.kick()
        t.join(5)
        assert not t.is_alive() and flag[0] == 0 and seen == ["intr"]
    finally:
        vm.close()


def _run_bounded(v: Vcpu) -> str:
    with v.deadline(10, "in_run flag test"):
        return type(v.run()).__name__.lower()


def test_bad_input_is_refused(kvm: Kvm) -> None:
    vm, v = _real_mode(kvm, OUT_80)
    try:
        with pytest.raises(BadInput, match="more than 8 ports"):
            v.absorb_out(*range(9))
        with pytest.raises(BadInput, match="port"):
            v.absorb_out(0x10000)
        with pytest.raises(BadInput, match="below lo"):
            v.absorb_mmio(0x2000, 0x1000)
    finally:
        vm.close()
    gvm = GuestVm(kvm, "checksum", Mode.LONG64)
    try:
        with pytest.raises(BadInput, match="ucall port"):
            gvm.vcpus[0].absorb_out(0x80, UCALL_PORT)
    finally:
        gvm.close()
