"""Device memory (seed 000): memslots on persistent memory mapped through DAX, so KVM maps ZONE_DEVICE
pages: devdax (/dev/daxX.Y) and fsdax (a file on ext4 -o dax on /dev/pmemN), harness/memory/dax.py.

  coherence   the guest writes through a DAX-backed memslot; the host reads the same bytes through
              the DAX mapping, through a second view (devdax: another mapping of the device; fsdax:
              after fsync, read(2) of the file and the file's blocks read from /dev/pmemN), and the
              guest reads what the host wrote (through the mapping and, fsdax, pwrite(2)).
  zone device the host mapping's pages are the pmem's own (their PFNs lie in the namespace's
              physical range, not in System RAM), the mapping's page size (devdax: 2 MiB), and KVM's
              own mapping of them (the VM's pages_2m / pages_4k stats).
  races       host punch / DONTNEED / munmap+mmap / mprotect / memslot changes against faulting vCPUs
              on DAX memory, with the race engine's oracles (stale data, progress, kernel log); the
              -kvmclock ones also race KVM's own gfn_to_pfn_cache writes into a ZONE_DEVICE page.
  planted     a remap that serves the other half's old pages without their new data must fail the
              stale oracle: proof the races above can see a stale DAX page.

Without pmem every case skips with the reason ("no /dev/pmem* or /dev/dax*: ..."); the QEMU kernel
runner gives its guest two nvdimms (`python -m harness kernel --kernel debian:7.3 -- cases/test_dax.py`).
The generic memslot, coherence, dirty-log and soak cases take devdax and fsdax like any other kind.
"""

from __future__ import annotations

import os
import random
import re
from array import array

import pytest

from harness import memory
from harness.memory import PAGE_2M, PAGE_4K, Feature, dax
from harness.memory.loopfs import read_on_disk
from harness.memory.memtouch import checksum, host_check, host_fill, offsets, words
from harness.race import Race, RaceSpec
from harness.race import protocol as P
from harness.race.disruptors import DISRUPTORS
from harness.race.disruptors.host import Remap

SLOT = 1
GPA = 1 << 36
SIZE = 4 << 20  # two 2 MiB pages
STRIDE = 64
KINDS = memory.names(require=Feature.DAX)
M4, M2 = PAGE_4K, PAGE_2M


def _slot(memtouch, backings, kind: str, size: int = SIZE):
    b = backings(kind, size, vm=memtouch.vm)
    memtouch.vm.add_memslot(GPA, size, slot=SLOT, backing=b)
    return b, memtouch.map_slot(SLOT)


# ---- coherence ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_guest_writes_host_reads(kvm, backings, memtouch, kind):
    """Guest writes -> the host reads them through the DAX mapping and through a second view of the
    same memory; host writes (mapping, and fsdax pwrite) -> the guest reads them."""
    b, gva = _slot(memtouch, backings, kind)
    rng = random.Random(kind)
    p1, p2, p3 = rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(64)
    where = f"slot {memtouch.vm.memslots[SLOT].describe()}, {b.describe()}"

    r = memtouch.write(gva, SIZE, p1, STRIDE)
    assert (r.bad, r.count) == (0, len(offsets(SIZE, STRIDE)))
    assert host_check(b.view(0, SIZE), p1, STRIDE) == (0, None), f"the DAX mapping: {where}"
    if kind == "fsdax":
        b.fsync()  # DAX: writes through the mapping are in the pmem already; fsync flushes CPU caches
        assert host_check(b.read_fd(0, SIZE), p1, STRIDE) == (0, None), f"read(2) of the file: {where}"
        media, missing = read_on_disk(b.fd, b.path, 0, SIZE)
        assert missing == [], f"parts of the file have no written extent on /dev/pmem after fsync: {missing}"
        assert host_check(media, p1, STRIDE) == (0, None), f"the file's blocks on the pmem device: {where}"
    else:
        assert host_check(b.read_fd(0, SIZE), p1, STRIDE) == (0, None), \
            f"a second mapping of {b.device} at offset {b.offset:#x}: {where}"

    host_fill(b.view(0, SIZE), p2, STRIDE)
    r = memtouch.verify(gva, SIZE, p2, STRIDE)
    assert (r.bad, r.first) == (0, None), f"guest sees {r.bad} host-written words wrong, first at {r.first}"
    assert r.checksum == checksum(words(p2, SIZE, STRIDE))
    if kind == "fsdax":
        # the other direction through the file: pwrite goes to the pmem pages the guest maps
        half = SIZE // 2
        data = words(p3, half, 8).tobytes()  # as the guest counts: offsets from gva + half
        assert os.pwrite(b.fd, data, half) == half
        r = memtouch.verify(gva + half, half, p3, 8)
        assert (r.bad, r.first) == (0, None), f"guest sees {r.bad} words of a pwrite(2) wrong, first at {r.first}"
    memtouch.done()


