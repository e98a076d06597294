"""harness/memory/uffd.py (the userfaultfd binding) and the uffd race mode's bookkeeping and oracle
(harness/race/uffd.py), then a planted fault end to end.

Pinned by hand from upstream's include/uapi/linux/userfaultfd.h: the struct sizes and offsets, the
ioctl numbers (_IOWR/_IOR(0xAA, nr, struct)), the feature bits (the host's linux-libc-dev headers are
older: bits 13-16 came later); where gcc and the installed header exist, the same facts are compiled
against that header too. The binding is exercised on the real kernel without KVM: a thread whose
write(2) reads a registered page (a kernel-mode fault, like KVM's) is held and let go. The planted
fault needs /dev/kvm: a uffd disruptor that resolves each held fault with the OLD generation's page
while publishing the new one must be caught by the guest's stale oracle. (Not test_uffd.py: tests/
and cases/ have no __init__.py, so it would collide with cases/test_uffd.py in one pytest run.)
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import threading
import time
from array import array

import pytest

from harness.memory import hostmem
from harness.memory import uffd as U
from harness.race import protocol as P
from harness.race import uffd as RU
from harness.race.disruptors import DISRUPTORS, UffdMissing
from harness.race.engine import Race
from harness.race.plan import ORACLES, RaceSpec
from harness.race.report import RaceReport

# ---- the uapi, pinned ------------------------------------------------------------------------------

SIZES = {  # struct -> (ctypes type, sizeof)
    "struct uffd_msg": (U.UffdMsg, 32),
    "struct uffdio_api": (U.UffdioApi, 24),
    "struct uffdio_range": (U.UffdioRange, 16),
    "struct uffdio_register": (U.UffdioRegister, 32),
    "struct uffdio_copy": (U.UffdioCopy, 40),
    "struct uffdio_zeropage": (U.UffdioZeropage, 32),
    "struct uffdio_writeprotect": (U.UffdioWriteprotect, 24),
}

OFFSETS = {  # (struct, C member) -> (ctypes type, field, offset)
    ("struct uffd_msg", "arg.pagefault.flags"): 8,
    ("struct uffd_msg", "arg.pagefault.address"): 16,
    ("struct uffd_msg", "arg.pagefault.feat.ptid"): 24,
    ("struct uffdio_register", "mode"): 16,
    ("struct uffdio_register", "ioctls"): 24,
    ("struct uffdio_copy", "mode"): 24,
    ("struct uffdio_copy", "copy"): 32,
    ("struct uffdio_zeropage", "mode"): 16,
    ("struct uffdio_zeropage", "zeropage"): 24,
    ("struct uffdio_writeprotect", "mode"): 16,
}

NUMBERS = {
    "USERFAULTFD_IOC_NEW": 0xAA00,  # _IO(0xAA, 0x00)
    "UFFDIO_API": 0xC018AA3F,  # _IOWR(0xAA, 0x3f, struct uffdio_api)
    "UFFDIO_REGISTER": 0xC020AA00,  # _IOWR(0xAA, 0x00, struct uffdio_register)
    "UFFDIO_UNREGISTER": 0x8010AA01,  # _IOR(0xAA, 0x01, struct uffdio_range)
    "UFFDIO_WAKE": 0x8010AA02,  # _IOR(0xAA, 0x02, struct uffdio_range)
    "UFFDIO_COPY": 0xC028AA03,  # _IOWR(0xAA, 0x03, struct uffdio_copy)
    "UFFDIO_ZEROPAGE": 0xC020AA04,  # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
    "UFFDIO_WRITEPROTECT": 0xC018AA06,  # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
}

FEATURES = {
    "UFFD_FEATURE_PAGEFAULT_FLAG_WP": 1 << 0, "UFFD_FEATURE_MISSING_HUGETLBFS": 1 << 4,
    "UFFD_FEATURE_MISSING_SHMEM": 1 << 5, "UFFD_FEATURE_THREAD_ID": 1 << 8,
    "UFFD_FEATURE_EXACT_ADDRESS": 1 << 11, "UFFD_FEATURE_WP_HUGETLBFS_SHMEM": 1 << 12,
    "UFFD_FEATURE_WP_UNPOPULATED": 1 << 13, "UFFD_FEATURE_POISON": 1 << 14, "UFFD_FEATURE_WP_ASYNC": 1 << 15,
    "UFFD_FEATURE_MOVE": 1 << 16,
}


def test_struct_sizes_match_the_uapi():
    for name, (t, size) in SIZES.items():
        assert ctypes.sizeof(t) == size, name


def test_field_offsets_match_the_uapi():
    msg = U.UffdMsg
    assert msg.arg.offset + U._Pagefault.flags.offset == OFFSETS[("struct uffd_msg", "arg.pagefault.flags")]
    assert msg.arg.offset + U._Pagefault.address.offset == OFFSETS[("struct uffd_msg", "arg.pagefault.address")]
    assert msg.arg.offset + U._Pagefault.ptid.offset == OFFSETS[("struct uffd_msg", "arg.pagefault.feat.ptid")]
    assert U.UffdioRegister.mode.offset == 16 and U.UffdioRegister.ioctls.offset == 24
    assert U.UffdioCopy.mode.offset == 24 and U.UffdioCopy.copy.offset == 32
    assert U.UffdioZeropage.mode.offset == 16 and U.UffdioZeropage.zeropage.offset == 24
    assert U.UffdioWriteprotect.mode.offset == 16


def test_ioctl_numbers_and_features_match_the_uapi():
    assert {k: U.IOCTLS[k] for k in NUMBERS} == NUMBERS
    for name, bit in FEATURES.items():
        assert getattr(U, name.removeprefix("UFFD_")) == bit, name
    assert U.ioctl_bit("UFFDIO_COPY") == 1 << 3 and U.ioctl_bit("UFFDIO_API") == 1 << 0x3F
    assert U.feature_names(U.FEATURE_THREAD_ID | U.FEATURE_MISSING_SHMEM | 1 << 40) == \
        ["MISSING_SHMEM", "THREAD_ID", "bit40"]


HEADER = "/usr/include/linux/userfaultfd.h"


@pytest.mark.skipif(not (shutil.which("gcc") and os.path.exists(HEADER)), reason=f"no gcc or no {HEADER}")
def test_the_installed_header_agrees(tmp_path):
    """The same facts compiled against the machine's own uapi header (where it defines them)."""
    lines = [f'printf("size {n} %zu\\n", sizeof({n}));' for n in SIZES]
    lines += [f'printf("off {s}.{m} %zu\\n", offsetof({s}, {m}));' for s, m in OFFSETS]
    lines += [f'printf("ioctl {n} %lu\\n", (unsigned long){n});' for n in NUMBERS]
    lines += [f'#ifdef {n}\nprintf("feature {n} %llu\\n", (unsigned long long)({n}));\n#endif' for n in FEATURES]
    src = tmp_path / "u.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/userfaultfd.h>\n#include <sys/ioctl.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    exe = tmp_path / "u"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    seen = 0
    for ln in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        what, rest = ln.split(" ", 1)
        name, value = rest.rsplit(" ", 1)
        v = int(value)
        if what == "size":
            assert SIZES[name][1] == v, name
        elif what == "off":
            s, m = name.split(".", 1)
            assert OFFSETS[(s, m)] == v, name
        elif what == "ioctl":
            assert NUMBERS[name] == v, name
        else:
            assert FEATURES[name] == v, name
        seen += 1
    assert seen >= len(SIZES) + len(OFFSETS) + len(NUMBERS)


