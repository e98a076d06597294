"""Every guest mode runs a payload, reports through ucall, and fails readably when it goes wrong."""

import random
import re
import time

import pytest

from harness.kvm.exits import Mmio
from harness.lib.failures import GuestAssertionError, GuestExceptionError, VcpuTimeout
from harness.lib.mailbox import Mailbox
from harness.lib.ucall import DONE, SYNC
from harness.pytest.plugin import modes
from harness.x86.modes import Mode

MASK64 = (1 << 64) - 1


def checksum(data: bytes) -> int:
    s = 0
    for b in data:
        s = (s * 31 + b) & MASK64
    return s


@modes("real", "prot32", "pae32", "long64", "long64-la57")
def test_checksum_in_every_mode(kvm, mode):
    from harness.lib.guestvm import GuestVm, ModeUnsupported

    rng = random.Random(0x5EED)
    data = bytes(rng.randrange(256) for _ in range(3000))
    payload = "real_checksum" if mode is Mode.REAL else "checksum"
    try:
        vm = GuestVm(kvm, payload, mode)
    except ModeUnsupported as e:
        pytest.skip(str(e))
    with vm:
        if mode is Mode.REAL:
            vm.write(0x7000, len(data).to_bytes(2, "little"))
            vm.write(0x7010, data)
        else:
            buf = vm.alloc(len(data))
            vm.write(buf, data)
            Mailbox(vm, 16, vcpus=vm.vcpus).post(buf, len(data))
        uc = vm.vcpu.run_until_ucall()
        assert uc.cmd == SYNC, uc
        assert uc.args[0] == checksum(data), f"guest {uc.args[0]:#x} != host {checksum(data):#x}"
        assert vm.vcpu.run_until_ucall().cmd == DONE


@pytest.mark.guest("assert_fail")
def test_failed_guest_assert_shows_file_line_and_values(vcpu):
    with pytest.raises(GuestAssertionError) as ei:
        vcpu.run_until_ucall()
    msg = str(ei.value)
    assert "assert_fail.c:" in msg
    assert ei.value.ucall.line > 0
    assert ei.value.ucall.args[:2] == (42, 43)
    assert "42 (0x2a)" in msg and "43 (0x2b)" in msg


@modes("prot32", "long64")
@pytest.mark.guest("exceptions", arg=0)
def test_guest_ud2_reports_vector_and_rip(vm, vcpu, mode):
    with pytest.raises(GuestExceptionError) as ei:
        vcpu.run_until_ucall()
    e = ei.value
    assert e.vector == 6
    assert "#UD" in str(e)
    # the faulting rip is inside the payload, symbolized
    lo, hi = vm.guest.extent
    assert lo <= e.rip < hi
    assert " in exceptions." in str(e)
    code = vm.read(e.rip, 2)
    assert code == b"\x0f\x0b", f"rip {e.rip:#x} does not point at ud2 ({code.hex()})"


@pytest.mark.guest("exceptions", arg=1, mode="long64")
def test_guest_page_fault_reports_cr2(vcpu):
    with pytest.raises(GuestExceptionError) as ei:
        vcpu.run_until_ucall()
    e = ei.value
    assert e.vector == 14
    assert e.cr2 == 0x7FFF00000000
    assert e.error_code & 1 == 0  # not-present
    assert "#PF" in str(e) and "cr2=0x7fff00000000" in str(e)


@modes("prot32", "long64")
@pytest.mark.guest("exceptions", arg=2)
def test_guest_handler_can_resume(vcpu, mode):
    uc = vcpu.run_until_ucall()
    assert uc.cmd == SYNC and uc.args[0] == 0x600D


@pytest.mark.guest("exceptions", arg=3, mode="long64")
def test_guest_divide_error(vcpu):
    with pytest.raises(GuestExceptionError) as ei:
        vcpu.run_until_ucall()
    assert ei.value.vector == 0


@pytest.mark.guest("spin", mode="long64")
def test_spinning_guest_is_stopped_by_watchdog(vcpu):
    t0 = time.monotonic()
    with pytest.raises(VcpuTimeout) as ei:
        vcpu.run_until_ucall(timeout=1.0)
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    # The watchdog collects its hang diagnostics (threads, a ptrace helper process, stats over 0.1 s)
    # before it kicks: 0.2 s here, seconds in a TCG guest (7.4 s once, where Python starts ~15x
    # slower). The bound is on the watchdog, not on them: the time they took comes off.
    took = re.search(r"\(collected in: ([^)]*)\)", msg)
    assert took, msg
    collected = sum(float(t) for t in re.findall(r" ([0-9.]+) s", took.group(1)))
    assert 0.9 <= elapsed - collected < 3.0, (elapsed, took.group(0))
    assert "no ucall within 1 s" in msg
    assert "rip=" in msg and "spin" in msg  # registers after the kick, rip symbolized into the payload


@pytest.mark.guest("printf", mode="long64")
def test_guest_printf(vcpu):
    uc = vcpu.run_until_ucall(stop_on_printf=True)
    assert uc.text == "hello 42 kvm 0xdeadbeefcafe"


# "top" is the last page below 2^MAXPHYADDR, which varies between hosts (48 on one CPU, 46 on another):
# a fixed 0xFFFF_FFFF_F000 is beyond the guest's physical address width on the latter.
@pytest.mark.parametrize("gpa", [0x1_0000_0000, 0xF_FFFF_FFF0, 0x100_0000_0000, "top"],
                         ids=lambda g: f"gpa={g:#x}" if isinstance(g, int) else f"gpa={g}")
@pytest.mark.guest("mmio", mode="long64")
def test_long64_mmio_read_above_4g(kvm, vm, vcpu, gpa):
    """A read of an unbacked GPA above 4 GiB exits as MMIO with the exact 64-bit address."""
    if gpa == "top":
        gpa = (1 << kvm.maxphyaddr) - 0x1000
    page = gpa & ~0xFFF
    gva = 0x40000000 + (gpa & 0xFFF)
    vm.map(0x40000000, page, 0x1000)
    mb = Mailbox(vm, 32)
    value = 0x1122334455667788 ^ gpa
    seen = []

    def on_mmio(v, ex):
        if isinstance(ex, Mmio):
            seen.append((ex.phys_addr, ex.len, ex.is_write))
            v.complete_mmio(value)
            return True
        return False

    uc = mb.call(gva, 8, on_exit=on_mmio, what=f"mmio read of gva {gva:#x}")  # (gva, width): one read
    assert seen == [(gpa, 8, False)], [(hex(a), n, w) for a, n, w in seen]
    assert uc.args[0] == value
    mb.finish()  # width 0 ends the payload