# ---- ZONE_DEVICE pages, and KVM mapping them ------------------------------------------------------
def _stat(stats: dict, name: str) -> int:
    v = stats.get(name, 0)
    return v if isinstance(v, int) else 0


@pytest.mark.parametrize("kind", KINDS)
def test_kvm_maps_zone_device_pages(kvm, backings, memtouch, case_property, kind):
    """The host mapping's pages are the pmem's (PFNs inside the namespace's physical range, none in
    System RAM), mapped as the kind says (devdax: 2 MiB pages), and KVM maps them into the guest:
    its pages_2m / pages_4k stats cover the slot after the guest touched it."""
    vm = memtouch.vm
    stats0 = vm.stats().read()
    b, gva = _slot(memtouch, backings, kind)
    assert memtouch.write(gva, SIZE, 0xDA7A, PAGE_4K).bad == 0  # one word per 4 KiB page
    stats1 = vm.stats().read()

    pfns = dax.pagemap_pfns(b.addr, SIZE, PAGE_4K)
    assert None not in pfns, f"pages of the mapping not present after the guest wrote them: {pfns.index(None)}"
    with open("/proc/iomem") as f:
        iomem = f.read()
    ram = dax.iomem_ranges(iomem, "System RAM")
    in_ram = [p for p in pfns if any(lo <= p << 12 <= hi for lo, hi in ram)]
    assert not in_ram, f"{len(in_ram)} pages of the DAX mapping are System RAM (first pfn {in_ram[0]:#x}): " \
                       "page cache or anonymous memory, not the device's"
    nss = [n for n in dax.scan_namespaces() if n.resource is not None]
    if nss:
        outside = [p for p in pfns if not any(n.resource <= p << 12 < n.resource + n.size for n in nss)]
        assert not outside, f"pfn {outside[0]:#x} is in no pmem namespace: " + \
                            ", ".join(n.describe() for n in nss)
    with open("/proc/self/smaps") as f:
        sm = dax.smaps_entry(f.read(), b.addr)
    case_property("smaps", {k: sm.get(k) for k in ("path", "KernelPageSize", "Rss", "FilePmdMapped")})
    page = dax.kb(sm["KernelPageSize"])
    if kind == "devdax":
        assert page == PAGE_2M and sm["path"] == b.device, f"devdax mapping in smaps: {sm}"

    d4k = _stat(stats1, "pages_4k") - _stat(stats0, "pages_4k")
    d2m = _stat(stats1, "pages_2m") - _stat(stats0, "pages_2m")
    case_property("kvm_pages_4k_delta", d4k)
    case_property("kvm_pages_2m_delta", d2m)
    if "pages_2m" not in stats1:
        pytest.skip(f"this KVM has no pages_4k/pages_2m VM stats (it has {sorted(stats1)[:8]}...): "
                    "the host side was checked, KVM's mapping level is not observable")
    if kind == "devdax":
        assert d2m >= SIZE // PAGE_2M, \
            f"KVM mapped the devdax slot with {d2m} 2 MiB and {d4k} 4 KiB pages; the host maps it with " \
            f"{page >> 10} KiB pages: a 2 MiB device page should be one 2 MiB SPTE"
    else:
        assert d4k * PAGE_4K + d2m * PAGE_2M >= SIZE, \
            f"KVM maps {d4k} 4 KiB + {d2m} 2 MiB pages after the guest touched {SIZE >> 20} MiB of fsdax"
    memtouch.done()


# ---- races -----------------------------------------------------------------------------------------
BASE = ("stale", "progress", "kernel", "overlap")
EXTRA = {"mprotect": ("ro-write",), "punch": ("released",), "dontneed": ("released",)}


def _race(disruptor: str, kind: str, vcpus: int, page: int, clock: bool = False) -> object:
    cid = f"{disruptor}-{kind}-{vcpus}vcpu-{'2m' if page == M2 else '4k'}" + ("-kvmclock" if clock else "")
    return pytest.param(disruptor, kind, vcpus, page, clock, id=cid)