# ---- messages and errors (pure) ------------------------------------------------------------------


def _msg(event: int, flags: int = 0, address: int = 0, ptid: int = 0) -> bytes:
    m = U.UffdMsg()
    m.event = event
    m.arg.pagefault.flags = flags
    m.arg.pagefault.address = address
    m.arg.pagefault.ptid = ptid
    return bytes(m)


def test_decode_pagefaults_and_other_events():
    buf = _msg(U.UFFD_EVENT_PAGEFAULT, U.UFFD_PAGEFAULT_FLAG_WRITE | U.UFFD_PAGEFAULT_FLAG_WP, 0x7F0000003000, 4242)
    buf += _msg(U.UFFD_EVENT_PAGEFAULT, 0, 0x7F0000005000, 7) + _msg(U.UFFD_EVENT_REMOVE)
    f1, f2, ev = U.decode(buf)
    assert isinstance(f1, U.Fault) and (f1.address, f1.ptid, f1.write, f1.wp) == (0x7F0000003000, 4242, True, True)
    assert f1.describe() == "wp write fault at 0x7f0000003000 (tid 4242)"
    assert isinstance(f2, U.Fault) and f2.describe() == "missing read fault at 0x7f0000005000 (tid 7)"
    assert isinstance(ev, U.Event) and ev.event == U.UFFD_EVENT_REMOVE
    with pytest.raises(ValueError, match="not a multiple of 32"):
        U.decode(buf[:40])


