"""Bad input is the harness's own named error, raised before the kernel (or mmap, or cffi) sees it.

BadInput names where, the argument and its value; nothing is created, mapped or issued, so the
kernel's memslot table is checked unchanged after each. Values that fit the uapi's fields but are
the kernel's to judge (cases/test_memslots.py::test_bad_input) still reach it and come back as
KvmError. Also: command-line options, `python -m harness info` as non-root, and a run whose every
case skipped.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import memory
from harness.kvm.errors import BadInput, HarnessError, KvmError
from harness.kvm.vm import Vm
from harness.lib.guestvm import MAX_VCPUS, GuestVm
from harness.lib.run import run_until_ucall
from harness.memory.backings import AnonBacking
from harness.memory.hostmem import Mapping

ROOT = Path(__file__).resolve().parent.parent
SLOT, GPA, SIZE = 3, 1 << 32, 2 << 20


def _raw_delete(vm: Vm, slot: int) -> int:
    """Delete `slot` behind the harness's back: 0 if it existed in the kernel, else the errno."""
    try:
        vm.set_user_memory_region(slot, 0, 0, 0)
    except KvmError as e:
        return e.errno
    vm.memslots.pop(slot, None)
    return 0


def _assert_kernel_unchanged(vm: Vm, before: dict, absent: tuple[int, ...]) -> None:
    """The harness table is `before` and the kernel agrees: each slot re-issued unchanged is a
    no-op (a difference would be EINVAL or a move), and the ids a refused call named do not exist."""
    assert vm.memslots == before, f"slot table changed: {vm.memslots} != {before}"
    for m in before.values():
        vm.set_user_memory_region(m.slot, m.gpa, m.size, m.hva, m.flags)
    for sid in absent:
        assert _raw_delete(vm, sid) == errno.EINVAL, f"slot {sid} exists in the kernel after a refused call"


@pytest.fixture
def slotted(kvm) -> Any:
    vm = kvm.create_vm()
    mem = vm.own(Mapping(16 << 20))
    vm.add_memslot(GPA, SIZE, slot=SLOT, backing=mem)
    try:
        yield vm, mem
    finally:
        vm.close()