# devdax: nothing to punch (Feature.DEVICE); DONTNEED only zaps its page tables (the memory stays).
# fsdax: punching a DAX file frees pmem blocks under KVM's mapping (dax_break_layout waits for page
# references: the seed's kvm_vcpu_map question), remap flips between two halves of the file.
RACES = [
    _race("punch", "fsdax", 1, M4), _race("punch", "fsdax", 2, M4), _race("dontneed", "fsdax", 2, M4),
    _race("remap", "fsdax", 1, M4), _race("mprotect", "fsdax", 2, M4), _race("slot-readd", "fsdax", 1, M4),
    _race("dontneed", "devdax", 2, M2), _race("remap", "devdax", 1, M2), _race("mprotect", "devdax", 2, M2),
    _race("slot-readd", "devdax", 1, M2), _race("slot-move", "devdax", 1, M2),
    # KVM's own writes into a ZONE_DEVICE page (pvclock through the gfn_to_pfn_cache) while it goes
    _race("punch", "fsdax", 1, M4, clock=True), _race("dontneed", "devdax", 1, M2, clock=True),
]


@pytest.mark.parametrize(("disruptor", "kind", "vcpus", "page", "clock"), RACES)
def test_dax_race(race, disruptor, kind, vcpus, page, clock):
    """The disruptor mutates the DAX backing while the vCPUs sweep it: no stale data, every vCPU makes
    progress, no splat (the failure message carries the report and the rerun command)."""
    oracles = BASE + EXTRA.get(disruptor, ()) + (("kvmclock",) if clock else ())
    rep = race(kind, (disruptor,), vcpus=vcpus, page=page, oracles=oracles, kvmclock=clock)
    assert sum(rep.sweeps) >= vcpus and rep.total_ops > 0
    if clock:
        assert rep.clock_seen > 0, "no kvmclock update was ever seen: the oracle checked nothing"


# ---- the planted fault -------------------------------------------------------------------------------
class StaleRemap(Remap):
    """A broken remap: it maps the other half of the DAX memory in, then publishes the new generation
    without writing its data there. The other half holds a copy of the first generation (made before
    the vCPUs start) or what it held when it was last mapped: a stale page served under a newer
    generation, which the guest compares against and must report."""

    name = "broken-dax-remap"

    def prepare(self) -> None:
        super().prepare()
        assert self.flip, "the planted fault needs the double-size backing remap flips into"
        b, n = self.ctx.backing, self.mem.size
        b.view(n, n)[:] = b.view(0, n)  # generation 1 everywhere: the old data the broken remap serves

    def end(self, off: int, length: int) -> None:
        m = self.mem
        gen = m.gen + 1
        p0, p1 = m.pages_of(off, length)
        m.gentab[p0:p1] = array("Q", (2 * gen,)) * (p1 - p0)  # published, but the tags are the old ones
        m.gen = gen
        self.abort()  # the writers' lock, released without end()'s writing and publishing
        self.ops += 1
        self.bytes += length


@pytest.mark.parametrize("kind", KINDS)
def test_planted_stale_dax_page_is_caught(kvm, backings, monkeypatch, kind):
    """The stale oracle fails on the planted fault: guest reads return an older generation's tag (the
    harness compares them with the generation the host published) and the report says so."""
    monkeypatch.setitem(DISRUPTORS, StaleRemap.name, StaleRemap)
    page = M2 if memory.kind(kind).page_size == PAGE_2M else M4
    spec = RaceSpec(kind, (StaleRemap.name,), vcpus=1, page=page, seconds=1.0, seed=15, label=f"planted-{kind}")
    race = Race(kvm, spec, lambda k, size, vm: backings(k, size, vm=vm))
    try:
        rep = race.run()
    finally:
        race.close()
    fails = rep.failures(("stale",))
    assert rep.violation_count > 0 and fails, f"the planted stale pages went unnoticed:\n{rep.summary()}"
    older = [v for v in rep.violations if v.seen_gen is not None and P.gen_before(v.seen_gen, v.expected_gen)]
    assert older, "only zeros were served, never an older generation: " + "; ".join(
        v.describe() for v in rep.violations[:3])
    assert re.search(r"stale", fails[0]), fails[0]
    assert rep.failures(("progress", "kernel")) == [], rep.summary()
