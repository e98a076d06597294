"""x86 guest page tables, built by the host inside guest memory.

Supports 4-level and 5-level long mode, 32-bit PAE and legacy 32-bit (2-level) paging.
Levels are numbered like KVM's PG_LEVEL_*: 1 is the page table (4 KiB leaves), 2 the page
directory (2 MiB / 4 MiB leaves), 3 the PDPT (1 GiB leaves in long mode), 4 the PML4, 5 the PML5.

The builder keeps a Python-side copy of every table it has touched so that mapping large ranges
does not re-read guest memory; `walk` and `set_leaf_bits` always read guest memory, so they see
what the CPU sees (including A/D bits it set). If the guest itself rewrites page tables, call
`invalidate_cache` before mapping again. (Over 400 lines: one builder for the four paging formats.)
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol


class GuestMemory(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class PagingMode(enum.Enum):
    LONG4 = "4level"
    LONG5 = "5level"
    PAE = "pae"
    LEGACY32 = "legacy32"


PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_NX = 1 << 63

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_4M = 1 << 22
PAGE_1G = 1 << 30

_PAGE_MASK = PAGE_4K - 1
_ADDR64 = ((1 << 52) - 1) & ~_PAGE_MASK  # bits 51:12: the architectural limit of the address field
_ADDR32 = 0xFFFF_F000
_PSE_4M_LOW = 0xFFC0_0000  # bits 31:22 of a 4 MiB PDE
_INTERMEDIATE = PTE_P | PTE_RW | PTE_US  # so the leaf alone decides the permissions


@dataclass(frozen=True)
class _Geometry:
    entry_size: int
    index_bits: tuple[int, ...]  # per level, level 1 first
    leaf_levels: tuple[tuple[int, int], ...]  # (page size, level)
    va_bits: int  # canonical width (long modes) or address-space width (32-bit modes)


_GEOMETRY = {
    PagingMode.LONG4: _Geometry(8, (9, 9, 9, 9), ((PAGE_4K, 1), (PAGE_2M, 2), (PAGE_1G, 3)), 48),
    PagingMode.LONG5: _Geometry(8, (9, 9, 9, 9, 9), ((PAGE_4K, 1), (PAGE_2M, 2), (PAGE_1G, 3)), 57),
    PagingMode.PAE: _Geometry(8, (9, 9, 2), ((PAGE_4K, 1), (PAGE_2M, 2)), 32),
    PagingMode.LEGACY32: _Geometry(4, (10, 10), ((PAGE_4K, 1), (PAGE_4M, 2)), 32),
}


@dataclass(frozen=True)
class Translation:
    gva: int
    gpa: int  # includes gva's offset inside the page
    page_size: int
    writable: bool  # RW set at every level
    user: bool  # US set at every level
    nx: bool  # NX set at any level
    entry_gpa: int  # GPA of the leaf entry
    level: int  # level of the leaf entry (1 = PT, 2 = PD, 3 = PDPT)


class PageTables:
    """Page tables for one address space; `root` is the value for CR3.

    Leaves are written with P, RW/US/NX as asked and PS for large pages; A, D, G, PWT, PCD and PAT
    are left clear (use `set_leaf_bits`). Non-leaf entries get P|RW|US, PAE PDPTEs only P.
    """

    def __init__(self, mem: GuestMemory, alloc_page: Callable[[], int], mode: PagingMode,
                 maxphyaddr: int = 48) -> None:
        if not 32 <= maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr {maxphyaddr} is outside 32..52")
        self.mem = mem
        self.mode = mode
        self.maxphyaddr = maxphyaddr
        self._alloc_page = alloc_page
        self._geo = _GEOMETRY[mode]
        self._esize = self._geo.entry_size
        self._fmt = "Q" if self._esize == 8 else "I"
        self._top = len(self._geo.index_bits)
        self._shifts = [0, 12]  # _shifts[level] = log2 of the span one entry at `level` covers
        for bits in self._geo.index_bits[:-1]:
            self._shifts.append(self._shifts[-1] + bits)
        self._sizes = dict(self._geo.leaf_levels)
        self._large_levels = frozenset(lvl for _, lvl in self._geo.leaf_levels if lvl > 1)
        self._addr_mask = _ADDR32 if mode is PagingMode.LEGACY32 else _ADDR64
        # Legacy entries hold 32-bit addresses whatever MAXPHYADDR is (no PSE-36 when mapping).
        self._pa_limit = 1 << 32 if mode is PagingMode.LEGACY32 else 1 << maxphyaddr
        self._cache: dict[int, list[int]] = {}
        self._tables: list[int] = []
        self.root: int = self._alloc_table(self._top)
        if mode is PagingMode.PAE:
            self._fill_pdpt()

    # ---- public API ----------------------------------------------------------------------------
    def map(self, gva: int, gpa: int, size: int, page_size: int = 4096, *, writable: bool = True,
            user: bool = False, nx: bool = False, allow_reserved: bool = False) -> None:
        """Map [gva, gva+size) to [gpa, gpa+size) with pages of `page_size`.

        Overwrites leaves of the same size; raises ValueError (changing nothing) if part of the
        range is mapped with another page size. allow_reserved lets gpa reach past MAXPHYADDR (up
        to bit 51) to put a reserved physical-address bit in the leaves.
        """
        level = self._sizes.get(page_size)
        if level is None:
            sizes = ", ".join(f"{s:#x}" for s in self._sizes)
            raise ValueError(f"page size {page_size:#x} is not supported in {self.mode.value} paging "
                             f"(supported: {sizes})")
        for name, value in (("gva", gva), ("gpa", gpa), ("size", size)):
            if value % page_size:
                raise ValueError(f"{name} {value:#x} is not aligned to page size {page_size:#x}")
        self._check_va_range(gva, size)
        self._check_pa_range(gpa, size, allow_reserved)
        if nx and self.mode is PagingMode.LEGACY32:
            raise ValueError("legacy 32-bit paging has no NX bit")
        flags = PTE_P | (PTE_RW if writable else 0) | (PTE_US if user else 0)
        flags |= (PTE_PS if level > 1 else 0) | (PTE_NX if nx else 0)

        # Check the whole range first so a conflict leaves the tables untouched.
        self._check_conflicts(self.root, self._top, gva, gva + size, level)
        dirty: dict[int, list[list[int]]] = {}
        try:
            self._fill(gva, gpa, size, level, flags, dirty)
        finally:
            # Also on an allocation failure, so guest memory matches the cache.
            self._flush(dirty)

    def unmap(self, gva: int, size: int) -> None:
        """Clear the leaf entries covering [gva, gva+size); tables stay allocated.

        Unmapped parts are skipped; raises ValueError (changing nothing) if the range covers only
        part of a present large page.
        """
        for name, value in (("gva", gva), ("size", size)):
            if value % PAGE_4K:
                raise ValueError(f"{name} {value:#x} is not 4 KiB aligned")
        self._check_va_range(gva, size)
        runs: list[tuple[int, int, int]] = []
        self._collect_leaves(self.root, self._top, gva, gva + size, runs)
        dirty: dict[int, list[list[int]]] = {}
        for table, lo, hi in runs:
            ents = self._cache[table]
            ents[lo:hi] = [0] * (hi - lo)
            _mark(dirty, table, lo, hi)
        self._flush(dirty)

    def walk(self, gva: int) -> Translation | None:
        """Translate gva by reading the tables from guest memory as the CPU would.

        Returns None when an entry on the way is not present. Reserved bits are not checked: a
        reserved physical-address bit shows up in the returned gpa.
        """
        self._check_va_range(gva, 1)
        table = self.root
        writable, user, nx = True, True, False
        for level in range(self._top, 0, -1):
            egpa = table + self._index(gva, level) * self._esize
            e = int.from_bytes(self.mem.read(egpa, self._esize), "little")
            if not e & PTE_P:
                return None
            if not self._is_pae_pdpte(level):  # PDPTEs carry no permission bits
                writable = writable and bool(e & PTE_RW)
                user = user and bool(e & PTE_US)
                nx = nx or bool(e & PTE_NX)
            if self._is_leaf(level, e):
                psize = 1 << self._shifts[level]
                gpa = self._leaf_addr(level, e) + (gva & (psize - 1))
                return Translation(gva, gpa, psize, writable, user, nx, egpa, level)
            table = e & self._addr_mask
        raise AssertionError("unreachable: level 1 entries are always leaves")

    def set_leaf_bits(self, gva: int, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Clear then set bits in the leaf entry mapping gva; return the new entry.

        The leaf is found in guest memory even if its P bit is clear, so P can be cleared and
        set again. The guest must flush its TLB (invlpg) to see the change.
        """
        limit = 1 << (self._esize * 8)
        if not (0 <= set_bits < limit and 0 <= clear_bits < limit):
            raise ValueError(f"bits {set_bits:#x}/{clear_bits:#x} do not fit a {self._esize}-byte entry")
        if set_bits & clear_bits:
            raise ValueError(f"bits {set_bits & clear_bits:#x} are both set and cleared")
        self._check_va_range(gva, 1)
        table = self.root
        for level in range(self._top, 0, -1):
            egpa = table + self._index(gva, level) * self._esize
            e = int.from_bytes(self.mem.read(egpa, self._esize), "little")
            if e and self._is_leaf(level, e):
                break
            if not e & PTE_P:
                raise ValueError(f"gva {gva:#x} has no leaf entry (level {level} entry at {egpa:#x} "
                                 f"is {e:#x})")
            table = e & self._addr_mask
        new = (e & ~clear_bits) | set_bits
        self.mem.write(egpa, new.to_bytes(self._esize, "little"))
        ents = self._cache.get(egpa & ~_PAGE_MASK)
        if ents is not None:
            ents[(egpa & _PAGE_MASK) // self._esize] = new
        return new

    def table_pages(self) -> list[int]:
        """Every table page this builder allocated, root first (including ones no longer linked)."""
        return list(self._tables)

    def invalidate_cache(self) -> None:
        """Forget the cached table contents (after the guest wrote its own page tables)."""
        self._cache.clear()

    # ---- helpers -------------------------------------------------------------------------------
    def _index(self, va: int, level: int) -> int:
        return (va >> self._shifts[level]) & ((1 << self._geo.index_bits[level - 1]) - 1)

    def _is_pae_pdpte(self, level: int) -> bool:
        return self.mode is PagingMode.PAE and level == 3

    def _is_leaf(self, level: int, e: int) -> bool:
        return level == 1 or (level in self._large_levels and bool(e & PTE_PS))

    def _leaf_addr(self, level: int, e: int) -> int:
        if level == 1:
            return e & self._addr_mask
        if self.mode is PagingMode.LEGACY32:
            # PSE-36: bits 20:13 of a 4 MiB PDE are physical-address bits 39:32.
            return (e & _PSE_4M_LOW) | (((e >> 13) & 0xFF) << 32)
        return e & self._addr_mask & ~((1 << self._shifts[level]) - 1)

    def _check_va_range(self, va: int, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size {size:#x} must be positive")
        end = va + size - 1
        if self.mode in (PagingMode.PAE, PagingMode.LEGACY32):
            if va < 0 or end >= 1 << 32:
                raise ValueError(f"gva range {va:#x}..{end:#x} is beyond 4 GiB in {self.mode.value} paging")
            return
        half = 1 << (self._geo.va_bits - 1)
        lower = va >= 0 and end < half
        upper = va >= (1 << 64) - half and end < 1 << 64
        if not (lower or upper):
            raise ValueError(f"gva range {va:#x}..{end:#x} is not canonical for "
                             f"{self._geo.va_bits}-bit virtual addresses")

    def _check_pa_range(self, pa: int, size: int, allow_reserved: bool) -> None:
        end = pa + size
        if pa < 0:
            raise ValueError(f"gpa {pa:#x} is negative")
        if end <= self._pa_limit:
            return
        if self.mode is PagingMode.LEGACY32:
            raise ValueError(f"gpa range {pa:#x}..{end - 1:#x} does not fit 32-bit entries "
                             "(use set_leaf_bits for reserved bits)")
        if not allow_reserved:
            raise ValueError(f"gpa range {pa:#x}..{end - 1:#x} is beyond MAXPHYADDR {self.maxphyaddr} "
                             "(pass allow_reserved=True to set reserved bits on purpose)")
        if end > 1 << 52:
            raise ValueError(f"gpa range {pa:#x}..{end - 1:#x} does not fit the 52-bit address field")

    def _fill_pdpt(self) -> None:
        """Give all four PAE PDPTEs a page directory now, while the PDPT is new.

        A CPU in PAE mode takes the PDPTEs into registers when CR3 is loaded (Intel SDM 4.4.1;
        KVM's shadow MMU and VMX do the same), so a PDPTE written later is not seen until CR3 is
        reloaded. With all four present from the start, mapping anything later only writes PDEs
        and PTEs, which need nothing more than a TLB flush. (Under QEMU TCG this also matters
        on AMD NPT, where KVM re-reads the PDPTEs after each exit: TCG sets the accessed bit,
        reserved in a PAE PDPTE, so KVM's re-read fails and it keeps the PDPTEs it loaded with
        CR3; see docs/triage.md.)"""
        ents = self._entries(self.root, self._top)
        for i in range(len(ents)):
            ents[i] = self._alloc_table(self._top - 1) | PTE_P
        self._flush({self.root: [[0, len(ents)]]})

    def _alloc_table(self, level: int) -> int:
        gpa = self._alloc_page()
        # CR3 is 32 bits outside long mode; legacy entries hold only 32-bit table addresses.
        small = self.mode is PagingMode.LEGACY32 or (self.mode is PagingMode.PAE and level == self._top)
        limit = 1 << 32 if small else 1 << self.maxphyaddr
        if gpa & _PAGE_MASK or not 0 <= gpa < limit:
            raise ValueError(f"alloc_page returned {gpa:#x}: not a 4 KiB aligned page below {limit:#x}")
        self._tables.append(gpa)
        self._cache[gpa] = [0] * (1 << self._geo.index_bits[level - 1])  # alloc_page pages are zero
        return gpa

    def _entries(self, table: int, level: int) -> list[int]:
        ents = self._cache.get(table)
        if ents is None:  # a table the cache forgot (or the guest made): read it once
            n = 1 << self._geo.index_bits[level - 1]
            ents = list(struct.unpack(f"<{n}{self._fmt}", self.mem.read(table, n * self._esize)))
            self._cache[table] = ents
        return ents

    def _spans(self, level: int, lo: int, hi: int) -> Iterator[tuple[int, int, int, bool]]:
        """(index, start, end, covers-whole-entry) for each entry at `level` that [lo, hi) touches."""
        shift = self._shifts[level]
        span = 1 << shift
        va = lo
        while va < hi:
            base = va >> shift << shift
            end = min(hi, base + span)
            yield self._index(va, level), va, end, va == base and end == base + span
            va = end

    def _check_conflicts(self, table: int, level: int, lo: int, hi: int, leaf_level: int) -> None:
        if level == 1:
            return  # 4 KiB leaves just overwrite 4 KiB leaves
        ents = self._entries(table, level)
        for idx, start, end, _ in self._spans(level, lo, hi):
            e = ents[idx]
            if not e & PTE_P:
                continue
            if self._is_leaf(level, e):
                if level != leaf_level:
                    raise ValueError(
                        f"gva {start:#x} is inside a present {1 << self._shifts[level]:#x} page; "
                        f"mapping {1 << self._shifts[leaf_level]:#x} pages would split it (unmap it first)")
            elif level == leaf_level:
                if not self._subtree_empty(e & self._addr_mask, level - 1):
                    raise ValueError(
                        f"gva {start:#x}..{end - 1:#x} already has pages smaller than "
                        f"{1 << self._shifts[level]:#x} mapped (unmap them first)")
            else:
                self._check_conflicts(e & self._addr_mask, level - 1, start, end, leaf_level)

    def _subtree_empty(self, table: int, level: int) -> bool:
        for e in self._entries(table, level):
            if e & PTE_P and (self._is_leaf(level, e)
                              or not self._subtree_empty(e & self._addr_mask, level - 1)):
                return False
        return True

    def _fill(self, gva: int, gpa: int, size: int, level: int, flags: int,
              dirty: dict[int, list[list[int]]]) -> None:
        shift = self._shifts[level]
        page = 1 << shift
        va, pa, end = gva, gpa, gva + size
        while va < end:
            table = self._descend(va, level, dirty)
            ents = self._entries(table, level)
            idx = self._index(va, level)
            count = min(len(ents) - idx, (end - va) >> shift)
            ents[idx:idx + count] = [p | flags for p in range(pa, pa + count * page, page)]
            _mark(dirty, table, idx, idx + count)
            va += count * page
            pa += count * page

    def _descend(self, va: int, leaf_level: int, dirty: dict[int, list[list[int]]]) -> int:
        """The table at leaf_level that holds va's entry, allocating missing tables on the way."""
        table = self.root
        for level in range(self._top, leaf_level, -1):
            ents = self._entries(table, level)
            idx = self._index(va, level)
            e = ents[idx]
            if e & PTE_P and not self._is_leaf(level, e):
                table = e & self._addr_mask
                continue
            # Not present (a present leaf here was rejected by _check_conflicts).
            child = self._alloc_table(level - 1)
            ents[idx] = child | (PTE_P if self._is_pae_pdpte(level) else _INTERMEDIATE)
            _mark(dirty, table, idx, idx + 1)
            table = child
        return table

    def _collect_leaves(self, table: int, level: int, lo: int, hi: int,
                        runs: list[tuple[int, int, int]]) -> None:
        if level == 1:
            first = self._index(lo, 1)
            self._entries(table, 1)
            runs.append((table, first, first + ((hi - lo) >> 12)))
            return
        ents = self._entries(table, level)
        for idx, start, end, full in self._spans(level, lo, hi):
            e = ents[idx]
            if not e:
                continue
            if self._is_leaf(level, e):
                if full:
                    runs.append((table, idx, idx + 1))
                elif e & PTE_P:
                    raise ValueError(f"unmapping {start:#x}..{end - 1:#x} would split the "
                                     f"{1 << self._shifts[level]:#x} page there")
            elif e & PTE_P:
                self._collect_leaves(e & self._addr_mask, level - 1, start, end, runs)

    def _flush(self, dirty: dict[int, list[list[int]]]) -> None:
        for table, runs in dirty.items():
            ents = self._cache[table]
            for lo, hi in runs:
                data = struct.pack(f"<{hi - lo}{self._fmt}", *ents[lo:hi])
                self.mem.write(table + lo * self._esize, data)


def _mark(dirty: dict[int, list[list[int]]], table: int, lo: int, hi: int) -> None:
    """Record entries [lo, hi) of `table` as modified, merging adjacent runs into one write."""
    runs = dirty.setdefault(table, [])
    if runs and runs[-1][1] == lo:
        runs[-1][1] = hi
    else:
        runs.append([lo, hi])
