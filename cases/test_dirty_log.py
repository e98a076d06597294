"""Dirty tracking: KVM_GET_DIRTY_LOG (classic and with manual protect + KVM_CLEAR_DIRTY_LOG) and the
dirty ring report exactly the pages the guest wrote, on every backing that allows dirty logging,
also while 2 MiB mappings are being split, and nothing is lost while a writer runs concurrently
with harvest + re-protect (the live-migration oracle: a copy built only from the reported pages
must equal guest memory).

The guest (guests/payloads/dirty_writer.c) writes one word into each page of a host-chosen random
list, in list order. The test memory is its own slot (slot 1 at GPA 2^40, mapped at GVA 2^39), away
from the boot slot that holds the stack, ucall structs and page tables, so the expected set is
exact: a missing page is a hard failure (lost data), an extra page one too, except those the kernel
documents (KVM_DIRTY_LOG_INITIALLY_SET reports every page until it is first cleared).
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from harness import memory
from harness.kvm.caps import KVM_MEM_LOG_DIRTY_PAGES, Cap
from harness.kvm.dirty import PAGE, DirtyRing, dirty_value, word_offset
from harness.kvm.errors import KvmError
from harness.kvm.exits import DirtyRingFull
from harness.lib.guestvm import GuestVm
from harness.lib.ucall import DONE, SYNC
from harness.memory import PAGE_1G, PAGE_2M, Feature
from harness.oracles.dirty import dirty_pages, migration_copy, ring_order
from harness.pytest import options

SLOT = 1
RING_SECONDS = 30.0  # test_dirty_ring_never_overflows keeps filling the ring this long
GPA = 1 << 40
GVA = 1 << 39
RING_ENTRIES = 4096  # 64 KiB per vCPU, what the kernel docs suggest
MAX_LIST = 8192  # pages the list area holds (64 KiB of scratch)


# ---- the writer ---------------------------------------------------------------------------------
class Writer:
    """A GuestVm running dirty_writer with the test slot; one vCPU."""

    def __init__(self, vm: GuestVm, backing: memory.Backing, size: int, seed: str) -> None:
        self.vm = vm
        self.backing = backing
        self.size = size
        self.npages = size // PAGE
        self.seed = seed
        self.desc = vm.alloc(64, 64)
        self.list = vm.alloc(8 * MAX_LIST, 64)
        vm.vcpu.set_args(self.desc)

    def _desc(self, cmd: int, pages: list[int], rnd: int) -> None:
        if len(pages) > MAX_LIST:
            raise ValueError(f"{len(pages)} pages > {MAX_LIST}")
        self.vm.write(self.list, b"".join(p.to_bytes(8, "little") for p in pages))
        vals = (cmd, GVA, self.list, len(pages), rnd, 0, 0, 0)
        self.vm.write(self.desc, b"".join(v.to_bytes(8, "little") for v in vals))

    def write(self, pages: list[int], rnd: int, on_exit: Callable | None = None) -> None:
        """One guest pass over `pages` (cmd 1); returns at its SYNC."""
        self._desc(1, pages, rnd)
        uc = self.vm.vcpu.run_until_ucall(on_exit=on_exit)
        assert uc.cmd == SYNC and uc.args[:2] == (len(pages), rnd), f"dirty_writer answered {uc!r}"

    def memory(self) -> bytes:
        return self.backing.read(0, self.size)

    def where(self) -> str:
        return f"slot {self.vm.memslots[SLOT].describe()}, seed {self.seed!r}"


def _kind_size(kind: str) -> int:
    page = memory.kind(kind).page_size
    return page if page == PAGE_1G else max(4 << 20, 2 * page)


@pytest.fixture
def make_writer(kvm, backings) -> Iterator[Callable[..., Writer]]:
    """make_writer(kind, ring=0, manual=0, log=True) -> Writer; the VM closes before the backings."""
    made: list[GuestVm] = []

    def make(kind: str, *, ring: int = 0, acq_rel: bool = False, manual: int = 0, log: bool = True,
             size: int | None = None, seed: str = "") -> Writer:
        vm = GuestVm(kvm, "dirty_writer", "long64", nr_vcpus=0)
        made.append(vm)
        if ring:
            vm.enable_dirty_ring(ring * 16, acq_rel=acq_rel)  # before any vCPU (api.rst)
        if manual:
            vm.enable_manual_dirty_log_protect(manual)
        vm.add_vcpu()
        sz = size or _kind_size(kind)
        b = backings(kind, sz, vm=vm)
        flags = KVM_MEM_LOG_DIRTY_PAGES if log else 0
        try:
            vm.add_memslot(GPA, sz, slot=SLOT, backing=b, flags=flags)
        except KvmError as e:
            if b.supports(Feature.GUEST_MEMFD) and log:
                name = errno.errorcode.get(e.errno, e.errno)
                pytest.skip(f"KVM refuses KVM_MEM_LOG_DIRTY_PAGES on a guest_memfd slot ({name}): "
                            "dirty logging of guest_memfd memory is not supported")
            raise
        vm.map_slot(SLOT, GVA)
        return Writer(vm, b, sz, seed or kind)

    yield make
    for vm in made:
        vm.close()


def _rounds(npages: int, seed: str, rounds: int = 3, count: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(npages), min(count, npages)) for _ in range(rounds)]


# ---- KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG --------------------------------------------------------
METHODS = ["get", "manual", "manual-initially-set"]
MANUAL = {"get": 0, "manual": 1, "manual-initially-set": 3}


def _log_kinds() -> list:
    return [pytest.param(k, m, id=f"{k}-{m}") for k in memory.names() for m in METHODS]


@pytest.mark.requires_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2)
@pytest.mark.parametrize(("kind", "method"), _log_kinds())
def test_dirty_log_exact(make_writer, kernel_health, kind, method):
    """Three rounds of random page sets: each GET reports exactly the pages written since the last
    clear. Classic GET clears as it reports (a second GET is empty); with manual protect the bits
    stay until KVM_CLEAR_DIRTY_LOG; with INITIALLY_SET the first GET reports every page."""
    w = make_writer(kind, manual=MANUAL[method], seed=f"{kind}/{method}")
    vm = w.vm
    if method == "manual-initially-set":
        first = vm.get_dirty_pages(SLOT)
        assert first == set(range(w.npages)), \
            f"INITIALLY_SET: first GET reports {len(first)} of {w.npages} pages ({w.where()})"
        vm.clear_dirty_pages(SLOT)
    else:
        first = vm.get_dirty_pages(SLOT)
        dirty_pages((), first, gpa=GPA).check(f"before the guest ran, {w.where()}")
    for rnd, pages in enumerate(_rounds(w.npages, w.seed), 1):
        w.write(pages, rnd)
        got = vm.get_dirty_pages(SLOT)
        dirty_pages(pages, got, gpa=GPA).check(f"{method} round {rnd}, {w.where()}")
        again = vm.get_dirty_pages(SLOT)
        if MANUAL[method]:
            assert again == got, f"manual protect: a second GET changed the report without a CLEAR " \
                                 f"({len(got)} -> {len(again)} pages)"
            vm.clear_dirty_pages(SLOT, got)
            after = vm.get_dirty_pages(SLOT)
            assert not after, f"after KVM_CLEAR_DIRTY_LOG of the reported pages, {len(after)} still dirty"
        else:
            assert not again, f"classic GET did not clear: {len(again)} pages reported again"
    # the data itself: every page holds the last round's word where it was written
    last: dict[int, int] = {}
    for rnd, pages in enumerate(_rounds(w.npages, w.seed), 1):
        for p in pages:
            last[p] = rnd
    for p, rnd in last.items():
        have = int.from_bytes(w.backing.read(p * PAGE + word_offset(p), 8), "little")
        assert have == dirty_value(rnd, p), f"page {p}: {have:#x}, the guest wrote {dirty_value(rnd, p):#x}"
    kernel_health.assert_healthy(w.where())


def _huge_kinds() -> list[str]:
    return memory.names(require=Feature.HUGE, page_sizes=(PAGE_2M,))


@pytest.mark.requires_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2)
@pytest.mark.parametrize("method", ["get", "manual-initially-set"])
@pytest.mark.parametrize("kind", _huge_kinds())
def test_dirty_log_huge_split(make_writer, kernel_health, kind, method):
    """The guest touches the whole slot with logging off (2 MiB host pages, 2 MiB guest pages, so
    KVM may map huge); then logging is switched on (KVM_MR_FLAGS_ONLY) and the guest writes 4 KiB
    pages scattered over every 2 MiB page: the log is exact at 4 KiB granularity, and switching
    logging off and on again starts clean."""
    w = make_writer(kind, manual=MANUAL[method], log=False, size=8 << 20, seed=f"split/{kind}/{method}")
    vm = w.vm
    w.write(list(range(w.npages)), 1)  # fault everything in before logging
    for cycle in range(2):
        vm.set_memslot_flags(SLOT, KVM_MEM_LOG_DIRTY_PAGES)
        if method == "manual-initially-set":
            assert vm.get_dirty_pages(SLOT) == set(range(w.npages)), "INITIALLY_SET: not every page set"
            vm.clear_dirty_pages(SLOT)  # upstream splits here, in CLEAR, not when logging starts
        else:
            got0 = vm.get_dirty_pages(SLOT)
            assert not got0, f"logging just enabled, guest idle: {len(got0)} pages reported"
        rng = random.Random(f"{w.seed}/{cycle}")
        per_huge = PAGE_2M // PAGE
        pages = [h * per_huge + p for h in range(w.npages // per_huge) for p in rng.sample(range(per_huge), 7)]
        rng.shuffle(pages)
        w.write(pages, 10 + cycle)
        got = vm.get_dirty_pages(SLOT)
        dirty_pages(pages, got, gpa=GPA).check(f"{method} after enabling logging on a huge mapping "
                                               f"(cycle {cycle}), {w.where()}")
        vm.set_memslot_flags(SLOT, 0)
        w.write(pages[:50], 20 + cycle)  # written with logging off: must not show up later
    kernel_health.assert_healthy(w.where())


# ---- the dirty ring --------------------------------------------------------------------------------
def _ring_kinds() -> list:
    out = [pytest.param(k, False, id=k) for k in memory.names() if memory.kind(k).page_size != PAGE_1G]
    out.append(pytest.param("anon", True, id="anon-acq_rel"))
    return out


@pytest.mark.requires_cap(Cap.DIRTY_LOG_RING, 4096)
@pytest.mark.parametrize(("kind", "acq_rel"), _ring_kinds())
def test_dirty_ring_order(make_writer, kvm, kernel_health, case_property, kind, acq_rel):
    """Each round the ring holds exactly the pages the guest wrote, in the order it first wrote
    them, all for our slot (a page rewritten while dirty may be pushed again, never more often than
    written: kvm_pvm pushes every rewrite); after KVM_RESET_DIRTY_RINGS the next round's writes are pushed again."""
    if acq_rel and kvm.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL) < 4096:
        pytest.skip("KVM_CAP_DIRTY_LOG_RING_ACQ_REL is 0 on this kernel")
    w = make_writer(kind, ring=RING_ENTRIES, acq_rel=acq_rel, seed=f"ring/{kind}")
    vm = w.vm
    with pytest.raises(KvmError) as ei:
        vm.get_dirty_log(SLOT)
    assert ei.value.errno == errno.ENXIO, f"KVM_GET_DIRTY_LOG with a dirty ring: {ei.value}"
    ring = DirtyRing(vm.vcpu, RING_ENTRIES)
    try:
        for rnd, pages in enumerate(_rounds(w.npages, w.seed, rounds=3, count=300), 1):
            order = pages + pages[: len(pages) // 3]  # rewrites within a round push nothing new
            w.write(order, rnd)
            got = ring.harvest()
            slots = {s for s, _ in got}
            assert slots <= {SLOT}, f"ring entries for slots {slots}, only slot {SLOT} logs"
            v = ring_order(order, [o for _, o in got], gpa=GPA).check(f"round {rnd}, {w.where()}")
            case_property(f"repeated_entries_round{rnd}", v.facts["repeats"])
            n = vm.reset_dirty_rings()
            assert n == len(got), f"KVM_RESET_DIRTY_RINGS reset {n} entries, {len(got)} were harvested"
            assert ring.harvest() == [], "entries appeared with the guest stopped"
    finally:
        ring.close()
    kernel_health.assert_healthy(w.where())


class RingDesync(AssertionError):
    """KVM reported the ring full, yet the entry at the harvest index is not DIRTY."""


def ring_desync_message(ring: DirtyRing, sizes: list[int]) -> str:
    dirty = [i for i in range(ring.entries) if ring.peek(i)[0] & 1]
    idx = ring.fetch % ring.entries
    return (f"KVM_EXIT_DIRTY_RING_FULL, but the entry at the harvest index {ring.fetch} (ring entry {idx}) is not "
            f"DIRTY while {len(dirty)} other entries are (e.g. entries {dirty[:6]}): KVM pushed past the end of "
            f"the {ring.entries}-entry ring, overwriting entries nobody had harvested (lost dirty pages) and "
            f"leaving its indexes out of step with userspace, so the vCPU can only exit ring-full forever. "
            f"Entries harvested at each earlier full exit: {sizes} (soft limit {ring.entries - 64}; "
            f"{sizes.count(ring.entries)} exits found the ring completely full). Expect the kernel's "
            "WARN_ON_ONCE in kvm_dirty_ring_push (virt/kvm/dirty_ring.c) on the first occurrence since boot")


@pytest.mark.requires_cap(Cap.DIRTY_LOG_RING, 4096)
@pytest.mark.shard_weight(45)  # ~30 s under TCG: fills the ring for RING_SECONDS
def test_dirty_ring_never_overflows(make_writer, kernel_health, case_property):
    """A 256-entry ring (the minimum: one page; soft limit 192, 64 entries reserved) filled again
    and again: each time the vCPU exits with KVM_EXIT_DIRTY_RING_FULL, the host harvests + resets
    and resumes it. KVM must exit before the reserve runs out: the ring never overflows, every
    written page is harvested, in order, and every full exit finds entries to harvest."""
    entries = 256
    # On kvm_pvm the first overflow came after 4..36 passes of 8192 pages (5 runs; 6 passes missed it
    # in 1 of 4 runs once this case ran alone): keep filling for RING_SECONDS (at least min_passes)
    # so a kernel with the bug is caught every run, not by chance. A correct kernel pays the full
    # RING_SECONDS (or max_passes).
    min_passes, max_passes = 6, 400
    w = make_writer("anon", ring=entries, size=32 << 20, seed="ring-full")
    ring = w.vm.own(DirtyRing(w.vm.vcpu, entries))
    got: list[int] = []
    sizes: list[int] = []
    resets: list[int] = []  # len(got) at each full exit's reset: ring_order excuses the write it interrupted
    repushed = 0

    def on_exit(vcpu, ex):
        if isinstance(ex, DirtyRingFull):
            h = ring.harvest()
            if not h:
                raise RingDesync(ring_desync_message(ring, sizes))
            sizes.append(len(h))
            got.extend(o for _, o in h)
            resets.append(len(got))
            w.vm.reset_dirty_rings()
            return True
        return False

    pages = list(range(w.npages))
    random.Random(w.seed).shuffle(pages)
    t0 = time.monotonic()
    rnd = 0
    try:
        while rnd < min_passes or (rnd < max_passes and time.monotonic() - t0 < RING_SECONDS):
            rnd += 1
            got.clear()
            resets.clear()
            w.write(pages, rnd, on_exit=on_exit)
            got.extend(o for _, o in ring.harvest())
            w.vm.reset_dirty_rings()
            v = ring_order(pages, got, gpa=GPA, resets=resets)
            v.check(f"pass {rnd}; entries harvested at each full exit: {sizes}")
            repushed += v.facts["repushes"]
    finally:
        case_property("passes", rnd)
        case_property("repushed_after_full_exit", repushed)
        case_property("full_exits", len(sizes))
        case_property("max_harvest", max(sizes, default=0))
    assert len(sizes) >= rnd * len(pages) // entries, \
        f"only {len(sizes)} ring-full exits for {rnd * len(pages)} writes"
    kernel_health.assert_healthy(w.where())


# ---- concurrent writer: nothing lost ---------------------------------------------------------------
@pytest.mark.requires_cap(Cap.DIRTY_LOG_RING, 4096)
@pytest.mark.requires_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2)
@pytest.mark.parametrize("kind", ["anon", "shmem", "anon-thp"])
@pytest.mark.parametrize("method", ["ring", "get", "manual-clear"])
def test_dirty_concurrent_no_loss(make_writer, kernel_health, request, case_property, method, kind):
    """The guest rewrites a random page set round after round (each write a new value) while the
    host, like a migration, repeatedly collects the dirty pages (ring harvest + KVM_RESET_DIRTY_RINGS,
    or GET_DIRTY_LOG, or GET + CLEAR_DIRTY_LOG) and only then copies them. After the guest stops
    and a final collection, the copy must equal guest memory: any page that differs had a write
    whose dirty bit was lost."""
    seed = options.seed(request.config)
    seconds = options.race_seconds(request.config)
    ring_entries = RING_ENTRIES if method == "ring" else 0
    w = make_writer(kind, ring=ring_entries, manual=1 if method == "manual-clear" else 0,
                    seed=f"{method}/{kind}/{seed}")
    vm = w.vm
    rng = random.Random(seed)
    pages = rng.sample(range(w.npages), min(600, w.npages))
    written = set(pages)
    ring = vm.own(DirtyRing(vm.vcpu, ring_entries)) if ring_entries else None
    copy = bytearray(w.memory())
    src = w.backing.view(0, w.size)
    reported: set[int] = set()
    order_bad: list[str] = []

    def collect() -> set[int]:
        if ring is not None:
            got = ring.harvest()
            vm.reset_dirty_rings()
            bad = {s for s, _ in got if s != SLOT}
            if bad:
                order_bad.append(f"ring entries for slots {bad}")
            return {o for _, o in got}
        got = vm.get_dirty_pages(SLOT)
        if method == "manual-clear" and got:
            vm.clear_dirty_pages(SLOT, got)
        return got

    def copy_pages(ps: set[int]) -> None:
        for p in ps:
            o = p * PAGE
            copy[o:o + PAGE] = src[o:o + PAGE]

    # the vCPU runs cmd 2 in its own thread; DIRTY_RING_FULL waits for the collector
    w._desc(2, pages, 1)
    result: dict[str, object] = {}

    full_since: list[float] = []

    def on_exit(vcpu, ex):
        if isinstance(ex, DirtyRingFull):
            # the collector thread harvests; if it finds nothing for long, the ring is out of step
            now = time.monotonic()
            if not full_since:
                full_since.append(now)
            elif now - full_since[0] > 2.0 and ring is not None:
                raise RingDesync(ring_desync_message(ring, []))
            time.sleep(0.0005)
            return True
        full_since.clear()
        return False

    def run() -> None:
        try:
            result["uc"] = vm.vcpu.run_until_ucall(seconds + 20, on_exit=on_exit)
        except BaseException as e:  # reported by the main thread
            result["error"] = e

    t = threading.Thread(target=run, name="dirty-writer-vcpu")
    t.start()
    collections = 0
    try:
        # at least 3 guest rounds within a hard bound; `seconds` (a soak), or by default until 6 rounds
        # and as many collections (at most `seconds`)
        end = time.monotonic() + seconds
        early = options.race_until_goal(request.config)
        while t.is_alive() and time.monotonic() < end + 15:
            rounds_now = vm.read_u64(w.desc + 48)
            if rounds_now >= 3 and (time.monotonic() >= end or (early and rounds_now >= 6 and collections >= 6)):
                break
            got = collect()
            reported |= got
            copy_pages(got)
            collections += 1
    finally:
        vm.write_u64(w.desc + 40, 1)  # stop
        t.join(seconds + 30)
        if t.is_alive():
            vm.vcpu.kick()
            t.join(5)
    assert not t.is_alive(), "the vCPU thread did not stop"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    uc = result["uc"]
    assert uc.cmd == SYNC, f"dirty_writer answered {uc!r}"  # type: ignore[union-attr]
    rounds, nwrites = uc.args[:2]  # type: ignore[union-attr]
    case_property("guest_writes", nwrites)
    final = collect()
    reported |= final
    copy_pages(final)
    case_property("rounds", rounds)
    case_property("collections", collections)
    assert rounds >= 3, f"the guest completed only {rounds} rounds (seed {seed})"
    migration_copy(bytes(src), bytes(copy), gpa=GPA).check(
        f"{method}, {rounds} rounds, {collections} collections, {w.where()}, rerun with --race-seed={seed}")
    extra = reported - written
    assert not extra and not order_bad, f"reported pages the guest never wrote: {sorted(extra)[:10]} {order_bad}"
    kernel_health.assert_healthy(w.where())
    vm.write_u64(w.desc, 0)
    assert vm.vcpu.run_until_ucall().cmd == DONE

