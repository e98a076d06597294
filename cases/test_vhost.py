"""vhost as a second writer of guest memory (seed 004: vhost writing file-backed MAP_SHARED pages
behind write-back's back).

The harness plays a guest's virtio-vsock driver on vrings it lays out in a memslot (harness.vhost):
/dev/vhost-vsock gets the VM's memslots as its memory table, the host process connects to the guest
CID, and every byte the host sends is written by vhost's worker into RX buffers at GPAs the harness
chose, through the same host mapping KVM maps for the guest. The stream is memtouch words under a
fresh pattern per round and each data page holds poison before it is posted, so the oracles
(harness.vhost.oracle) name a missing, stale or misplaced word. On the `file` backing (ext4 on a
loop device, MAP_SHARED) the disk is read back from the block device after fsync, as
cases/test_writeback.py does.

Cases:
- test_vhost_rx_lands: every backing; vhost's writes are exactly the stream, the vCPU reads the
  same bytes, and (file kinds) after fsync the disk holds them, the pages having been clean first.
- test_vhost_writeback_race: file kinds; vhost and the vCPU write the same pages while fsync,
  sync_file_range, msync(MS_ASYNC) and MADV_PAGEOUT race them; nothing is lost on disk.
- test_vhost_rx_into_lost_memory: munmap / truncate / punch of half the buffers before or while
  vhost writes them: what vhost acknowledged survives (munmap), what the file lost reads zeros
  (truncate, punch), a write into memory that is gone is an error vhost reports (never a silent
  drop), the vCPU sees what the host sees; the device stops, closes and its worker ends in bounds.

Everything waits with a bound; every case closes its device and checks the vhost worker task is
gone. Where /dev/vhost-vsock is missing the cases skip with the kernel config's answer.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from harness.memory import hostmem
from harness.memory.memtouch import word
from harness.pytest import options
from harness.vhost import VhostVsock
from harness.vhost.oracle import partial_copy, zero_or_expected
from harness.vhost.rig import DATA_OFF, DATA_PAGES, PAGE, SIZE, SLOT, Round, VsockRig, writeback_op

KINDS = ["anon", "anon-thp", "shmem", "tmpfs", "hugetlb-2m", "guest_memfd", "file", "file-hostfs"]
DISK_KINDS = ["file", "file-hostfs"]
LOWER = list(range(DATA_PAGES // 2))
UPPER = list(range(DATA_PAGES // 2, DATA_PAGES))


@pytest.fixture
def vhost_vsock() -> None:
    """Skips (VhostUnavailable) where there is no /dev/vhost-vsock, saying why."""
    VhostVsock.open().close()


@pytest.fixture
def rigs(memtouch, backings):
    """make(kind) -> (rig, backing, gva of the slot in the guest); every rig closed after the case
    (before the VM and the backings: this fixture depends on both)."""
    made: list[VsockRig] = []

    def make(kind: str, seed: object) -> tuple[VsockRig, object, int]:
        b = backings(kind, SIZE, vm=memtouch.vm)
        rig = VsockRig(memtouch.vm, b, seed=f"{kind}/{seed}")
        made.append(rig)
        gva = memtouch.map_slot(SLOT)
        return rig, b, gva

    yield make
    for r in made:
        r.close()


def _open(rig: VsockRig) -> None:
    rig.open()
    assert rig.drv is not None and rig.drv.dev is not None
    assert rig.drv.dev.worker_tasks(), (f"no task named {rig.drv.dev.worker_name()} after VHOST_SET_OWNER: the "
                                        "check that the worker ends would prove nothing")


def _close(rig: VsockRig, case_property) -> None:
    took = rig.close_driver()  # VhostStuck when the release or the worker's end exceeds its bound
    assert "worker_gone" in took
    case_property("vhost_close_s", round(took["close"], 4))
    case_property("vhost_worker_gone_s", round(took["worker_gone"], 4))


def _ctx(rig: VsockRig, b, rnd: Round, extra: str = "") -> str:
    s = (f"round {rnd.no}, {b.describe()}, {rig.lay.describe()}, cid {rig.cid}, received {rnd.rx.payload_bytes} "
         f"of {len(rnd.sent)} bytes in {len(rnd.rx.packets)} packets ({rnd.rx.why_stopped}, {rnd.rx.waited:.3f} s, "
         f"rx errors {rnd.rx.rx_errors})")
    return s + (f", {extra}" if extra else "")


@pytest.mark.parametrize("kind", KINDS)
def test_vhost_rx_lands(vhost_vsock, memtouch, rigs, kernel_health, case_property, kind):
    """Three rounds: 128 RX buffers (a 44-byte header slot + a 4 KiB data page each) are posted
    over poison, the host sends 512 KiB; vhost must return every buffer with exactly the stream's
    bytes in order, headers of this connection, nothing written beyond what it returned (the
    poison stays), the vCPU must read the same bytes, and on the file kinds, whose pages were
    cleaned by fsync before vhost wrote them, the disk must hold them after the next fsync."""
    rig, b, gva = rigs(kind, "lands")
    disk = kind in DISK_KINDS
    _open(rig)
    for _ in range(3):
        rnd = rig.post(range(DATA_PAGES))
        if disk:
            os.fsync(b.fd)  # clean, write-protected pages: vhost's writes must dirty them again
        rig.kick_and_send(rnd)
        rig.receive(rnd)
        ctx = _ctx(rig, b, rnd)
        assert rnd.rx.rx_errors == 0 and rnd.rx.tx_errors == 0, f"vhost signalled a queue error: {ctx}"
        rig.memory_verdict(rnd, complete=True).check(ctx)
        rig.guest_verdict(memtouch, gva, rnd).check(ctx)
        if disk:
            os.fsync(b.fd)
            rig.disk_verdict([rig.data_range(rnd.pages), *rig.meta_ranges()]).check(ctx)
        rig.credit(rnd)
    _close(rig, case_property)
    memtouch.done()
    kernel_health.assert_healthy(f"vhost rx {kind}")


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_vhost_writeback_race(vhost_vsock, memtouch, rigs, kernel_health, request, case_property, kind):
    """Two writers on every page: vhost fills the first 2 KiB of each data page while the vCPU
    writes words at +2 KiB and +4088 of the same pages, and a host thread keeps calling fsync,
    sync_file_range (start; wait-write-wait), msync(MS_ASYNC) and MADV_PAGEOUT on random ranges of
    the slot (rings and header slots included). After each round: memory is exactly what both wrote
    (poison elsewhere), the vCPU reads it, and after fsync the disk holds it: write-back that races
    vhost's writes (set_page_dirty behind its back) loses nothing."""
    import threading

    seed = options.seed(request.config)
    seconds = options.race_seconds(request.config)
    rig, b, gva = rigs(kind, seed)
    _open(rig)
    stop = threading.Event()
    err: list[BaseException] = []
    ops: dict[str, int] = {}

    def racer() -> None:
        r = random.Random(seed + 1)
        try:
            while not stop.is_set():
                writeback_op(rig, r, ops)
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=racer, name="vhost-writeback-racer")
    t.start()
    rng = random.Random(seed)
    rounds = 0
    data_gva = gva + DATA_OFF
    n = DATA_PAGES * PAGE
    half = PAGE // 2
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end or rounds < 3:
            rnd = rig.post(range(DATA_PAGES), data_len=half)
            os.fsync(b.fd)
            rig.kick_and_send(rnd)
            # the vCPU writes the same pages while vhost's worker does
            p1, p2 = rng.getrandbits(64), rng.getrandbits(64)
            memtouch.write(data_gva + half, n - half, p1, PAGE)
            memtouch.write(data_gva + PAGE - 8, n - (PAGE - 8), p2, PAGE)
            rnd.extra = {t: [(half, word(p1, t * PAGE).to_bytes(8, "little")),
                             (PAGE - 8, word(p2, t * PAGE).to_bytes(8, "little"))] for t in rnd.pages}
            rig.receive(rnd)
            ctx = _ctx(rig, b, rnd, f"racer ops so far {ops}, rerun with --race-seed={seed}")
            assert rnd.rx.rx_errors == 0 and rnd.rx.tx_errors == 0, f"vhost signalled a queue error: {ctx}"
            rig.memory_verdict(rnd, complete=True).check(ctx)
            rig.guest_verdict(memtouch, gva, rnd).check(ctx)
            os.fsync(b.fd)
            rig.disk_verdict([rig.data_range(rnd.pages), *rig.meta_ranges()]).check(ctx)
            rig.credit(rnd)
            rounds += 1
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive(), f"the write-back racer is stuck (ops {ops})"
    if err:
        raise err[0]
    assert ops.get("pageout") and ops.get("fsync"), f"the racer did not run: {ops}"
    case_property("rounds", rounds)
    case_property("racer_ops", str(ops))
    _close(rig, case_property)
    memtouch.done()
    kernel_health.assert_healthy(f"vhost writeback race {kind}, seed {seed}")


