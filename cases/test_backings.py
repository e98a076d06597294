"""Every memory backing: guest and host see the same bytes, a punched hole reads zeros and really
frees the memory, and a remapped host range reaches the guest.

Backings come from harness.memory (anon, anon-shared, anon-thp, shmem, tmpfs, hugetlb(fs)-2m/1g,
guest_memfd, file on ext4-on-loop, file on the host's fs); hugetlb cases reserve their pages and
skip with the reason when the pool cannot grow. guest_memfd slots are bound with
KVM_SET_USER_MEMORY_REGION2 and their host mapping as userspace_addr (see test_guest_memfd_source).
"""

from __future__ import annotations

import random
from array import array

import pytest

from harness import backends, memory
from harness.kvm.caps import KVM_MEM_GUEST_MEMFD
from harness.memory import PAGE_1G, PAGE_2M, PAGE_4K, Feature, usage
from harness.memory.memtouch import checksum, host_check, host_fill, offsets, words

SLOT = 1
GPAS = {"gpa=2^36": 1 << 36, "gpa=2^40": 1 << 40, "gpa=top": None}  # top: the slot ends at 2^MAXPHYADDR


def _stride(size: int) -> int:
    """Below 1 GiB at most 4096 words per pass: every word of a 4 KiB slot, and 8 words in every 4 KiB
    page of a 2 MiB slot (each page's translation is still checked both ways, at 8 in-page offsets);
    every guest access costs ~15 us on kvm_pvm, so the 32k words per pass it once had made each 2 MiB
    case ~1.3 s of guest time for the same pages. A 1 GiB slot keeps one word per 32 KiB."""
    return max(8, size // (32768 if size >= PAGE_1G else 4096))


def _gpa(where: str, size: int, maxphyaddr: int) -> int:
    gpa = GPAS[where]
    return (1 << maxphyaddr) - size if gpa is None else gpa


def _coherence_params() -> list:
    out = []
    for kind in memory.names():
        if memory.kind(kind).page_size == PAGE_1G:
            # each of these takes a whole 1 GiB page from the pool: a few placements only
            out += [pytest.param(kind, PAGE_4K, "gpa=2^40", id=f"{kind}-4k-gpa=2^40"),
                    pytest.param(kind, PAGE_2M, "gpa=top", id=f"{kind}-2m-gpa=top")]
            continue
        for size, sname in ((PAGE_4K, "4k"), (PAGE_2M, "2m")):
            out += [pytest.param(kind, size, where, id=f"{kind}-{sname}-{where}") for where in GPAS]
    # 1 GiB slots where hugepages back them
    for kind, where in (("hugetlb-1g", "gpa=2^36"), ("hugetlbfs-1g", "gpa=top"), ("hugetlb-2m", "gpa=2^40"),
                        ("anon-thp", "gpa=top")):
        out.append(pytest.param(kind, PAGE_1G, where, id=f"{kind}-1g-{where}"))
    return out


@pytest.mark.parametrize(("kind", "size", "where"), _coherence_params())
def test_coherence(kvm, backings, memtouch, kind, size, where):
    """Guest writes -> host reads it through its mapping; host writes -> guest reads and checksums."""
    vm = memtouch.vm
    gpa = _gpa(where, size, kvm.maxphyaddr)
    b = backings(kind, size, vm=vm)
    vm.add_memslot(gpa, size, slot=SLOT, backing=b)
    gva = memtouch.map_slot(SLOT)
    stride = _stride(size)
    rng = random.Random(f"{kind}/{size}/{where}")
    p1, p2 = rng.getrandbits(64), rng.getrandbits(64)

    r = memtouch.write(gva, size, p1, stride)
    assert r.count == len(offsets(size, stride))
    bad, first = host_check(b.view(0, size), p1, stride)
    assert bad == 0, f"host sees {bad} of {r.count} guest-written words wrong, first at {first:#x} " \
                     f"(slot {vm.memslots[SLOT].describe()})"
    if b.supports(Feature.FD) and not b.supports(Feature.GUEST_MEMFD):
        # a second host view: read(2) on the file goes through the page cache, not the mapping
        assert b.read_fd(0, 64) == b.read(0, 64)

    host_fill(b.view(0, size), p2, stride)
    r = memtouch.verify(gva, size, p2, stride)
    assert (r.bad, r.first) == (0, None), f"guest sees {r.bad} host-written words wrong, first at {r.first}"
    assert r.checksum == checksum(words(p2, size, stride))
    memtouch.done()


# ---- punch hole ---------------------------------------------------------------------------------
def _punch_geometry(kind: str) -> tuple[int, int, int, int]:
    """(slot size, hole offset, hole length, stride) for a kind: the hole is not aligned to anything
    larger than the kind's page, so "exactly that range" means something."""
    page = memory.kind(kind).page_size
    if page == PAGE_4K:
        return 8 << 20, 0x103000, 0x325000, 512
    if page == PAGE_2M:
        return 4 * page, page, page, 4096
    return 2 * page, page, page, page // 16384  # two 1 GiB pages: drop the second


# figures of this process or this object: the hole must come off them (Rss* allow for the
# interpreter's own churn); system-wide ones (Shmem, Unevictable, the pool's free count) are
# shared with other xdist workers and only recorded. A file's page cache (page_cache) is exact,
# with what the hole's edge folios keep: _page_cache_kept
_PER_PROCESS = {"RssAnon": 0.9, "RssShmem": 0.9, "AnonHugePages": 1.0}


def _page_cache_kept(b: memory.Backing, off: int, length: int) -> tuple[int, list[str]]:
    """Bytes of the hole a file's page cache keeps after the punch, from the folios at the hole's
    edges as they are just before it (and what they are, for the message).

    The punch frees the file's blocks in the hole exactly (st_blocks: the footprint); the page cache
    goes by folio (truncate_pagecache_range -> truncate_inode_pages_range, mm/truncate.c): folios
    wholly inside the hole are dropped, and a large folio across an edge of the hole is zeroed in
    the hole, then split there so the hole's part can go (truncate_inode_partial_folio). A split
    first needs the filesystem to release the folio's private state (__folio_split ->
    filemap_release_folio -> ->release_folio, Documentation/filesystems/vfs.rst), which buffer heads
    (ext4: try_to_free_buffers frees nothing while a buffer is dirty, fs/buffer.c) and iomap
    (iomap_release_folio) refuse while the folio is dirty. Such a folio stays whole ("stubbornly
    unsplit": its hole part reads zeros, its blocks are gone) and keeps its part of the hole cached.
    ext4 has large folios since 6.16, and read-ahead decides their sizes: on Debian's 6.18.15,
    7.2.13 and 7.3.4 the guest's writes fault this mapping in folios growing to the 128 KiB
    read-ahead window (page_cache_ra_order), so the dirty ones at the edges of this hole keep
    0x1d000 + 0x8000 of 0x325000. With 4 KiB folios (6.12's ext4), clean ones, or edge folios that
    end at the hole (a 6.18.44 host faulted 4 and 16 KiB ones there) nothing stays."""
    kept: dict[int, int] = {}
    seen = []
    for edge in (off, off + length - PAGE_4K):
        f = usage.folio_at(b.addr + edge)
        seen.append(f"{edge:#x} in {f.describe(b.addr)}")
        hole_lo, hole_hi = b.addr + off, b.addr + off + length
        across = f.addr < hole_lo or f.end > hole_hi
        if f.large and across and f.has(usage.KPF_DIRTY) and f.has(usage.KPF_PRIVATE):
            kept[f.addr] = min(f.end, hole_hi) - max(f.addr, hole_lo)  # one folio may hold both edges
    return sum(kept.values()), seen


def _system_figures(kind: str, b: memory.Backing) -> dict[str, int]:
    """How much memory the backing holds, counted the ways the kind allows."""
    f: dict[str, int] = {"footprint": b.footprint()}
    if b.supports(Feature.HUGETLB):
        f["hugepages_in_use"] = -usage.hugepage_counter(b.page_size, "free_hugepages")
    elif kind in ("anon", "anon-thp"):
        f["RssAnon"] = usage.process_rss()["RssAnon"]
        if kind == "anon-thp":
            f["AnonHugePages"] = b.thp_bytes()
    elif kind == "anon-shared":
        f["RssShmem"] = usage.process_rss()["RssShmem"]
    elif kind == "guest_memfd":
        f["Unevictable"] = usage.meminfo()["Unevictable"]
    elif kind in ("shmem", "tmpfs"):
        f["Shmem"] = usage.meminfo()["Shmem"]
    elif kind.startswith("file"):
        f["page_cache"] = b.cached()
    return f


# devdax (Feature.DEVICE) is left out: a device's memory has no hole to punch and never goes back
@pytest.mark.parametrize("kind", memory.names(exclude=Feature.DEVICE))
def test_punch_hole(kvm, backings, memtouch, kind, case_property):
    """After the kind's punch (fallocate PUNCH_HOLE, or madvise DONTNEED/REMOVE for anonymous
    memory) the guest reads zeros in exactly that range, the old data elsewhere, and the memory
    the backing holds drops by the hole's size."""
    vm = memtouch.vm
    size, off, length, stride = _punch_geometry(kind)
    b = backings(kind, size, vm=vm)
    gpa = 1 << 40
    vm.add_memslot(gpa, size, slot=SLOT, backing=b)
    gva = memtouch.map_slot(SLOT)
    pattern = random.Random(kind).getrandbits(64) | 1

    assert memtouch.write(gva, size, pattern, stride).bad == 0
    before = _system_figures(kind, b)
    assert before["footprint"] >= size, f"{b.footprint_method}: {before['footprint']:#x} < {size:#x} written"
    if "page_cache" in before:
        kept, edges = _page_cache_kept(b, off, length)
        case_property("page_cache_kept", kept)
        case_property("edge_folios", "; ".join(edges))
    b.punch_hole(off, length)
    after = _system_figures(kind, b)
    deltas = {k: before[k] - after[k] for k in before}
    for k, v in deltas.items():
        case_property(f"released_{k}", v)

    # the guest: zeros exactly in the hole, the pattern around it
    expect = words(pattern, size, stride)
    lo, hi = off // stride, (off + length) // stride
    expect[lo:hi] = array("Q", [0] * (hi - lo))
    r = memtouch.verify(gva, size, pattern, stride)
    assert (r.bad, r.first) == (hi - lo, off), (
        f"guest: {r.bad} words differ from the pattern, first at {r.first}; "
        f"the hole is {hi - lo} words at {off:#x}")
    z = memtouch.read(gva + off, length, stride)
    assert (z.bad, z.first) == (0, None), f"guest reads {z.bad} non-zero words in the hole (+{z.first})"
    assert r.checksum == checksum(expect), "guest checksum: the words outside the hole changed"
    # the host mapping agrees
    assert host_check(b.view(0, off), pattern, stride) == (0, None)
    tail = b.view(off + length, size - off - length)
    assert host_check(tail, pattern, stride, base=off + length) == (0, None)

    # the memory is really gone
    assert deltas["footprint"] == length, \
        f"{b.footprint_method}: {before['footprint']:#x} -> {after['footprint']:#x}, hole {length:#x} " \
        f"({b.punch_method})"
    for k, share in _PER_PROCESS.items():
        if k in deltas:
            assert deltas[k] >= share * length, f"{k}: {before[k]:#x} -> {after[k]:#x}, hole {length:#x}"
    if "page_cache" in deltas:
        assert deltas["page_cache"] == length - kept, \
            f"page_cache (mincore): {before['page_cache']:#x} -> {after['page_cache']:#x}, hole {length:#x}, " \
            f"{kept:#x} of it in dirty large folios across its edges; edge folios before: {'; '.join(edges)}"
    memtouch.done()


@pytest.mark.parametrize("kind", memory.names())
def test_remap(kvm, backings, memtouch, kind):
    """remap() replaces the host mapping in place (MAP_FIXED): KVM must drop its translation. Kinds
    that map the same object again keep the data; anonymous kinds get fresh zero pages."""
    vm = memtouch.vm
    page = memory.kind(kind).page_size
    # remap the second page (hugepage) of four; a 1 GiB kind remaps its only page
    size, off = (page, 0) if page == PAGE_1G else (max(4 * page, 4 << 20), page)
    b = backings(kind, size, vm=vm)
    vm.add_memslot(1 << 36, size, slot=SLOT, backing=b)
    gva = memtouch.map_slot(SLOT)
    stride = max(512, size // 8192)
    memtouch.write(gva, size, 0x5EED, stride)
    b.remap(off, page)
    r = memtouch.verify(gva, size, 0x5EED, stride)
    if b.supports(Feature.REMAP_KEEPS_DATA):
        assert (r.bad, r.first) == (0, None), f"the same object mapped again: {r.bad} words changed"
    else:
        assert (r.bad, r.first) == (page // stride, off), f"fresh anonymous pages: {r.bad} words differ"
        assert memtouch.read(gva + off, page, stride).bad == 0
    # and the new mapping is live both ways
    host_fill(b.view(off, page), 0xF00D, stride)
    assert memtouch.verify(gva + off, page, 0xF00D, stride).bad == 0
    memtouch.done()


@pytest.mark.parametrize("source", ["gmem-mapping", "other-anon", "none"])
def test_guest_memfd_source(kvm, backings, memtouch, source):
    """Where a guest_memfd slot's memory comes from depends on the backend: upstream faults it from
    the guest_memfd itself; kvm_pvm serves it from userspace_addr (harness.backends)."""
    from harness.kvm.exits import Mmio

    vm = memtouch.vm
    size = 2 << 20
    g = backings("guest_memfd", size, vm=vm)
    other = backings("anon", size)
    g.write(0, (0x1111111111111111).to_bytes(8, "little"))
    other.write(0, (0x2222222222222222).to_bytes(8, "little"))
    hva = {"gmem-mapping": g.addr, "other-anon": other.addr, "none": 0}[source]
    vm.set_user_memory_region2(SLOT, 1 << 40, size, hva, KVM_MEM_GUEST_MEMFD, g.fd, 0, backing=g)
    gva = memtouch.map_slot(SLOT)
    mmio = []

    def on_exit(vcpu, ex):
        if isinstance(ex, Mmio):
            mmio.append(ex.phys_addr)
            vcpu.complete_mmio(0x3333333333333333)
            return True
        return False

    seen = memtouch.read_word(gva, on_exit=on_exit)
    if not backends.current().gmem_from_userspace_addr:
        assert seen == 0x1111111111111111, "upstream: guest_memfd-only slots are faulted from the guest_memfd"
    else:
        want = {"gmem-mapping": 0x1111111111111111, "other-anon": 0x2222222222222222,
                "none": 0x3333333333333333}[source]
        assert seen == want, f"kvm_pvm serves guest_memfd slots from userspace_addr: saw {seen:#x}"
        assert (mmio == [1 << 40]) == (source == "none")
    memtouch.done()
