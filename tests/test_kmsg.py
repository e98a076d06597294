"""Kernel log parsing and splat matching (harness.health.kmsg), plus the reader on the real
/dev/kmsg of this machine."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest

from harness.health import kmsg
from harness.health.kmsg import (
    KmsgReader,
    KmsgRecord,
    SplatMatcher,
    find_splats,
    parse_kmsg_dump,
    parse_kmsg_record,
    read_tainted,
    taint_letters,
)

DATA = Path(__file__).parent / "data" / "kmsg"
INJECTION_TAG = "kvm-harness test injection: not a kernel warning"


def _rec(text: str, *, pri: int = 4, seq: int = 1) -> KmsgRecord:
    return parse_kmsg_record(f"{pri},{seq},1000,-;{text}\n")


# --- parsing ----------------------------------------------------------------------------------


def test_parse_basic():
    r = parse_kmsg_record("6,1234,5678,-;kvm: hello\n")
    assert (r.level, r.facility, r.seq, r.ts_usec) == (6, 0, 1234, 5678)
    assert r.text == "kvm: hello" and r.continuation == ()
    assert r.is_kernel and r.flags == "-" and r.caller is None


@pytest.mark.parametrize(
    ("pri", "facility", "level"), [(0, 0, 0), (4, 0, 4), (12, 1, 4), (14, 1, 6), (30, 3, 6)]
)
def test_parse_facility_level(pri, facility, level):
    r = parse_kmsg_record(f"{pri},1,2,-;x")
    assert (r.facility, r.level) == (facility, level)


def test_parse_escapes():
    r = parse_kmsg_record("4,1,2,-;line one\\x0aline two\\x09tab \\x5cx0a caf\\xc3\\xa9\n")
    # \x5c is the escaped backslash, so "\x5cx0a" is the literal text "\x0a", not a newline.
    assert r.text == "line one\nline two\ttab \\x0a café"


def test_parse_continuation_and_caller():
    raw = ("6,339,5140900,-,caller=T1;virtio_net virtio0 eth0: up\n"
           " SUBSYSTEM=virtio\n DEVICE=+virtio:vir\\x09tio0\n")
    r = parse_kmsg_record(raw)
    assert r.text == "virtio_net virtio0 eth0: up"
    assert r.continuation == ("SUBSYSTEM=virtio", "DEVICE=+virtio:vir\ttio0")
    assert r.fields == {"SUBSYSTEM": "virtio", "DEVICE": "+virtio:vir\ttio0"}
    assert r.caller == "T1"


def test_parse_empty_text_and_semicolons_in_text():
    assert parse_kmsg_record("4,1,2,-;").text == ""
    assert parse_kmsg_record("4,1,2,-;a;b").text == "a;b"


@pytest.mark.parametrize(
    "raw", ["no separator", "4,1,2;text", "x,1,2,-;t", "4,-1,2,-;t", "4,1,2,-;a\nnot indented"]
)
def test_parse_rejects(raw):
    with pytest.raises(ValueError):
        parse_kmsg_record(raw)


def test_records_are_hashable():
    assert len({_rec("a"), _rec("a")}) == 1


def test_parse_dump_groups_continuation_lines():
    recs = parse_kmsg_dump((DATA / "noise.kmsg").read_text())
    dev = next(r for r in recs if r.continuation)
    assert dev.fields["SUBSYSTEM"] == "virtio"
    acpi = next(r for r in recs if r.text.startswith("ACPI Warning"))
    assert "(\\GSMB)" in acpi.text


# --- matching ---------------------------------------------------------------------------------

POSITIVE = [
    ("WARNING: CPU: 1 PID: 1234 at arch/x86/kvm/mmu/mmu.c:6321 kvm_mmu_zap_all_fast+0x1c3/0x1e0 [kvm]",
     "WARNING"),
    ("WARNING: arch/x86/kvm/mmu/mmu.c:6321 at kvm_mmu_zap_all_fast+0x1c3/0x1e0 [kvm], CPU#1: python3/1234",
     "WARNING"),
    ("WARNING: at kernel/sched/core.c:1234 resched_curr+0x5b/0x60()", "WARNING"),
    ("WARNING: at kvm_mmu_zap_all_fast+0x1c3/0x1e0 [kvm], CPU#1: python3/1234", "WARNING"),
    ("BUG: unable to handle page fault for address: ffff888100a00000", "BUG"),
    ("BUG: kernel NULL pointer dereference, address: 0000000000000000", "BUG"),
    ("kernel BUG at mm/huge_memory.c:2893!", "BUG"),
    ("BUG: sleeping function called from invalid context at mm/memory.c:6134", "BUG"),
    ("BUG: Bad page state in process python3  pfn:10a3f2", "BUG"),
    ("BUG: Bad rss-counter state mm:000000008f4b2c1d type:MM_ANONPAGES val:1", "BUG"),
    ("kernel tried to execute NX-protected page - exploit attempt? (uid: 0)", "BUG"),
    ("Oops: 0000 [#1] PREEMPT SMP NOPTI", "Oops"),
    ("Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI", "Oops"),
    ("invalid opcode: 0000 [#1] SMP PTI", "Oops"),
    ("Internal error: Oops: 0000000096000004 [#1] PREEMPT SMP", "Oops"),
    ("Oops: general protection fault, probably for non-canonical address 0xdffffc0000000003: 0000 [#1] "
     "PREEMPT SMP KASAN NOPTI", "GPF"),
    ("general protection fault, probably for non-canonical address 0xdead000000000122: 0000 [#1] SMP", "GPF"),
    ("BUG: KASAN: use-after-free in kvm_mmu_page_fault+0x1a/0x9a0 [kvm]", "KASAN"),
    ("BUG: KASAN: slab-out-of-bounds in kvm_set_msr_common+0x2c/0x1010 [kvm]", "KASAN"),
    ("BUG: KFENCE: use-after-free read in kvm_mmu_free_roots+0x3a/0x2a0 [kvm]", "KFENCE"),
    ("BUG: KCSAN: data-race in kvm_vcpu_kick / vcpu_enter_guest", "KCSAN"),
    ("UBSAN: array-index-out-of-bounds in arch/x86/kvm/mmu/mmu.c:3344:15", "UBSAN"),
    ("UBSAN: shift-out-of-bounds in arch/x86/kvm/lapic.c:1218:27", "UBSAN"),
    ("WARNING: possible circular locking dependency detected", "lockdep"),
    ("WARNING: possible recursive locking detected", "lockdep"),
    ("WARNING: inconsistent lock state", "lockdep"),
    ("WARNING: suspicious RCU usage", "lockdep"),
    ("WARNING: bad unlock balance detected!", "lockdep"),
    ("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", "RCU stall"),
    ("rcu: INFO: rcu_sched self-detected stall on CPU", "RCU stall"),
    ("rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: { 1-... } 21003 jiffies s: 293",
     "RCU stall"),
    ("INFO: rcu_sched detected stalls on CPUs/tasks:", "RCU stall"),
    ("INFO: task kworker/0:1:123 blocked for more than 120 seconds.", "hung task"),
    ("INFO: task python3:4321 blocked for more than 245 seconds.", "hung task"),
    ("refcount_t: underflow; use-after-free.", "refcount"),
    ("refcount_t: saturated; leaking memory.", "refcount"),
    ("list_add corruption. prev->next should be next (ffff888100a4e140), but was 0000000000000000. "
     "(prev=ffff888100a4e140).", "list corruption"),
    ("list_del corruption, ffff888104a3c0a8->next is LIST_POISON1 (dead000000000100)", "list corruption"),
    ("list_add double add: new=ffff888104a3c0a8, prev=ffff888104a3c0a8, next=ffff888100a4e140.",
     "list corruption"),
    ("watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [python3:1234]", "soft lockup"),
    ("BUG: soft lockup - CPU#1 stuck for 22s! [python3:1234]", "soft lockup"),
    ("watchdog: Watchdog detected hard LOCKUP on cpu 3", "hard lockup"),
    ("NMI watchdog: Watchdog detected hard LOCKUP on cpu 3", "hard lockup"),
    ("BUG kmalloc-64 (Not tainted): Redzone overwritten", "slab corruption"),
    ("BUG kvm_mmu_page_header (Tainted: G        W         ): Poison overwritten", "slab corruption"),
    ("kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)", "kmemleak"),
    ("Kernel panic - not syncing: Fatal exception", "panic"),
]

NEGATIVE = [
    "kvm: vcpu 0, guest rIP: 0xffffffff8105c0e4 disabled perfctr wrmsr: 0xc2 data 0xffff",
    "kvm-pvm: supports paging only in long mode",
    "kvm_pvm: INTERNAL_ERROR in batch emul",
    "x86/split lock detection: #AC: crashing the kernel on kernel split_locks and warning on user-space"
    " split_locks",
    'audit: type=1400 audit(1700000000.123:42): apparmor="DENIED" operation="open" pid=77 comm="warning"',
    'audit: type=1326 audit(1700000000.123:43): comm="WARNING: CPU: 0 PID: 1 at x.c:1"',
    "Modules linked in: kvm_pvm kvm",
    "ACPI Warning: SystemIO range 0x0000000000000B00-0x0000000000000B08 conflicts with OpRegion",
    "usb 1-1: device descriptor read/64, error -71",
    "EXT4-fs warning (device loop0): ext4_end_bio:343: I/O error 10 writing to inode 12 starting block 1024)",
    "WARNING: The mand mount option has been deprecated and and is ignored by this kernel.",
    "WARNING: at least one CPU lacks the feature, disabling it",
    "Spectre V2 : WARNING: Unprivileged eBPF is enabled with eIBRS on, data leaks possible via Spectre v2 BHB"
    " attacks!",
    "------------[ cut here ]------------",
    "---[ end trace 0000000000000000 ]---",
    "Call Trace:",
    " <TASK>",
    " ? __warn+0x81/0x130",
    "RIP: 0010:kvm_mmu_zap_all_fast+0x1c3/0x1e0 [kvm]",
    "Code: 48 8b 83 f8 93 00 00 <0f> 0b e9 36 ff ff ff",
    "CPU: 1 UID: 0 PID: 1234 Comm: python3 Tainted: G        W          6.18.44-fc-v669 #1",
    "KASAN: null-ptr-deref in range [0x0000000000000018-0x000000000000001f]",
    "page dumped because: kasan: bad access detected",
    "Disabling lock debugging due to kernel taint",
    "INFO: lockdep is turned off.",
    "rcu: Hierarchical RCU implementation.",
    "systemd[1]: Started BUG_ON test.",
    "#PF: supervisor read access in kernel mode",
    "",
]


@pytest.mark.parametrize(("text", "kind"), POSITIVE)
def test_match_positive(text, kind):
    assert SplatMatcher().match(_rec(text)) == kind


@pytest.mark.parametrize("text", NEGATIVE)
def test_match_negative(text):
    assert SplatMatcher().match(_rec(text)) is None


def test_match_any_line_of_a_multiline_record():
    assert SplatMatcher().match(_rec("prefix\\x0aWARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1")) == "WARNING"


def test_extra_patterns_take_precedence():
    m = SplatMatcher(extra=[("pvm", r"kvm_pvm: INTERNAL_ERROR")])
    assert m.match(_rec("kvm_pvm: INTERNAL_ERROR in batch emul")) == "pvm"
    assert m.match(_rec("BUG: KASAN: x")) == "KASAN"


# --- fixtures: each real-looking splat counts exactly once --------------------------------------

FIXTURES = {
    "warn.kmsg": ["WARNING"],
    "null_deref.kmsg": ["BUG"],  # + "Oops: 0000 [#1]" folded in
    "kernel_bug_at.kmsg": ["BUG"],  # + "Oops: invalid opcode" folded in
    "nx.kmsg": ["BUG"],  # + "BUG: unable to handle page fault" + "Oops: 0011" folded in
    "gpf.kmsg": ["GPF"],
    "kasan.kmsg": ["KASAN"],
    "lockdep_circular.kmsg": ["lockdep"],
    "rcu_stall.kmsg": ["RCU stall"],
    "noise.kmsg": [],
}


def _load(name: str) -> list[KmsgRecord]:
    return parse_kmsg_dump((DATA / name).read_text())


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_kinds(name):
    recs = _load(name)
    splats = find_splats(recs)
    assert [k for k, _ in splats] == FIXTURES[name]
    # The reported record is the splat's first header line, not a trace or register line.
    for kind, rec in splats:
        assert SplatMatcher().match(rec) == kind
        assert not rec.text.startswith((" ", "Call Trace", "RIP:", "Code:"))


def test_fixture_first_header_is_reported():
    (_, rec), = find_splats(_load("null_deref.kmsg"))
    assert rec.text.startswith("BUG: kernel NULL pointer dereference")
    (_, rec), = find_splats(_load("nx.kmsg"))
    assert rec.text.startswith("kernel tried to execute NX-protected page")


def test_all_fixtures_in_one_log():
    recs = [r for name in sorted(FIXTURES) for r in _load(name)]
    assert [k for k, _ in find_splats(recs)] == [k for name in sorted(FIXTURES) for k in FIXTURES[name]]


def test_distinct_events_are_not_folded():
    back_to_back = [
        _rec("BUG: sleeping function called from invalid context at mm/memory.c:6134", seq=10),
        _rec("BUG: scheduling while atomic: python3/1234/0x00000002", seq=11),
    ]
    assert [k for k, _ in find_splats(back_to_back)] == ["BUG", "BUG"]
    far_apart = [
        _rec("BUG: kernel NULL pointer dereference, address: 0000000000000000", seq=10),
        _rec("Oops: 0000 [#2] PREEMPT SMP NOPTI", seq=500),
    ]
    assert [k for k, _ in find_splats(far_apart)] == ["BUG", "Oops"]
    warn_then_oops = [
        _rec("WARNING: CPU: 1 PID: 1 at x.c:1 f+0x0/0x1", seq=10),
        _rec("Oops: 0000 [#1] PREEMPT SMP NOPTI", seq=12),
    ]
    assert [k for k, _ in find_splats(warn_then_oops)] == ["WARNING", "Oops"]


def test_kernel_only_filter():
    recs = _load("noise.kmsg")
    user = [r for r in recs if not r.is_kernel]
    assert {(r.facility, r.level) for r in user} == {(1, 6), (1, 4)}
    assert find_splats(recs) == []
    (kind, rec), = find_splats(recs, kernel_only=False)
    assert kind == "WARNING" and rec.facility == 1


# --- taint ------------------------------------------------------------------------------------


def test_read_tainted():
    assert read_tainted() == int(Path("/proc/sys/kernel/tainted").read_text())


def test_taint_letters():
    assert taint_letters(0) == ""
    assert taint_letters(1 << 9) == "W"
    assert taint_letters((1 << 7) | (1 << 9) | (1 << 12)) == "DWO"
    assert taint_letters(1 << 40) == "?"


# --- reader -----------------------------------------------------------------------------------


def test_reader_unavailable_path():
    r = KmsgReader("/nonexistent/kmsg")
    assert not r.available and "/nonexistent/kmsg" in r.reason
    assert r.drain() == []
    r.close()


def test_reader_permission_error(monkeypatch):
    def deny(*_a, **_k):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(kmsg.os, "open", deny)
    r = KmsgReader()
    assert not r.available and "Operation not permitted" in r.reason
    assert r.drain() == []


def test_reader_epipe_and_eagain(monkeypatch):
    script: list[object] = [
        b"6,10,100,-;first\n",
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        b"4,20,200,-;WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1\n",
        b"garbage without separator",
        BlockingIOError(errno.EAGAIN, "again"),
    ]

    def fake_read(_fd, _n):
        item = script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    with KmsgReader("/dev/null") as r:
        assert r.available
        monkeypatch.setattr(kmsg.os, "read", fake_read)
        recs = r.drain()
        monkeypatch.undo()
    assert [x.seq for x in recs] == [10, 20]
    assert r.lost == 1 and len(r.errors) == 1


def _oldest_seq() -> int | None:
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                return parse_kmsg_record(os.read(fd, 1 << 16).decode()).seq
            except BrokenPipeError:
                continue
    except BlockingIOError:
        return None
    finally:
        os.close(fd)


def test_reader_real_dev_kmsg():
    reader = KmsgReader()
    if not reader.available:
        pytest.skip(reader.reason)
    with reader:
        oldest = _oldest_seq()
        first = reader.drain()
        # Starts at the end of the log, not at boot.
        assert oldest is None or all(r.seq > oldest for r in first)

        token = uuid.uuid4().hex
        # This lands in the machine's real kernel log: it says what it is so nobody reading dmesg
        # mistakes it for a kernel WARN (and the kernel tags it facility 1, user). The WARN header
        # has to start the message (matching is anchored), so the tag trails it.
        msg = (f"<4>WARNING: CPU: 0 PID: 1 at kvm_harness_injection.c:1 kvm_harness_injection+0x0/0x1 "
               f"[{INJECTION_TAG} {token}]\n")
        try:
            with open("/dev/kmsg", "w") as f:
                f.write(msg)
        except PermissionError as e:
            pytest.skip(f"cannot write /dev/kmsg: {e}")

        ours = [r for r in reader.drain() if token in r.text]
        assert len(ours) == 1
        (rec,) = ours
        # The kernel forces LOG_USER on records written from user space.
        assert (rec.facility, rec.level) == (1, 4)
        assert rec.text == msg[3:-1]
        assert find_splats(ours) == []
        assert find_splats(ours, kernel_only=False) == [("WARNING", rec)]
        assert INJECTION_TAG in rec.text
        assert all(token not in r.text for r in reader.drain())  # read once, not again