def _lose(how: str, rig: VsockRig, b) -> None:
    """Take the upper half of the data pages away from under vhost."""
    gpa = rig.lay.data_page(UPPER[0])
    n = len(UPPER) * PAGE
    if how == "munmap":
        # munmap, with the range kept reserved (PROT_NONE, MAP_FIXED replaces the file mapping
        # the way munmap removes it) so no other mapping can take the address before remap()
        hostmem.mmap(n, hostmem.PROT_NONE,
                     hostmem.MAP_PRIVATE | hostmem.MAP_ANONYMOUS | hostmem.MAP_FIXED | hostmem.MAP_NORESERVE,
                     -1, 0, rig.hva(gpa))
    elif how == "truncate":
        os.ftruncate(b.fd, rig.off(gpa))
    else:
        b.punch_hole(rig.off(gpa), n)


def _restore(how: str, rig: VsockRig, b) -> None:
    gpa = rig.lay.data_page(UPPER[0])
    if how == "munmap":
        b.remap(rig.off(gpa), len(UPPER) * PAGE)
    elif how == "truncate":
        os.ftruncate(b.fd, SIZE)


@pytest.mark.parametrize("kind", ["file", "shmem"])
@pytest.mark.parametrize("how", ["munmap", "truncate", "punch"])
def test_vhost_rx_into_lost_memory(vhost_vsock, memtouch, rigs, kernel_health, request, case_property,
                                   how, kind):
    """Iterations, each on a fresh vhost device: 128 buffers posted, the host sends 512 KiB, and
    the upper 64 data pages are munmapped / truncated off the file / punched, before the send
    (every third iteration) or a random moment after it. Then the device is stopped (no write
    after), the memory put back (remap / grow) and:

    - vhost never drops silently: a missing piece of the stream comes with an RX error signal
      (munmap, truncate); a punch fails nothing, so all of it arrives; with the memory gone before
      the send, no upper buffer is returned and every lower one is, error signalled;
    - munmap: every buffer vhost returned holds its payload (in memory, and on disk after fsync):
      nothing acknowledged is lost by unmapping; a buffer it did not return holds poison, after a
      prefix (any byte length: copy_to_user faults byte-exact) of stream bytes where the copy faulted;
    - truncate: the upper pages read zeros after the file grows back (nothing vhost wrote survives
      in the file, nor in what the vCPU maps); punch: each upper byte is the expected one or zero
      (a copy preempted mid-page resumes into the fresh page the punch left);
    - the lower half is exact everywhere (and on disk for `file`); the vCPU reads what the host reads;
    - the device stops, closes and its worker ends within bounds; no kernel splat."""
    seed = options.seed(request.config)
    seconds = options.race_seconds(request.config)
    rig, b, gva = rigs(kind, f"{how}/{seed}")
    disk = kind in DISK_KINDS
    rng = random.Random(f"{how}/{kind}/{seed}")
    seen: dict[str, int] = {"before": 0, "racing": 0, "errors": 0, "short": 0}
    it = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end or it < 3:
        before = it % 3 == 0
        delay = rng.choice((0.0, rng.uniform(0, 0.002), rng.uniform(0, 0.02)))
        _open(rig)
        rnd = rig.post(range(DATA_PAGES))
        if disk:
            os.fsync(b.fd)
        lost = False
        try:
            if before:
                _lose(how, rig, b)
                lost = True
            rig.kick_and_send(rnd)
            if not before:
                time.sleep(delay)
                _lose(how, rig, b)
                lost = True
            rig.receive(rnd, settle=0.5)
            assert rig.drv is not None
            rig.drv.stop()
            rig.drv.collect(rnd.rx)
        finally:
            if lost:
                _restore(how, rig, b)
        mode = "before the send" if before else f"{delay * 1e3:.2f} ms into the send"
        ctx = _ctx(rig, b, rnd, f"{how} of pages {UPPER[0]}-{UPPER[-1]} {mode}, iteration {it}, "
                                f"rerun with --race-seed={seed}")
        used = {p.buf.tag for p in rnd.rx.packets}
        short = rnd.rx.payload_bytes < len(rnd.sent)
        seen["before" if before else "racing"] += 1
        seen["errors"] += bool(rnd.rx.rx_errors)
        seen["short"] += short
        if how == "punch":
            assert rnd.rx.rx_errors == 0 and not short, f"a punched hole failed vhost's writes: {ctx}"
        elif short:
            assert rnd.rx.rx_errors, f"vhost returned {rnd.rx.payload_bytes} of {len(rnd.sent)} bytes and " \
                                     f"signalled no error: data dropped silently ({ctx})"
        if before and how != "punch":
            assert rnd.rx.rx_errors, f"vhost wrote into {how} memory without an error: {ctx}"
            assert not used & set(UPPER), f"vhost returned buffers in {how} pages {sorted(used & set(UPPER))}: {ctx}"
            assert set(LOWER) <= used, f"vhost did not return lower buffers {sorted(set(LOWER) - used)}: {ctx}"
        if how == "munmap":
            faulted = {} if before else {t: partial_copy(rnd.pattern, rnd.sent) for t in UPPER if t not in used}
            v = rig.memory_verdict(rnd, tolerate=faulted)
        elif how == "truncate":
            v = rig.memory_verdict(rnd, zero=UPPER)
        else:
            v = rig.memory_verdict(rnd, tolerate={t: zero_or_expected for t in UPPER},
                                   unreliable=[] if before else UPPER)
        v.check(ctx)
        rig.guest_verdict(memtouch, gva, rnd).check(ctx)
        if disk:
            os.fsync(b.fd)
            data = rig.data_range(rnd.pages if how == "munmap" else LOWER)
            rig.disk_verdict([data, *rig.meta_ranges()]).check(ctx)
        _close(rig, case_property)
        it += 1
    case_property("iterations", str(seen))
    memtouch.done()
    kernel_health.assert_healthy(f"vhost {how} {kind}, seed {seed}")