# (id, call, argument the message must name, text it must say)
MEMSLOT_BAD: list[tuple[str, Callable[[Vm, Mapping], Any], str, str]] = [
    ("slot-2**40", lambda vm, m: vm.add_memslot(1 << 34, 4096, slot=1 << 40), "slot=1099511627776",
     "KVM_CAP_NR_MEMSLOTS"),
    ("slot-2**32-raw", lambda vm, m: vm.set_user_memory_region(1 << 32, 1 << 34, 4096, m.addr), "slot=4294967296",
     "u32"),
    ("slot-2**40-raw2", lambda vm, m: vm.set_user_memory_region2(1 << 40, 1 << 34, 4096, m.addr), "slot=", "u32"),
    ("slot-negative", lambda vm, m: vm.add_memslot(1 << 34, 4096, slot=-1), "slot=-1", "u32"),
    ("slot-not-int", lambda vm, m: vm.add_memslot(1 << 34, 4096, slot="1"), "slot='1'", "int"),
    ("size-negative", lambda vm, m: vm.add_memslot(1 << 34, -4096), "size=-4096", "> 0"),
    ("size-negative-backed", lambda vm, m: vm.add_memslot(1 << 34, -4096, slot=9, backing=m), "memslot 9", "> 0"),
    ("size-zero", lambda vm, m: vm.add_memslot(1 << 34, 0, slot=9), "memslot 9: size=0", "> 0"),
    ("size-unaligned-own-mmap", lambda vm, m: vm.add_memslot(1 << 34, 0x1800, slot=9), "size=6144",
     "multiple of the page size"),
    ("size-past-backing", lambda vm, m: vm.add_memslot(1 << 34, 32 << 20, slot=9, backing=m), "size=",
     "does not fit the backing"),
    ("offset-negative", lambda vm, m: vm.add_memslot(1 << 34, 4096, slot=9, backing=m, offset=-4096),
     "offset=-4096", ">= 0"),
    ("gpa-negative", lambda vm, m: vm.add_memslot(-4096, 4096, slot=9), "gpa=-4096", "u64"),
    ("gpa-2**64", lambda vm, m: vm.add_memslot(1 << 64, 4096, slot=9), "gpa=18446744073709551616", "u64"),
    ("gpa-negative-raw", lambda vm, m: vm.set_user_memory_region(9, -1, 4096, m.addr), "gpa=-1", "u64"),
    ("size-negative-raw", lambda vm, m: vm.set_user_memory_region(9, 1 << 34, -4096, m.addr), "size=-4096", "u64"),
    ("hva-negative-raw", lambda vm, m: vm.set_user_memory_region(9, 1 << 34, 4096, -1), "hva=-1", "u64"),
    ("flags-2**32-raw", lambda vm, m: vm.set_user_memory_region(9, 1 << 34, 4096, m.addr, 1 << 32), "flags=",
     "u32"),
    ("gmem-fd-negative-raw2", lambda vm, m: vm.set_user_memory_region2(9, 1 << 34, 4096, m.addr, 0, -1),
     "guest_memfd=-1", "u32"),
    ("gmem-offset-negative-raw2", lambda vm, m: vm.set_user_memory_region2(9, 1 << 34, 4096, m.addr, 0, 0, -1),
     "guest_memfd_offset=-1", "u64"),
    ("closed-backing", lambda vm, m: vm.add_memslot(1 << 34, 4096, slot=9, backing=_closed_backing()), "backing=",
     "no host mapping"),
    ("move-negative", lambda vm, m: vm.move_memslot(SLOT, -(1 << 20)), f"memslot {SLOT}: new_gpa=", "u64"),
    ("flags-negative", lambda vm, m: vm.set_memslot_flags(SLOT, -1), f"memslot {SLOT}: flags=-1", "u32"),
    ("resize-zero", lambda vm, m: vm.resize_memslot(SLOT, 0), f"memslot {SLOT}: new_size=0", "> 0"),
    ("resize-past-backing", lambda vm, m: vm.resize_memslot(SLOT, 32 << 20), f"memslot {SLOT}: new_size=",
     "does not fit"),
    ("delete-unknown", lambda vm, m: vm.delete_memslot(9), "slot=9", "not a memslot of this VM"),
    ("dirty-log-unknown", lambda vm, m: vm.get_dirty_log(9), "slot=9", "not a memslot of this VM"),
    ("read-negative-size", lambda vm, m: vm.read(GPA, -1), "size=-1", ">= 0"),
    ("read-negative-gpa", lambda vm, m: vm.read(-8, 8), "gpa=-8", "u64"),
    ("write-not-bytes", lambda vm, m: vm.write(GPA, 5), "data='int'", "bytes-like"),
]


def _closed_backing() -> AnonBacking:
    b = AnonBacking(4096)
    b.close()
    return b


@pytest.mark.parametrize(("call", "arg", "need"), [pytest.param(c, a, n, id=i) for i, c, a, n in MEMSLOT_BAD])
def test_bad_memslot_input_is_refused_before_the_kernel(slotted, call, arg, need):
    vm, mem = slotted
    before = vm.memslot_snapshot()
    owned = len(vm._owned)
    with pytest.raises(BadInput) as ei:
        call(vm, mem)
    msg = str(ei.value)
    assert arg in msg and need in msg, msg
    assert isinstance(ei.value, HarnessError) and isinstance(ei.value, ValueError)
    assert len(vm._owned) == owned, "memory was mapped for a refused call"
    # 0: what slot 2**40 or 2**32 became when masked to the u32 field; 9: the id the calls named
    _assert_kernel_unchanged(vm, before, (0, 9))


def test_values_the_kernel_judges_still_reach_it(slotted):
    """Only the field width is the harness's: alignment and limits stay the kernel's EINVAL."""
    vm, mem = slotted
    for call in (lambda: vm.set_user_memory_region(0x7FFF, 1 << 34, 4096, mem.addr),  # id >= NR_MEMSLOTS
                 lambda: vm.set_user_memory_region(9, (1 << 34) + 0x800, 4096, mem.addr),  # gpa unaligned
                 lambda: vm.set_user_memory_region(9, 1 << 34, 0x1800, mem.addr),  # size unaligned
                 lambda: vm.set_user_memory_region(9, 1 << 34, 0, mem.addr),  # delete a missing slot
                 lambda: vm.add_memslot(1 << 34, 0x1800, slot=9, backing=mem)):  # the caller's memory
        with pytest.raises(KvmError) as ei:
            call()
        assert ei.value.errno == errno.EINVAL, ei.value
    with pytest.raises(KvmError):  # size 0: EINVAL where guest_memfd exists (not a BadInput anywhere)
        vm.create_guest_memfd(0)


