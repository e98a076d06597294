"""File-backed guest memory and write-back: what the guest writes into a MAP_SHARED file on a real
disk filesystem (ext4 on a loop device: the `file` backing; also the machine's own disk: `file-hostfs`)
reaches the disk after msync/fsync, also while fsync and MADV_PAGEOUT race with the guest's writes;
and truncating the file under a running guest fails the vCPU, not the host.

The oracle reads the file's blocks from the block device itself (FIEMAP extents + O_DIRECT on
/dev/loopN, harness.memory.loopfs): neither the page cache nor an O_DIRECT read of the file (which
flushes dirty pages first) can stand in for the disk. A page whose guest write is missing on disk
after a sync had its dirty state lost: KVM kept a writable mapping past page_mkclean, or never told
the page cache the page was written.

The guest is memtouch (guests/payloads/memtouch.c): cmd 1 writes word(pattern, offset) every
`stride` bytes; the pattern changes each round, so a stale page shows as a mismatch.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from harness import backends
from harness.kvm.errors import KvmError
from harness.kvm.exits import MemoryFault, Mmio
from harness.memory import hostmem
from harness.memory.loopfs import DiskReadUnavailable, block_device, read_odirect, read_on_disk
from harness.memory.memtouch import MemTouch, host_fill
from harness.oracles.dirty import disk_contents
from harness.oracles.verdict import Verdict
from harness.pytest import options

SLOT = 1
GPA = 1 << 40
SIZE = 4 << 20
STRIDE = 512  # 8 words per 4 KiB page
KINDS = ["file", "file-hostfs"]


def _setup(memtouch: MemTouch, backings, kind: str, size: int = SIZE):
    b = backings(kind, size)
    memtouch.vm.add_memslot(GPA, size, slot=SLOT, backing=b)
    gva = memtouch.map_slot(SLOT)
    return b, gva


def disk_check(b, pattern: int, length: int = SIZE) -> Verdict:
    """Read the file back from its block device (or, where that cannot be opened, with O_DIRECT)
    and compare it with what memtouch wrote: word(pattern, o) every STRIDE bytes, zeros between."""
    what = "disk contents"
    try:
        data, missing = read_on_disk(b.fd, b.path, 0, length)
    except DiskReadUnavailable as e:
        # e.g. the root disk refuses direct opens while mounted: fall back to an O_DIRECT read of
        # the file, which catches pages never marked dirty but writes dirty ones back itself
        data, missing = read_odirect(b.path, 0, length), []
        what += f" (O_DIRECT read of the file; {e})"
    want = bytearray(length)
    host_fill(want, pattern, STRIDE)
    return disk_contents(data, bytes(want), not_on_disk=missing, gpa=GPA, what=what)


@pytest.mark.parametrize("sync", ["msync", "fsync"])
@pytest.mark.parametrize("kind", KINDS)
def test_writeback_after_sync(memtouch, backings, kernel_health, kind, sync):
    """Rounds of: guest writes a new pattern over the file; host msync(MS_SYNC) or fsync; the
    disk holds every word. The second and later rounds catch a mapping KVM kept writable after
    write-back cleaned (write-protected) the pages."""
    b, gva = _setup(memtouch, backings, kind)
    rng = random.Random(f"{kind}/{sync}")
    for rnd in range(4):
        pattern = rng.getrandbits(64)
        r = memtouch.write(gva, SIZE, pattern, STRIDE)
        assert r.count == SIZE // STRIDE
        if sync == "msync":
            hostmem.msync(b.addr, SIZE)
        else:
            os.fsync(b.fd)
        disk_check(b, pattern).check(f"round {rnd} after {sync}, {b.describe()}, pattern {pattern:#x}")
    memtouch.done()
    kernel_health.assert_healthy(f"{kind}/{sync}")


@pytest.mark.parametrize("kind", KINDS)
def test_writeback_race(memtouch, backings, kernel_health, request, case_property, kind):
    """While the guest writes round after round, a host thread keeps calling fsync, msync(MS_ASYNC)
    and madvise(MADV_PAGEOUT) on random ranges. After each round and an fsync the disk holds
    that round's words everywhere: nothing the guest wrote is lost to a racing write-back/reclaim."""
    seed = options.seed(request.config)
    seconds = options.race_seconds(request.config)
    b, gva = _setup(memtouch, backings, kind)
    rng = random.Random(seed)
    stop = threading.Event()
    err: list[BaseException] = []
    ops = {"fsync": 0, "pageout": 0, "msync_async": 0}

    def racer() -> None:
        r = random.Random(seed + 1)
        try:
            while not stop.is_set():
                op = r.choice(("fsync", "pageout", "pageout", "msync_async"))
                if op == "fsync":
                    os.fsync(b.fd)
                elif op == "pageout":
                    off = r.randrange(SIZE // 4096) * 4096
                    hostmem.madvise(b.addr + off, min(SIZE - off, r.choice((4096, 65536, 1 << 20))),
                                    hostmem.MADV_PAGEOUT)
                else:
                    hostmem.msync(b.addr, SIZE, 1)  # MS_ASYNC
                ops[op] += 1
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=racer, name="writeback-racer")
    t.start()
    rounds = 0
    try:
        # at least 3 rounds; `seconds` (a soak) or by default until 6 rounds with racing ops (at most `seconds`)
        end = time.monotonic() + seconds
        early = options.race_until_goal(request.config)
        while rounds < 3 or (time.monotonic() < end and not (early and rounds >= 6 and sum(ops.values()) >= 32)):
            pattern = rng.getrandbits(64)
            memtouch.write(gva, SIZE, pattern, STRIDE)
            os.fsync(b.fd)
            disk_check(b, pattern).check(f"round {rounds} (racing fsync/pageout), {b.describe()}, "
                                         f"ops so far {ops}, rerun with --race-seed={seed}")
            rounds += 1
    finally:
        stop.set()
        t.join(10)
    if err:
        raise err[0]
    case_property("rounds", rounds)
    case_property("racer_ops", str(ops))
    assert ops["pageout"] and ops["fsync"], f"the racer did not run: {ops}"
    memtouch.done()
    kernel_health.assert_healthy(f"{kind} race, seed {seed}")


