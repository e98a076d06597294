"""harness.x86.paging: build tables in a fake guest memory, then decode them independently."""

from __future__ import annotations

import random
import time

import pytest

from harness.x86.paging import (
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_RW,
    PTE_US,
    PageTables,
    PagingMode,
)

K4, M2, M4, G1 = 1 << 12, 1 << 21, 1 << 22, 1 << 30
SIZES = {
    PagingMode.LONG4: (K4, M2, G1),
    PagingMode.LONG5: (K4, M2, G1),
    PagingMode.PAE: (K4, M2),
    PagingMode.LEGACY32: (K4, M4),
}
MAXPHY = {PagingMode.LONG4: 48, PagingMode.LONG5: 52, PagingMode.PAE: 52, PagingMode.LEGACY32: 36}
LONG = (PagingMode.LONG4, PagingMode.LONG5)
ESIZE = {PagingMode.LEGACY32: 4}


class FakeMem:
    """Sparse guest memory; records every write so tests can check entry-sized, aligned writes."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.writes: list[tuple[int, int]] = []

    def read(self, gpa: int, size: int) -> bytes:
        out = bytearray()
        while size:
            pfn, off = divmod(gpa, K4)
            n = min(size, K4 - off)
            page = self.pages.get(pfn)
            out += page[off:off + n] if page is not None else bytes(n)
            gpa, size = gpa + n, size - n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, len(data)))
        pos = 0
        while pos < len(data):
            pfn, off = divmod(gpa + pos, K4)
            n = min(len(data) - pos, K4 - off)
            self.pages.setdefault(pfn, bytearray(K4))[off:off + n] = data[pos:pos + n]
            pos += n

    def snapshot(self) -> dict[int, bytes]:
        return {k: bytes(v) for k, v in self.pages.items()}


class Bump:
    """Bump allocator: the first page (the root) at `low`, later ones from `high` (default: after low)."""

    def __init__(self, low: int = 0x10000, high: int | None = None) -> None:
        self.next_low, self.next_high = low, high
        self.given: list[int] = []

    def __call__(self) -> int:
        if self.given and self.next_high is not None:
            gpa, self.next_high = self.next_high, self.next_high + K4
        else:
            gpa, self.next_low = self.next_low, self.next_low + K4
        self.given.append(gpa)
        return gpa


def make(mode: PagingMode, maxphyaddr: int | None = None,
         high: int | None = None) -> tuple[FakeMem, Bump, PageTables]:
    mem, alloc = FakeMem(), Bump(high=high)
    return mem, alloc, PageTables(mem, alloc, mode, maxphyaddr=maxphyaddr or MAXPHY[mode])


def rd(mem: FakeMem, gpa: int, n: int) -> int:
    return int.from_bytes(mem.read(gpa, n), "little")


def ref_walk(mem: FakeMem, mode: PagingMode, cr3: int, va: int) -> tuple | None:
    """(gpa, page_size, writable, user, nx) decoded from the raw entries, independently of paging.py."""
    if mode is PagingMode.LEGACY32:
        pde = rd(mem, (cr3 & 0xFFFFF000) + ((va >> 22) & 0x3FF) * 4, 4)
        if not pde & 1:
            return None
        if (pde >> 7) & 1:  # 4 MiB page; PSE-36 puts PA bits 39:32 in PDE bits 20:13
            pa = (pde & 0xFFC00000) | (((pde >> 13) & 0xFF) << 32) | (va & 0x3FFFFF)
            return (pa, 1 << 22, bool(pde & 2), bool(pde & 4), False)
        pte = rd(mem, (pde & 0xFFFFF000) + ((va >> 12) & 0x3FF) * 4, 4)
        if not pte & 1:
            return None
        return ((pte & 0xFFFFF000) | (va & 0xFFF), 4096, bool(pde & pte & 2), bool(pde & pte & 4), False)

    def addr(e: int) -> int:
        return e & 0x000F_FFFF_FFFF_F000

    if mode is PagingMode.PAE:
        pdpte = rd(mem, (cr3 & 0xFFFFFFE0) + ((va >> 30) & 3) * 8, 8)
        if not pdpte & 1:
            return None
        table, shifts = addr(pdpte), (21, 12)
    else:
        table = cr3 & ~0xFFF
        shifts = (48, 39, 30, 21, 12) if mode is PagingMode.LONG5 else (39, 30, 21, 12)
    rw = us = 1
    nx = 0
    for s in shifts:
        e = rd(mem, table + ((va >> s) & 0x1FF) * 8, 8)
        if not e & 1:
            return None
        rw, us, nx = rw & (e >> 1), us & (e >> 2), nx | (e >> 63)
        if s == 12 or (s in (21, 30) and (e >> 7) & 1):
            size = 1 << s
            return ((addr(e) & ~(size - 1)) | (va & (size - 1)), size, bool(rw & 1), bool(us & 1), bool(nx))
        table = addr(e)
    raise AssertionError("unreachable")


def as_tuple(t) -> tuple | None:
    return None if t is None else (t.gpa, t.page_size, t.writable, t.user, t.nx)


def va_top(mode: PagingMode) -> int:
    """End of the lower canonical half (or of the 32-bit address space)."""
    return {PagingMode.LONG4: 1 << 47, PagingMode.LONG5: 1 << 56}.get(mode, 1 << 32)


def pa_top(mode: PagingMode, maxphyaddr: int) -> int:
    return 1 << 32 if mode is PagingMode.LEGACY32 else 1 << maxphyaddr


# ---- map + walk every page ---------------------------------------------------------------------
@pytest.mark.parametrize("mode,page_size", [(m, s) for m, sizes in SIZES.items() for s in sizes],
                         ids=lambda v: v.value if isinstance(v, PagingMode) else hex(v))
def test_map_and_walk_every_page(mode: PagingMode, page_size: int) -> None:
    mem, alloc, pt = make(mode, high=None if mode is PagingMode.LEGACY32 else 0x1_2340_0000)
    n = 4
    fan = 1 << (10 if mode is PagingMode.LEGACY32 else 9)
    gvas = [0, va_top(mode) - n * page_size]
    if page_size * fan + 2 * page_size <= va_top(mode) - n * page_size:
        gvas.append(page_size * fan - 2 * page_size)  # straddles a next-level table boundary
    if mode in LONG:
        half = va_top(mode)
        gvas += [(1 << 64) - half, (1 << 64) - n * page_size]
    top = pa_top(mode, MAXPHY[mode])
    gpas = [top - n * page_size, 0x4000_0000]
    if mode is not PagingMode.LEGACY32:
        gpas.append(0x1_4000_0000)  # above 4 GiB
    has_nx = mode is not PagingMode.LEGACY32
    regions = []
    for i, gva in enumerate(gvas):
        perms = {"writable": i % 2 == 0, "user": i % 3 == 0, "nx": has_nx and i % 2 == 1}
        gpa = gpas[i % len(gpas)]
        pt.map(gva, gpa, n * page_size, page_size, **perms)
        regions.append((gva, gpa, perms))

    rng = random.Random(page_size)
    esize = ESIZE.get(mode, 8)
    for gva, gpa, perms in regions:
        for p in range(n):
            off = rng.randrange(page_size)
            va = gva + p * page_size + off
            t = pt.walk(va)
            assert t is not None, hex(va)
            assert (t.gva, t.gpa, t.page_size) == (va, gpa + p * page_size + off, page_size)
            assert (t.writable, t.user, t.nx) == (perms["writable"], perms["user"], perms["nx"])
            assert t.level == {K4: 1, M2: 2, M4: 2, G1: 3}[page_size]
            entry = rd(mem, t.entry_gpa, esize)
            assert bool(entry & PTE_PS) == (page_size > K4)
            assert entry & (PTE_A | PTE_D) == 0
            assert as_tuple(t) == ref_walk(mem, mode, pt.root, va)
    assert pt.walk(n * page_size) is None  # just past the first region
    assert pt.table_pages() == alloc.given and pt.table_pages()[0] == pt.root
    for gpa, size in mem.writes:  # whole little-endian entries only
        assert gpa % esize == 0 and size % esize == 0 and size > 0


# ---- random addresses against the reference walker -------------------------------------------
def random_va(rng: random.Random, mode: PagingMode, align: int) -> int:
    top = va_top(mode)
    va = rng.randrange(0, top, align)
    if mode in LONG and rng.random() < 0.5:
        va += (1 << 64) - top  # upper canonical half
    return va


@pytest.mark.parametrize("mode", list(PagingMode), ids=lambda m: m.value)
@pytest.mark.parametrize("seed", [1, 2])
def test_random_against_reference(mode: PagingMode, seed: int) -> None:
    rng = random.Random(seed)
    maxphy = rng.choice([36, 40, 46, 52]) if mode is not PagingMode.LEGACY32 else 40
    mem, _, pt = make(mode, maxphy, high=0x8000_0000 if mode is not PagingMode.LEGACY32 else None)
    # Windows keep regions close enough together to share tables and collide now and then.
    windows = [random_va(rng, mode, G1 if mode in LONG else M4) for _ in range(3)]
    mapped: list[tuple[int, int, int]] = []
    for _ in range(40):
        ps = rng.choice(SIZES[mode])
        n = rng.randint(1, 3 if ps >= M4 else 8)
        base = rng.choice(windows) if ps < G1 else random_va(rng, mode, G1)
        gva = base + rng.randrange(0, 32) * ps
        if (gva + n * ps - 1) // va_top(mode) != gva // va_top(mode) or gva + n * ps > 1 << 64:
            continue  # would leave its canonical half
        gpa = rng.randrange(0, pa_top(mode, maxphy) - n * ps, ps)
        before = mem.snapshot()
        try:
            if rng.random() < 0.15 and mapped:
                ugva, usize, _ = rng.choice(mapped)
                pt.unmap(ugva, usize)
                assert pt.walk(ugva) is None
                continue
            pt.map(gva, gpa, n * ps, ps, writable=rng.random() < 0.5, user=rng.random() < 0.5,
                   nx=mode is not PagingMode.LEGACY32 and rng.random() < 0.5)
        except ValueError as e:
            assert "split" in str(e) or "smaller" in str(e), e
            assert mem.snapshot() == before  # a refused map/unmap changes nothing
            continue
        mapped.append((gva, n * ps, ps))
        for p in range(n):
            t = pt.walk(gva + p * ps)
            assert t is not None and t.gpa == gpa + p * ps and t.page_size == ps

    samples = [random_va(rng, mode, 1) for _ in range(100)]
    samples += [w + rng.randrange(64 * M4) for w in windows for _ in range(50)]
    samples += [g + rng.randrange(s) for g, s, _ in mapped for _ in range(3)]
    hits = 0
    for va in samples:
        if va >= va_top(mode) and mode not in LONG:
            continue
        if mode in LONG and va_top(mode) <= va < (1 << 64) - va_top(mode):
            continue
        want = ref_walk(mem, mode, pt.root, va)
        assert as_tuple(pt.walk(va)) == want, hex(va)
        hits += want is not None
    assert hits > 20


# ---- argument checking -------------------------------------------------------------------------
def test_misalignment_errors_show_hex() -> None:
    _, _, pt = make(PagingMode.LONG4)
    with pytest.raises(ValueError, match="0x201000"):
        pt.map(0x201000, 0, M2, M2)
    with pytest.raises(ValueError, match="0x1800"):
        pt.map(0, 0x1800, K4)
    with pytest.raises(ValueError, match="0x3000"):
        pt.map(0, 0, 0x3000, M2)
    with pytest.raises(ValueError, match="page size"):
        pt.map(0, 0, M4, M4)
    with pytest.raises(ValueError):
        pt.map(0, 0, 0)
    _, _, pae = make(PagingMode.PAE)
    with pytest.raises(ValueError, match="page size"):
        pae.map(0, 0, G1, G1)
    _, _, leg = make(PagingMode.LEGACY32)
    with pytest.raises(ValueError, match="page size"):
        leg.map(0, 0, M2, M2)


@pytest.mark.parametrize("mode,gva,size", [
    (PagingMode.LONG4, 1 << 47, K4),
    (PagingMode.LONG4, (1 << 47) - K4, 2 * K4),  # runs off the end of the lower half
    (PagingMode.LONG4, 0xFFFF_7FFF_FFFF_F000, K4),
    (PagingMode.LONG4, (1 << 64) - K4, 2 * K4),
    (PagingMode.LONG5, 1 << 56, K4),
    (PagingMode.LONG5, 0xFEFF_FFFF_FFFF_F000, K4),
    (PagingMode.PAE, 1 << 32, K4),
    (PagingMode.PAE, (1 << 32) - K4, 2 * K4),
    (PagingMode.LEGACY32, 1 << 32, K4),
], ids=str)
def test_non_canonical_gva(mode: PagingMode, gva: int, size: int) -> None:
    _, _, pt = make(mode)
    with pytest.raises(ValueError, match=r"canonical|4 GiB"):
        pt.map(gva, 0, size)
    with pytest.raises(ValueError):
        pt.walk(gva + size - 1)
    if size == K4:
        with pytest.raises(ValueError):
            pt.walk(gva)


def test_canonical_edges_accepted() -> None:
    _, _, pt4 = make(PagingMode.LONG4)
    pt4.map((1 << 47) - K4, 0, K4)
    pt4.map(0xFFFF_8000_0000_0000, 0, K4)
    _, _, pt5 = make(PagingMode.LONG5)
    pt5.map((1 << 56) - K4, 0, K4)
    pt5.map(0xFF00_0000_0000_0000, 0, K4)
    assert pt5.walk(0xFF00_0000_0000_0123).gpa == 0x123


@pytest.mark.parametrize("mode,maxphy", [(PagingMode.LONG4, 48), (PagingMode.LONG5, 46),
                                         (PagingMode.PAE, 36), (PagingMode.LEGACY32, 40)], ids=str)
def test_gpa_beyond_maxphyaddr(mode: PagingMode, maxphy: int) -> None:
    mem, _, pt = make(mode, maxphy)
    top = pa_top(mode, maxphy)
    pt.map(0, top - K4, K4)  # the last page is fine
    with pytest.raises(ValueError, match=hex(top - K4)):
        pt.map(0, top - K4, 2 * K4)
    with pytest.raises(ValueError):
        pt.map(0, top, K4)
    if mode is PagingMode.LEGACY32:
        with pytest.raises(ValueError, match="32-bit"):  # no room in a 4-byte entry
            pt.map(0, top, K4, allow_reserved=True)
        return
    # allow_reserved: the bit lands in the entry and the walk reports it.
    pt.map(K4, top | 0x5000, K4, allow_reserved=True)
    t = pt.walk(K4)
    assert t.gpa == top | 0x5000
    assert rd(mem, t.entry_gpa, 8) >> maxphy & 1
    assert ref_walk(mem, mode, pt.root, K4)[0] == top | 0x5000
    with pytest.raises(ValueError, match="52-bit"):
        pt.map(K4, 1 << 52, K4, allow_reserved=True)


def test_nx_only_with_64bit_entries() -> None:
    _, _, leg = make(PagingMode.LEGACY32)
    with pytest.raises(ValueError, match="NX"):
        leg.map(0, 0, K4, nx=True)
    for mode in (PagingMode.PAE, PagingMode.LONG4):
        mem, _, pt = make(mode)
        pt.map(0, 0, M2, M2, nx=True)
        t = pt.walk(0x1000)
        assert t.nx and rd(mem, t.entry_gpa, 8) & PTE_NX


# ---- conflicts, remapping, unmap -------------------------------------------------------------
@pytest.mark.parametrize("mode", list(PagingMode), ids=lambda m: m.value)
def test_conflicting_page_sizes(mode: PagingMode) -> None:
    mem, _, pt = make(mode)
    big = SIZES[mode][1]
    pt.map(0, 0, big, big)
    before = mem.snapshot()
    with pytest.raises(ValueError, match="split"):
        pt.map(big - K4, 0, 2 * K4)  # second page is free but the first is inside the large page
    with pytest.raises(ValueError, match="split"):
        pt.unmap(K4, K4)
    assert mem.snapshot() == before
    assert pt.walk(big) is None

    pt.map(2 * big, 0, K4)
    with pytest.raises(ValueError, match="smaller"):
        pt.map(2 * big, 0, big, big)
    # Once the small pages are gone the slot can hold a large page (the old table is left behind).
    pt.unmap(2 * big, K4)
    pt.map(2 * big, big, big, big)
    assert pt.walk(2 * big + 5).gpa == big + 5
    if mode in LONG:
        pt.map(G1, 0, M2, M2)
        with pytest.raises(ValueError, match="smaller"):
            pt.map(0, 0, 2 * G1, G1)
        pt.map(2 * G1, 0, 2 * G1, G1)
        with pytest.raises(ValueError, match="split"):
            pt.map(3 * G1 + M2, 0, M2, M2)


def test_remap_same_size_overwrites() -> None:
    _, _, pt = make(PagingMode.LONG4)
    pt.map(0x40_0000, 0x1000_0000, 4 * K4, user=True)
    pt.map(0x40_1000, 0x2000_0000, K4, writable=False)
    assert pt.walk(0x40_0000).gpa == 0x1000_0000
    t = pt.walk(0x40_1010)
    assert (t.gpa, t.writable, t.user) == (0x2000_0010, False, False)


@pytest.mark.parametrize("mode", list(PagingMode), ids=lambda m: m.value)
def test_unmap(mode: PagingMode) -> None:
    _, _, pt = make(mode)
    big = SIZES[mode][1]
    pt.map(0, 0, 16 * K4)
    pt.map(4 * big, 0, 2 * big, big)
    tables = pt.table_pages()
    pt.unmap(4 * K4, 4 * K4)
    pt.unmap(4 * big, big)
    assert [pt.walk(p * K4) is None for p in range(10)] == [False] * 4 + [True] * 4 + [False] * 2
    assert pt.walk(4 * big) is None and pt.walk(5 * big) is not None
    pt.unmap(0, 8 * big)  # whole range, including parts never mapped
    assert pt.walk(0) is None and pt.walk(5 * big) is None
    assert pt.table_pages() == tables
    pt.map(4 * K4, 0x9000, K4)
    assert pt.walk(4 * K4).gpa == 0x9000


# ---- entry contents --------------------------------------------------------------------------
def test_pae_pdpte_has_only_p() -> None:
    mem, _, pt = make(PagingMode.PAE, high=0x2_0000_0000)
    pt.map(0, 0, G1, M2, user=True, nx=True)
    pt.map(0xC000_0000, 0, K4, user=True, nx=True)
    pdptes = [rd(mem, pt.root + i * 8, 8) for i in range(4)]
    for e in pdptes:
        assert e & ~(0x000F_FFFF_FFFF_F000 | PTE_P | PTE_PWT | PTE_PCD) == 0
    assert pdptes[0] & 0x000F_FFFF_FFFF_F000 >= 0x2_0000_0000  # PD above 4 GiB is fine in PAE
    assert pt.walk(0xC000_0123).user and pt.walk(0xC000_0123).nx


def test_pae_pdpt_is_complete_from_creation() -> None:
    """PAE PDPTEs are loaded with CR3: a PDPTE written after that would not be seen (the 4 GiB
    straddle cases failed so under KVM on TCG). All four exist before any map, and no later map
    or unmap rewrites the PDPT."""
    mem, _, pt = make(PagingMode.PAE, high=0x2_0000_0000)
    before = mem.read(pt.root, 32)
    pdptes = [rd(mem, pt.root + i * 8, 8) for i in range(4)]
    assert [bool(e & PTE_P) for e in pdptes] == [True] * 4
    assert len({e & 0x000F_FFFF_FFFF_F000 for e in pdptes}) == 4  # four distinct directories
    pt.map(0x4000_0000, 0x1_0000_0000, 2 * K4)
    pt.map(0xC000_0000, 0, M2, M2)
    pt.unmap(0x4000_0000, K4)
    assert mem.read(pt.root, 32) == before
    assert pt.walk(0x4000_1000).gpa == 0x1_0000_1000


def test_intermediate_entries_are_permissive() -> None:
    mem, _, pt = make(PagingMode.LONG5)
    pt.map(0xFF80_0000_0000_0000, 0, K4, writable=False, nx=True)
    table, shift = pt.root, 48
    for _ in range(4):
        e = rd(mem, table + ((0xFF80_0000_0000_0000 >> shift) & 0x1FF) * 8, 8)
        assert e & 0xFFF == PTE_P | PTE_RW | PTE_US and not e & PTE_NX
        table, shift = e & 0x000F_FFFF_FFFF_F000, shift - 9
    leaf = rd(mem, table + ((0xFF80_0000_0000_0000 >> 12) & 0x1FF) * 8, 8)
    assert leaf == PTE_P | PTE_NX


@pytest.mark.parametrize("mode", list(PagingMode), ids=lambda m: m.value)
def test_set_leaf_bits(mode: PagingMode) -> None:
    mem, _, pt = make(mode)
    big = SIZES[mode][1]
    pt.map(0, 0x3000, K4)
    pt.map(big, 0, big, big)
    esize = ESIZE.get(mode, 8)
    if mode is PagingMode.LEGACY32:
        rsvd = 1 << 21  # reserved in a 4 MiB PDE
        with pytest.raises(ValueError, match="fit"):
            pt.set_leaf_bits(0, 1 << 32)
        pt.set_leaf_bits(big, set_bits=1 << 13)  # PSE-36: PA bit 32
        assert pt.walk(big + 0x1234).gpa == (1 << 32) | 0x1234
        assert ref_walk(mem, mode, pt.root, big + 0x1234)[0] == (1 << 32) | 0x1234
        pt.set_leaf_bits(big, clear_bits=1 << 13)
    else:
        rsvd = 1 << MAXPHY[mode] if MAXPHY[mode] < 52 else 1 << 51
    new = pt.set_leaf_bits(big + 0x1234, set_bits=rsvd | PTE_A, clear_bits=PTE_RW)
    t = pt.walk(big + 0x1234)
    assert rd(mem, t.entry_gpa, esize) == new and new & rsvd and new & PTE_PS
    assert not t.writable
    if mode is not PagingMode.LEGACY32:
        assert t.gpa == rsvd | 0x1234

    new = pt.set_leaf_bits(0x10, clear_bits=PTE_P)
    assert pt.walk(0x10) is None and new == 0x3000 | PTE_RW
    assert pt.set_leaf_bits(0x10, set_bits=PTE_P) == 0x3000 | PTE_RW | PTE_P
    assert pt.walk(0x10).gpa == 0x3010
    # Later maps still see the cache in sync with what set_leaf_bits wrote.
    pt.map(K4, 0x5000, K4)
    assert pt.walk(0x10).gpa == 0x3010
    # A large leaf whose P was cleared is free for smaller pages (map must see the cleared P).
    pt.set_leaf_bits(big, clear_bits=PTE_P)
    pt.map(big + K4, 0x7000, K4)
    assert pt.walk(big) is None and pt.walk(big + K4).gpa == 0x7000
    with pytest.raises(ValueError, match="no leaf"):
        pt.set_leaf_bits(2 * K4, set_bits=PTE_P)  # PT exists, entry empty
    with pytest.raises(ValueError, match="no leaf"):
        pt.set_leaf_bits(5 * big, set_bits=PTE_P)  # nothing there at all
    with pytest.raises(ValueError):
        pt.set_leaf_bits(0, set_bits=PTE_A, clear_bits=PTE_A)


def test_walk_combines_levels() -> None:
    mem, _, pt = make(PagingMode.LONG4)
    pt.map(0, 0, 4 * K4, user=True)
    pml4e = rd(mem, pt.root, 8)
    pdpt = pml4e & 0x000F_FFFF_FFFF_F000
    mem.write(pt.root, (pml4e | PTE_NX).to_bytes(8, "little"))
    mem.write(pdpt, (rd(mem, pdpt, 8) & ~(PTE_US | PTE_RW)).to_bytes(8, "little"))
    t = pt.walk(K4)
    assert (t.writable, t.user, t.nx) == (False, False, True)
    assert as_tuple(t) == ref_walk(mem, PagingMode.LONG4, pt.root, K4)


def test_map_keeps_bits_the_cpu_set_in_other_entries() -> None:
    mem, _, pt = make(PagingMode.PAE)
    pt.map(M2, 0, K4)
    pde_gpa = rd(mem, pt.root, 8) & ~0xFFF
    pde1 = rd(mem, pde_gpa + 8, 8)
    mem.write(pde_gpa + 8, (pde1 | PTE_A).to_bytes(8, "little"))  # as a guest access would
    pt.map(0, 0, 3 * M2)  # allocates PTs for PDE 0 and 2, reuses PDE 1
    assert rd(mem, pde_gpa + 8, 8) == pde1 | PTE_A
    assert pt.walk(2 * M2 + K4).gpa == 2 * M2 + K4


def test_invalidate_cache_picks_up_guest_writes() -> None:
    mem, _, pt = make(PagingMode.LONG4)
    pt.map(0, 0, K4)
    pte_gpa = pt.walk(0).entry_gpa
    mem.write(pte_gpa + 8, (0x7000 | PTE_P).to_bytes(8, "little"))  # "the guest" maps page 1
    pt.invalidate_cache()
    with pytest.raises(ValueError, match="smaller"):
        pt.map(0, 0, M2, M2)


def test_table_allocation_checks() -> None:
    mem = FakeMem()
    with pytest.raises(ValueError, match="0x100000000"):
        PageTables(mem, Bump(low=1 << 32), PagingMode.PAE)  # CR3 is 32 bits in PAE mode
    with pytest.raises(ValueError, match="0x10800"):
        PageTables(mem, Bump(low=0x10800), PagingMode.LONG4)
    with pytest.raises(ValueError):
        PageTables(mem, Bump(), PagingMode.LONG4, maxphyaddr=53)
    pt = PageTables(mem, Bump(high=1 << 32), PagingMode.LEGACY32)
    with pytest.raises(ValueError, match="alloc_page"):
        pt.map(0, 0, K4)


def test_large_maps_are_fast_and_batched() -> None:
    mem, _, pt = make(PagingMode.LONG4)
    t0 = time.perf_counter()
    pt.map(0, 0, G1, M2)
    pt.map(0xFFFF_C000_0000_0000, 0x1_0000_0000, 64 << 20)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, elapsed
    assert len(mem.writes) < 100  # one write per run of entries, not per entry
    assert pt.walk(0xFFFF_C000_03FF_F00F).gpa == 0x1_03FF_F00F
    assert pt.walk(G1 - 1).gpa == G1 - 1