def test_slot_2_40_no_longer_becomes_slot_0(kvm):
    """The issue's sequence: slot 2**40 was masked to slot 0 in the kernel while the table said
    2**40, and the next real slot 0 then failed EINVAL."""
    vm = kvm.create_vm()
    try:
        with pytest.raises(BadInput):
            vm.add_memslot(1 << 34, 1 << 20, slot=1 << 40)
        assert vm.memslots == {}
        m = vm.add_memslot(0, 1 << 20, slot=0)
        assert vm.memslots == {0: m}
    finally:
        vm.close()


def test_other_vm_and_vcpu_arguments(kvm, vm):
    v = vm.create_vcpu()
    for call, arg in [
        (lambda: kvm.create_vm(-1), "vm_type=-1"),
        (lambda: kvm.check_extension(-5), "cap=-5"),
        (lambda: vm.create_vcpu(-1), "vcpu_id=-1"),
        (lambda: vm.create_guest_memfd(-4096), "size=-4096"),
        (lambda: vm.ioeventfd(0x1000, 4, -1), "fd=-1"),
        (lambda: vm.register_coalesced_mmio(1 << 32, 1 << 32), "size=4294967296"),
        (lambda: vm.enable_cap(1, 1, 2, 3, 4, 5), "args="),
        (lambda: vm.clear_dirty_log(0, 0, 64, b"\0"), "num_pages=64"),
        (lambda: v.get_msrs([-1]), "index=-1"),
        (lambda: v.set_msrs({0x10: -1}), "msr 0x10 value=-1"),
        (lambda: v.translate(-1), "gva=-1"),
        (lambda: v.enable_cap(1, flags=-1), "flags=-1"),
        (lambda: v.deadline(0, "x"), "seconds=0"),
        (lambda: run_until_ucall(v, timeout=-1), "timeout=-1"),
    ]:
        with pytest.raises(BadInput) as ei:
            call()
        assert arg in str(ei.value), str(ei.value)
    assert v.get_regs().rip == 0xFFF0  # the vCPU never ran: the bound was refused first
    assert len(vm.vcpus) == 1


@pytest.mark.parametrize(("kw", "arg"), [
    ({"nr_vcpus": -1}, "nr_vcpus=-1"),
    ({"nr_vcpus": MAX_VCPUS + 1}, f"nr_vcpus={MAX_VCPUS + 1}"), ({"nr_vcpus": 1.5}, "nr_vcpus=1.5"),
    ({"arg": -1}, "arg=-1"), ({"arg": 1 << 64}, "arg="), ({"mode": "long65"}, "mode='long65'"),
    ({"identity_map": -1}, "identity_map=-1"),
])
def test_guestvm_refuses_before_making_anything(kvm, kw, arg):
    fds = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(BadInput) as ei:
        GuestVm(kvm, "checksum", **kw)
    assert arg in str(ei.value) and str(ei.value).startswith("GuestVm: "), str(ei.value)
    assert sorted(os.listdir("/proc/self/fd")) == fds


MARKER_CASE = """
import pytest

@pytest.mark.guest("checksum", nr_vcpus=0)
def test_zero_vcpus(vm, vcpu):
    vcpu.run_until_ucall()
"""


def test_guest_marker_with_zero_vcpus_fails_setup_by_name(tmp_path):
    """nr_vcpus=0 in the marker used to give a VM without vCPUs, then IndexError in `vcpu`."""
    (tmp_path / "test_m.py").write_text(MARKER_CASE)
    p = _pytest(tmp_path, "-p", "harness.pytest.plugin", "--kmsg=off", "test_m.py")
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "BadInput: @pytest.mark.guest: nr_vcpus=0 must be an int >= 1" in out and "IndexError" not in out, out
    assert "1 error" in out, out  # an error in set-up, not a pass or a guest failure


def test_guestvm_alloc_and_add_vcpu(kvm):
    g = GuestVm(kvm, "checksum")
    try:
        with pytest.raises(BadInput, match="size=-1"):
            g.alloc(-1)
        with pytest.raises(BadInput, match="align=3"):
            g.alloc(8, 3)
        with pytest.raises(BadInput, match="arg=-1"):
            g.add_vcpu(-1)
        assert len(g.vcpus) == 1
    finally:
        g.close()