def test_errors_name_the_ioctl_and_errno():
    e = U.UffdError(errno.EEXIST, "UFFDIO_COPY", "dst=0x1000, len=0x1000, mode=0x0")
    assert isinstance(e, OSError) and e.errno == errno.EEXIST and e.ioctl == "UFFDIO_COPY"
    assert str(e).endswith("UFFDIO_COPY(dst=0x1000, len=0x1000, mode=0x0): EEXIST (File exists)")


# ---- the mode's bookkeeping and oracle (pure) ------------------------------------------------------

PVM_STACK = """[<0>] handle_userfault+0x2d1/0x6f0
[<0>] __handle_mm_fault+0x9b4/0xf80
[<0>] handle_mm_fault+0x108/0x2f0
[<0>] exc_page_fault+0x2a4/0x7a0
[<0>] asm_exc_page_fault+0x26/0x30
[<0>] rep_movs_alternative+0x4a/0x90
[<0>] __kvm_read_guest_page+0x4c/0x90 [kvm]
[<0>] kvm_vcpu_read_guest+0x5c/0xa0 [kvm]
[<0>] x86_emulate_insn+0x1ad/0xd70 [kvm]
[<0>] pvm_handle_exit+0x51/0x6a0 [kvm_pvm]
"""
GUP_STACK = """[<0>] handle_userfault+0x2d1/0x6f0
[<0>] __handle_mm_fault+0x9b4/0xf80
[<0>] handle_mm_fault+0x108/0x2f0
[<0>] __get_user_pages+0x1f1/0x1020
[<0>] get_user_pages_unlocked+0xe1/0x370
[<0>] hva_to_pfn+0x370/0x4f0 [kvm]
[<0>] kvm_follow_pfn+0x93/0x100 [kvm]
[<0>] __kvm_faultin_pfn+0x5c/0x90 [kvm]
[<0>] kvm_mmu_faultin_pfn+0x1ad/0x6d0 [kvm]
[<0>] kvm_tdp_page_fault+0x95/0x100 [kvm]
"""


def test_stacks_are_classified_by_where_the_thread_waits():
    assert RU.classify_stack(GUP_STACK) == "kvm-gup"
    assert RU.classify_stack(PVM_STACK) == "kvm-uaccess"
    assert RU.classify_stack("[<0>] handle_userfault+0x1/0x2\n[<0>] do_sys_write+0x1/0x2\n") == "userfaultfd"
    assert RU.classify_stack("[<0>] kvm_vcpu_block+0x1/0x2\n") == "elsewhere"
    assert RU.classify_stack("(unreadable: Permission denied)") == "unreadable"
    assert RU.frames(GUP_STACK, 3) == "handle_userfault <- __handle_mm_fault <- handle_mm_fault"