class _Faulted(Exception):
    def __init__(self, how: str, gpa: int) -> None:
        super().__init__(how)
        self.how = how
        self.gpa = gpa


@pytest.mark.parametrize("kind", KINDS)
def test_truncate_under_guest(memtouch, backings, kernel_health, case_property, kind):
    """The guest reads the upper half of the file in a loop from its own thread; the host truncates
    the file to half. The vCPU must fail on the truncated GPAs (KVM_RUN -EFAULT, with a memory-fault
    exit where the kernel gives one; kvm_pvm answers with an MMIO exit), never read the old data,
    and the host process lives on. Growing the file back gives the guest zeros there and leaves the
    lower half intact."""
    b, gva = _setup(memtouch, backings, kind)
    vcpu = memtouch.vcpu
    half = SIZE // 2
    pattern = 0x7A11C0DE
    memtouch.write(gva, SIZE, pattern, 4096)
    assert memtouch.verify(gva, SIZE, pattern, 4096).bad == 0
    hostmem.msync(b.addr, SIZE)
    faults: list[tuple[str, int]] = []
    stale: list[int] = []
    state: dict[str, object] = {}
    truncated = threading.Event()

    def on_exit(v, ex):
        if isinstance(ex, Mmio) and not ex.is_write:
            faults.append(("mmio", ex.phys_addr))
            v.complete_mmio(0)
            raise _Faulted("mmio", ex.phys_addr)
        if isinstance(ex, MemoryFault):
            raise _Faulted(f"KVM_RUN {errno.errorcode.get(ex.errno, ex.errno)} + KVM_EXIT_MEMORY_FAULT", ex.gpa)
        return False

    def reader() -> None:
        try:
            after = 0
            while True:
                was_truncated = truncated.is_set()
                r = memtouch.verify(gva + half, half, pattern, 4096, on_exit=on_exit, timeout=10)
                if was_truncated:
                    after += 1
                    if r.bad == 0:
                        # the whole upper half read back as the old data after the truncate returned
                        stale.append(after)
                    if after >= 20:
                        state["no_fault"] = (after, r.bad, r.first)
                        return
        except _Faulted as f:
            state["fault"] = (f.how, f.gpa)
        except KvmError as e:  # an EFAULT without a memory-fault exit
            state["fault"] = (f"KVM_RUN {errno.errorcode.get(e.errno, e.errno)}", -1)
        except BaseException as e:
            state["error"] = e

    t = threading.Thread(target=reader, name="truncate-reader-vcpu")
    t.start()
    try:
        time.sleep(0.05)
        os.ftruncate(b.fd, half)
        truncated.set()
        t.join(15)
    finally:
        if t.is_alive():
            vcpu.kick()
            t.join(5)
    assert not t.is_alive(), "the vCPU thread is stuck after the truncate"
    if "error" in state:
        raise state["error"]  # type: ignore[misc]
    assert not stale, (f"after ftruncate to {half:#x} the guest still read the old data of the truncated half "
                       f"({len(stale)} full passes): KVM kept a mapping of pages the file no longer has")
    assert "fault" in state, (f"the guest read the truncated range {state.get('no_fault')} (passes, words "
                              "differing from the old data, first offset) times without any fault")
    how, gpa = state["fault"]  # type: ignore[misc]
    case_property("fault", f"{how} at GPA {gpa:#x}")
    if how.startswith("KVM_RUN"):
        assert "EFAULT" in how, f"KVM_RUN failed with {how}, expected EFAULT"
    else:
        assert backends.current().truncated_file_fault == "any", \
            f"upstream KVM answers a truncated file with -EFAULT, this kernel gave {how}"
    if gpa >= 0:
        assert GPA + half <= gpa < GPA + SIZE, f"fault at GPA {gpa:#x}, outside the truncated range " \
                                               f"{GPA + half:#x}-{GPA + SIZE:#x}"
    # grow it back: a hole reads zeros; the lower half kept its data
    os.ftruncate(b.fd, SIZE)
    vcpu.run_until_ucall(on_exit=lambda v, ex: bool(isinstance(ex, Mmio) and v.complete_mmio(0) is None))
    low = memtouch.verify(gva, half, pattern, 4096)
    assert (low.bad, low.first) == (0, None), f"lower half lost {low.bad} words across the truncate"
    high = memtouch.read(gva + half, half, 4096)
    assert (high.bad, high.first) == (0, None), f"regrown upper half: {high.bad} non-zero words (stale data)"
    memtouch.done()
    kernel_health.assert_healthy(f"{kind} truncate ({how} at {gpa:#x})")


def test_file_kinds_are_on_block_devices(backings):
    """(the premise of the oracle) `file` is ext4 on a loop device, `file-hostfs` the machine's disk."""
    for kind in KINDS:
        b = backings(kind, 1 << 20)
        try:
            dev = block_device(b.path)
        except DiskReadUnavailable as e:
            pytest.skip(f"{kind}: {e}")
        if kind == "file":
            assert dev.startswith("/dev/loop"), f"the file backing is on {dev}, not a loop device"