@pytest.mark.parametrize("size", [0, -1, -4096, "4096"])
def test_backing_sizes(size):
    with pytest.raises(BadInput, match=r"size=.* must be"):
        memory.create("anon", size)
    with pytest.raises(BadInput, match=r"AnonBacking: size="):
        AnonBacking(size)


def test_backing_range_and_closed_backing():
    b = AnonBacking(8192)
    with pytest.raises(BadInput, match="outside the anon backing"):
        b.view(4096, 8192)
    with pytest.raises(BadInput, match="outside the anon backing"):
        b.read(-1, 4)
    b.close()
    with pytest.raises(HarnessError, match="closed"):
        b.read(0, 4)  # its address is 0 now: reading would fault the process


# ---- command line -----------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}


def _pytest(tmp: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd or tmp, env=_env())


@pytest.mark.parametrize(("opt", "text"), [
    ("--race-seconds=-1", "--race-seconds: '-1': must be a finite number of seconds > 0"),
    ("--race-seconds=0", "--race-seconds: '0': must be"),
    ("--race-seconds=nan", "--race-seconds: 'nan': must be"),
    ("--race-seed=-3", "--race-seed: '-3': the seed must be >= 0"),
    ("--race-seed=1.5", "--race-seed: '1.5' is not an integer seed"),
    ("--kvm-timeout=-5", "--kvm-timeout: '-5': must be a finite number of seconds > 0"),
    ("--kvm-timeout=0", "--kvm-timeout: '0': must be"),
])
def test_options_are_checked_as_usage_errors(tmp_path, opt, text):
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    p = _pytest(tmp_path, "-p", "harness.pytest.core", opt, "test_x.py")
    assert p.returncode == pytest.ExitCode.USAGE_ERROR, p.stdout + p.stderr
    assert text in p.stderr, p.stderr


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as another user")
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, *argv],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())


def test_info_as_non_root_says_what_it_could_not_read():
    p = _as_nobody("-m", "harness", "info")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Traceback" not in out and "PermissionError" not in out, out
    assert "/dev/kvm: cannot open it (Permission denied) as uid 65534 (not root)" in p.stdout, out
    assert "not read (" in p.stdout and "every case will skip" in p.stdout, out
    assert "kernel:" in p.stdout and "known kernel issues in force" in p.stdout, out  # and the rest is there


# ---- a run that tests nothing -------------------------------------------------------------------------
RUNS = {
    "all-skipped": ("import pytest\n\ndef test_a():\n    pytest.skip('no hardware')\n\n"
                    "@pytest.mark.skip(reason='not here')\ndef test_b():\n    pass\n", 4),
    "skip-and-pass": ("import pytest\n\ndef test_a():\n    pytest.skip('x')\n\ndef test_b():\n    pass\n", 0),
    "skip-and-xfail": ("import pytest\n\ndef test_a():\n    pytest.skip('x')\n\n"
                       "@pytest.mark.xfail(reason='known', strict=True)\ndef test_b():\n    assert 0\n", 0),
    "skip-and-fail": ("import pytest\n\ndef test_a():\n    pytest.skip('x')\n\ndef test_b():\n    assert 0\n", 1),
    "nothing-collected": ("x = 1\n", 5),
}


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "n2"])
@pytest.mark.parametrize("what", sorted(RUNS))
def test_a_run_whose_every_case_skipped_exits_4(tmp_path, what, xdist):
    src, want = RUNS[what]
    (tmp_path / "test_r.py").write_text(src)
    p = _pytest(tmp_path, "-p", "harness.pytest.outcome", *(["-n", "2"] if xdist else []), "test_r.py")
    out = p.stdout + p.stderr
    assert p.returncode == want, out
    assert ("NOTHING WAS TESTED: all 2 selected case(s) skipped" in out) == (want == 4), out
    if want == 4:
        assert "no hardware" in out and "not here" in out, out


def test_the_suite_as_non_root_exits_4():
    """The real case: /dev/kvm not usable, the kvm fixture skips every case."""
    p = _as_nobody("-m", "pytest", "-p", "no:cacheprovider", "-q", "cases/test_system.py")
    out = p.stdout + p.stderr
    assert p.returncode == 4, out
    assert "NOTHING WAS TESTED" in out and "/dev/kvm is not readable and writable by uid 65534" in out, out