def _stats(**kw) -> RU.HoldStats:
    s = RU.HoldStats(mode="missing", features="THREAD_ID", ops=10, held=10, held_ops=10, invalidated=10,
                     vcpu_faults=10, copies=10, held_ns_total=10 * 300_000, held_ns_max=900_000,
                     wait_ns_total=10 * 2_000_000)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_uffd_oracle_passes_a_mode_that_held_and_invalidated():
    s = _stats()
    s.add_stack(GUP_STACK)
    v = RU.verdict(s)
    assert v.ok and v.facts["not_through_gup"] is None and v.facts["stack_kinds"] == {"kvm-gup": 1}
    p = s.properties()
    assert p["uffd_faults_held"] == 10 and p["uffd_held_invalidated"] == 10 and p["uffd_held_us_mean"] == 300.0
    assert p["uffd_held_us_max"] == 900.0 and p["uffd_fault_wait_us_mean"] == 2000.0 and p["uffd_stack_kvm-gup"] == 1
    assert "10 faults held in 10 of 10 ops" in "\n".join(s.summary())


@pytest.mark.parametrize(("kw", "want"), [
    ({"held": 0, "held_ops": 0, "invalidated": 0}, "no vCPU fault was held in 10 ops"),
    ({"invalidated": 0}, "none saw an invalidation while held"),
    ({"foreign": ["missing read fault at 0x1000 (tid 9): thread 9 is not a racing vCPU"]}, "not a racing vCPU"),
    ({"stray": ["missing read fault at 0x9000 (tid 3), outside the op's range"]}, "outside the operation's range"),
    ({"left_held": 2}, "2 fault(s) were still held"),
])
def test_uffd_oracle_names_what_went_wrong(kw, want):
    v = RU.verdict(_stats(**kw))
    assert not v.ok and len(v.problems) == 1 and want in v.problems[0], v.problems


def test_uffd_oracle_is_not_judged_on_a_stalled_race_but_harness_bugs_still_count():
    assert RU.verdict(_stats(held=0, invalidated=0), judged=False).ok
    assert not RU.verdict(_stats(held=0, left_held=1), judged=False).ok


def test_not_through_gup_says_where_the_faults_were_held():
    s = _stats()
    for _ in range(3):
        s.add_stack(PVM_STACK)
    why = RU.not_through_gup(s.stack_kinds, s.stacks)
    assert why is not None and "held 3 times, never inside KVM's get_user_pages" in why
    assert "3 inside KVM's copy_from_user" in why and "kvm_vcpu_read_guest" in why
    assert RU.verdict(s).ok  # a pass of the oracle, and the case skips with this reason
    assert any("NOT the get_user_pages path" in ln for ln in s.summary())
    s.add_stack(GUP_STACK)
    assert RU.not_through_gup(s.stack_kinds, s.stacks) is None
    assert "no held vCPU fault was seen" in RU.not_through_gup({}, [])


def test_retries_upper_bound_from_the_stats_delta():
    assert RU.retries_upper_bound({}) is None  # kvm_pvm: no stat moved
    assert RU.retries_upper_bound({"vcpu.pf_taken": 50, "vcpu.pf_fixed": 30, "vcpu.pf_spurious": 5}) == 15


def test_report_carries_the_modes_counts_and_verdict():
    rep = RaceReport(RaceSpec("anon", ("uffd",)), host_ops={"uffd": 10}, overlapped_ops=10)
    s = _stats(invalidated=0)
    rep.extra.update(s.properties())
    rep.extra_lines += s.summary()
    rep.extra_verdicts[RU.ORACLE] = RU.verdict(s)
    assert "uffd" in ORACLES
    assert any("none saw an invalidation" in f for f in rep.failures(("uffd",)))
    assert rep.failures(("stale",)) == []  # only when the case names it
    assert ("uffd_faults_held", 10) in rep.properties()
    assert "uffd (missing; THREAD_ID)" in rep.summary()


def test_unsupported_backings_say_why():
    from harness import memory

    def why(kind: str) -> str | None:
        k = memory.kind(kind)
        return UffdMissing.unsupported(kind, k.features, k.page_size, None)  # type: ignore[arg-type]

    assert "guest_memfd" in why("guest_memfd")
    assert "disk file" in why("file")
    assert "1 GiB page" in why("hugetlb-1g")


# ---- the binding on the real kernel (no KVM) --------------------------------------------------------


def _uffd_or_skip(want: int = 0, need: int = 0) -> U.Userfaultfd:
    try:
        return U.Userfaultfd.open(U.FEATURE_THREAD_ID | want, need)
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable: {e}")


