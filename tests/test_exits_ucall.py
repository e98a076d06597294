"""Exit decoding and ucall parsing on synthetic kvm_run pages and guest structs; the mailbox a guest
driver talks through, on a real guest."""

import os
import struct

import pytest

from harness.kvm import exits
from harness.kvm._cffi import ffi
from harness.kvm.errors import BadInput
from harness.lib.failures import (
    GuestAssertionError,
    GuestExceptionError,
    GuestFailure,
    UnexpectedUcall,
    describe_pf_error,
)
from harness.lib.guestvm import GuestVm, vm_with_vcpus
from harness.lib.mailbox import Mailbox
from harness.lib.ucall import ASSERT, DONE, EXCEPTION, SYNC, UCALL_SIZE, parse_ucall


def _run():
    raw = ffi.new("char[]", 4096)
    return ffi.cast("struct kvm_run *", raw), ffi.buffer(raw), raw


def test_decode_io_out_reads_data_at_offset():
    run, buf, _keep = _run()
    run.exit_reason = 2
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = 1, 4, 0x1000, 1, 0x800
    buf[0x800:0x804] = (0x6000).to_bytes(4, "little")
    ex = exits.decode(run, buf)
    assert isinstance(ex, exits.Io)
    assert (ex.port, ex.size, ex.is_write, ex.value) == (0x1000, 4, True, 0x6000)


def test_decode_mmio_keeps_full_64bit_address():
    run, buf, _keep = _run()
    run.exit_reason = 6
    run.mmio.phys_addr = 0xFFFF_FFFF_F008
    run.mmio.len = 8
    run.mmio.is_write = 1
    ffi.memmove(run.mmio.data, (0x1122334455667788).to_bytes(8, "little"), 8)
    ex = exits.decode(run, buf)
    assert isinstance(ex, exits.Mmio)
    assert ex.phys_addr == 0xFFFF_FFFF_F008
    assert (ex.len, ex.is_write, ex.value) == (8, True, 0x1122334455667788)
    # a snapshot: later changes to the page do not change the object
    run.mmio.phys_addr = 0
    assert ex.phys_addr == 0xFFFF_FFFF_F008
    assert "phys_addr=0xfffffffff008" in ex.describe()


def test_decode_memory_fault_internal_error_and_unknown():
    run, buf, _keep = _run()
    run.exit_reason = 39
    run.memory_fault.flags, run.memory_fault.gpa, run.memory_fault.size = 8, 0x1_0000_0000, 0x1000
    ex = exits.decode(run, buf)
    assert isinstance(ex, exits.MemoryFault) and ex.private and ex.gpa == 0x1_0000_0000
    run.exit_reason = 17
    run.internal.suberror, run.internal.ndata = 1, 2
    run.internal.data[0], run.internal.data[1] = 0xAA, 0xBB
    ex = exits.decode(run, buf)
    assert isinstance(ex, exits.InternalError) and ex.data == (0xAA, 0xBB)
    assert "EMULATION" in ex.describe()
    run.exit_reason = 999
    ex = exits.decode(run, buf)
    assert isinstance(ex, exits.Other) and ex.raw_reason == 999


def _ucall(cmd, args, line=0, file=b"", text=b""):
    a = list(args) + [0] * (6 - len(args))
    return struct.pack("<9Q128s1024s", cmd, len(args), *a, line, file, text)


def test_ucall_layout_size():
    assert UCALL_SIZE == 1224


def test_parse_sync():
    uc = parse_ucall(_ucall(SYNC, [1, 2, 3]), 0x6000)
    assert uc.cmd == SYNC and uc.args == (1, 2, 3) and uc.gpa == 0x6000


class _FakeVm:
    guest = None


class _FakeVcpu:
    id = 3
    vm = _FakeVm()


def test_assert_message_has_file_line_and_both_values():
    uc = parse_ucall(_ucall(ASSERT, [42, 43], 17, b"payload.c", b"x == 43"))
    msg = str(GuestAssertionError(uc, _FakeVcpu()))
    assert "payload.c:17: x == 43" in msg
    assert "left:  42 (0x2a)" in msg and "right: 43 (0x2b)" in msg
    assert "vcpu 3" in msg


def test_exception_message_decodes_page_fault():
    uc = parse_ucall(_ucall(EXCEPTION, [14, 0b1011, 0x200123, 0xDEAD000, 0x1FFF00]))
    e = GuestExceptionError(uc, _FakeVcpu())
    msg = str(e)
    assert "#PF (vector 14)" in msg and "rip=0x200123" in msg and "cr2=0xdead000" in msg
    assert "P|W|RSVD" in msg
    assert describe_pf_error(0) == "not-present read"


def test_unexpected_ucall_names_the_command_and_the_answer():
    uc = parse_ucall(_ucall(DONE, []))
    e = UnexpectedUcall(uc, "memtouch cmd 1", "SYNC")
    assert isinstance(e, GuestFailure)
    assert str(e).startswith("memtouch cmd 1: expected SYNC, the guest answered <Ucall DONE")


# ---- the mailbox on a real guest (checksum: arg = {addr, len}, SYNC(sum), then DONE) ----------------
def test_mailbox_passes_its_gpa_and_runs_to_sync_then_done(kvm):
    with GuestVm(kvm, "checksum", nr_vcpus=2) as vm:
        buf = vm.alloc(3)
        vm.write(buf, b"\1\2\3")
        mb = Mailbox(vm, 16, vcpus=vm.vcpus)
        assert [v.get_regs().rsi for v in vm.vcpus] == [mb.gpa, mb.gpa]  # guests/ABI.md: rsi = arg
        assert mb.call(buf, 3).args[0] == (1 * 31 + 2) * 31 + 3
        with pytest.raises(UnexpectedUcall, match=r"checksum cmd 0: expected SYNC, the guest answered <Ucall DONE"):
            mb.call(0)  # checksum syncs once, then its runtime reports DONE
        with pytest.raises(BadInput, match=r"words=3 do not fit the 16-byte descriptor"):
            mb.post(1, 2, 3)
        with pytest.raises(BadInput, match=r"words\[0\]=-1"):
            mb.post(-1)


def test_vm_with_vcpus_closes_the_kvm_it_opened(kvm):  # (kvm: skips where there is no KVM)
    fds = sorted(os.listdir("/proc/self/fd"))
    vm = vm_with_vcpus("checksum", mode="long64", nr_vcpus=2)
    assert [v.id for v in vm.vcpus] == [0, 1] and vm.vcpu is vm.vcpus[0]
    vm.close()
    assert sorted(os.listdir("/proc/self/fd")) == fds