class _Reader:
    """A thread whose write(2) to a pipe reads `length` bytes at `addr`: the kernel's copy_from_user
    faults on a registered page and is held (the GIL is released inside the syscall)."""

    def __init__(self, addr: int, length: int) -> None:
        self.r, self.w = os.pipe()
        self.src = (ctypes.c_char * length).from_address(addr)
        self.tid = 0
        self.data = b""
        self.t = threading.Thread(target=self._main, daemon=True)
        self.t.start()

    def _main(self) -> None:
        self.tid = threading.get_native_id()
        os.write(self.w, memoryview(self.src))
        self.data = os.read(self.r, len(self.src))

    def join(self) -> bytes:
        self.t.join(5)
        assert not self.t.is_alive(), "the held reader was never let go"
        os.close(self.r)
        os.close(self.w)
        return self.data


def _stack(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/stack") as f:
            return f.read()
    except OSError as e:
        return f"(unreadable: {e.strerror})"


def test_a_kernel_fault_is_held_until_copy():
    m = hostmem.Mapping(2 * 4096)
    with _uffd_or_skip() as u:
        ioctls = u.register(m.addr, m.length, U.REGISTER_MISSING)
        assert ioctls & U.ioctl_bit("UFFDIO_COPY") and ioctls & U.ioctl_bit("UFFDIO_ZEROPAGE")
        rd = _Reader(m.addr + 4096, 16)
        faults = u.read(2.0)
        assert len(faults) == 1 and isinstance(faults[0], U.Fault), faults
        f = faults[0]
        assert f.address == m.addr + 4096 and not f.write and f.ptid == rd.tid
        assert RU.classify_stack(_stack(f.ptid)) in ("userfaultfd", "unreadable")
        assert rd.t.is_alive()  # held
        page = ctypes.create_string_buffer(b"held then copied", 4096)
        assert u.copy(f.address, ctypes.addressof(page), 4096) == 4096
        assert rd.join() == b"held then copied"
        with pytest.raises(U.UffdError, match=r"UFFDIO_COPY\(dst=0x[0-9a-f]+, len=0x1000, mode=0x0\): EEXIST"):
            u.copy(f.address, ctypes.addressof(page), 4096)
        assert u.zeropage(m.addr, 4096) == 4096
        assert bytes(hostmem.view(m.addr, 8)) == bytes(8)
    m.close()


def test_dontwake_then_wake_and_close_lets_every_fault_go():
    m = hostmem.Mapping(2 * 4096)
    u = _uffd_or_skip()
    u.register(m.addr, m.length, U.REGISTER_MISSING)
    rd = _Reader(m.addr, 8)
    assert len(u.read(2.0)) == 1
    page = ctypes.create_string_buffer(b"dontwake", 4096)
    u.copy(m.addr, ctypes.addressof(page), 4096, wake=False)
    time.sleep(0.05)
    assert rd.t.is_alive()  # the page is there, the fault still held
    u.wake(m.addr, 4096)
    assert rd.join() == b"dontwake"
    # a fault still held when the fd closes is let go (the access retries unregistered: zeros)
    rd2 = _Reader(m.addr + 4096, 8)
    assert u.read(2.0)
    u.close()
    assert rd2.join() == bytes(8) and u.closed
    m.close()


def test_write_protect_holds_a_kernel_write_until_cleared():
    try:
        have = U.Userfaultfd.available()
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable: {e}")
    if not have & U.FEATURE_PAGEFAULT_FLAG_WP:
        pytest.skip("this kernel's userfaultfd lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP")
    m = hostmem.Mapping(4096)
    hostmem.view(m.addr, 8)[:] = b"original"
    with _uffd_or_skip(need=U.FEATURE_PAGEFAULT_FLAG_WP) as u:
        assert u.register(m.addr, 4096, U.REGISTER_WP) & U.ioctl_bit("UFFDIO_WRITEPROTECT")
        u.writeprotect(m.addr, 4096, True)
        r, w = os.pipe()
        os.write(w, b"rewritten")
        dst = (ctypes.c_char * 9).from_address(m.addr)
        t = threading.Thread(target=lambda: os.readv(r, [memoryview(dst)]), daemon=True)
        t.start()  # read(2) into the page: copy_to_user takes the write fault
        (f,) = u.read(2.0)
        assert isinstance(f, U.Fault) and f.wp and f.write and f.address == m.addr
        u.writeprotect(m.addr, 4096, False)  # clears and wakes
        t.join(5)
        assert not t.is_alive() and bytes(hostmem.view(m.addr, 9)) == b"rewritten"
        os.close(r)
        os.close(w)
    m.close()


# ---- end to end: a planted fault the stale oracle must catch ------------------------------------------


class StaleCopy(UffdMissing):
    """Lets each held fault go with the OLD generation's page (UFFDIO_COPY of the contents the
    release threw away) and publishes the new generation without writing its tags: the guest's reads
    after the publication return the previous generation, exactly what a KVM that kept the pfn it
    resolved before the invalidation would show."""

    name = "broken-uffd-stale"

    def resolution_kinds(self) -> tuple[str, ...]:
        return ("copy",)

    def content_generation(self) -> int:
        return self.mem.gen  # the generation being replaced

    def end(self, off: int, length: int) -> None:
        m = self.mem
        gen = m.gen + 1
        p0, p1 = m.pages_of(off, length)
        m.gentab[p0:p1] = array("Q", (2 * gen,)) * (p1 - p0)  # published, its tags never written
        m.gen = gen
        self.abort()  # the writers' lock, released without end()'s tag writes
        self.ops += 1
        self.bytes += length


def test_a_held_fault_let_go_with_stale_data_is_caught(kvm, backings, monkeypatch):
    monkeypatch.setitem(DISRUPTORS, StaleCopy.name, StaleCopy)
    spec = RaceSpec("anon", (StaleCopy.name,), vcpus=1, seconds=0.5, seed=11, label="broken-uffd-stale")
    race = Race(kvm, spec, lambda k, size, vm: backings(k, size, vm=vm))
    try:
        rep = race.run()
    finally:
        race.close()
    assert rep.extra["uffd_faults_held"] > 0 and rep.extra["uffd_copies"] > 0, rep.summary()
    assert rep.violation_count > 0, rep.summary()
    fails = rep.failures(("stale",))
    assert len(fails) == 1 and "stale: generation" in fails[0], fails
    v = rep.violations[0]
    assert v.seen_gen is not None and P.gen_before(v.seen_gen, v.expected_gen), v.describe()
    assert v.expected_gen - v.seen_gen == 1  # exactly the generation the COPY brought back
    assert rep.failures(("uffd", "progress")) == [], rep.summary()  # the mode itself did its job
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("race-"))


@pytest.mark.parametrize("kind", ["anon", "shmem", "anon-shared", "hugetlb-2m"])
@pytest.mark.parametrize("page", [0x1000, 0x200000], ids=["4k", "2m"])
@pytest.mark.parametrize("cls", ["UffdMissing", "UffdWp"])
def test_every_uffd_op_range_holds_a_tag(cls, kind, page):
    """An op waits for a vCPU to fault into its range and the vCPUs touch only the tags: a range
    without one waits out HOLD_WAIT for nothing (4 KiB pages under 2 MiB guest pages, a tag every
    8 KiB: one op in six, before)."""
    import random
    from types import SimpleNamespace

    from harness import memory
    from harness.race.disruptors import uffd as D
    from harness.race.region import geometry

    size, stride = geometry(kind, page)
    ctx = SimpleNamespace(mem=SimpleNamespace(size=size, stride=stride), kind_page=memory.kind(kind).page_size)
    sched = getattr(D, cls)(ctx).schedule(random.Random(1795870986))
    untagged = [(hex(o), hex(n)) for o, n in sched if -(-o // stride) * stride >= o + n]
    assert not untagged, (f"{len(untagged)} of {len(sched)} ranges hold no tag (stride {stride:#x})",
                          untagged[:5])
    assert all(o + n <= size for o, n in sched)
