"""x86 CPU modes a guest can start in: descriptor tables and the segment/control registers for each.

The host sets the vCPU directly into its mode with KVM_SET_SREGS (as the KVM selftests do), so the
payload starts in the mode it was built for; the GDT is still written to memory because an iret
or a far jump reloads segments from it.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

from harness import backends
from harness.x86.paging import PagingMode

GDT_GPA = 0x1000
TSS_GPA = 0x3000
TSS_LIMIT = 0x67

SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18
SEL_TSS = 0x20

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11


class Mode(enum.Enum):
    """Guest start modes. The value is the id used in test names."""

    REAL = "real"  # 16-bit real mode, no paging
    PROT32 = "prot32"  # flat 32-bit protected mode, no paging
    PAE32 = "pae32"  # 32-bit protected mode with PAE paging (64-bit GPAs through 32-bit GVAs)
    LONG64 = "long64"  # 64-bit, 4-level paging
    LONG64_LA57 = "long64-la57"  # 64-bit, 5-level paging

    @property
    def bits(self) -> int:
        return {Mode.REAL: 16, Mode.PROT32: 32, Mode.PAE32: 32}.get(self, 64)

    @property
    def paging(self) -> PagingMode | None:
        return {Mode.PAE32: PagingMode.PAE, Mode.LONG64: PagingMode.LONG4,
                Mode.LONG64_LA57: PagingMode.LONG5}.get(self)


def unsupported_reason(mode: Mode, cpuid: Any) -> str | None:
    """Why this host cannot run `mode`, or None when it can."""
    here = backends.current()
    if mode is Mode.PAE32 and here.pae_refused:
        return here.pae_refused
    if mode is Mode.LONG64_LA57:
        if not cpuid.la57:
            return "5-level paging: KVM_GET_SUPPORTED_CPUID does not offer LA57 (CPUID.7.0:ECX[16])"
        return here.la57_refused
    return None


def _seg_desc(base: int, limit: int, access: int, flags: int) -> int:
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def gdt_bytes() -> bytes:
    """null, code64, data, code32, then a 16-byte TSS descriptor (busy TSS)."""
    code64 = _seg_desc(0, 0xFFFFF, 0x9B, 0xA)  # P, S, exec/read/accessed; G, L
    data = _seg_desc(0, 0xFFFFF, 0x93, 0xC)  # P, S, read/write/accessed; G, D/B
    code32 = _seg_desc(0, 0xFFFFF, 0x9B, 0xC)  # G, D
    tss_lo = _seg_desc(TSS_GPA, TSS_LIMIT, 0x8B, 0x0)  # P, busy 64/32-bit TSS
    tss_hi = TSS_GPA >> 32
    return struct.pack("<6Q", 0, code64, data, code32, tss_lo, tss_hi)


def _seg(s: Any, selector: int, base: int, limit: int, typ: int, *, code_l: int = 0, db: int = 1,
         g: int = 1, system: int = 1, present: int = 1) -> None:
    s.selector, s.base, s.limit, s.type = selector, base, limit, typ
    s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl = present, 0, db, system, code_l, g, 0
    s.unusable = 0 if present else 1


def setup_sregs(sregs: Any, mode: Mode, cr3: int = 0) -> None:
    """Fill a struct kvm_sregs for `mode` (GDT at GDT_GPA, TSS at TSS_GPA)."""
    if mode is Mode.REAL:
        for s in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _seg(s, 0, 0, 0xFFFF, 0x3, db=0, g=0)
        sregs.cs.type = 0xB
        sregs.cr0 = CR0_ET | CR0_NE
        sregs.cr4 = 0
        sregs.efer = 0
        return

    sregs.gdt.base = GDT_GPA
    sregs.gdt.limit = len(gdt_bytes()) - 1
    long_mode = mode in (Mode.LONG64, Mode.LONG64_LA57)
    if long_mode:
        _seg(sregs.cs, SEL_CODE64, 0, 0xFFFFFFFF, 0xB, code_l=1, db=0)
    else:
        _seg(sregs.cs, SEL_CODE32, 0, 0xFFFFFFFF, 0xB)
    for s in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _seg(s, SEL_DATA, 0, 0xFFFFFFFF, 0x3)
    _seg(sregs.tr, SEL_TSS, TSS_GPA, TSS_LIMIT, 0xB, db=0, g=0, system=0)
    _seg(sregs.ldt, 0, 0, 0xFFFF, 0x2, db=0, g=0, system=0, present=0)

    if mode is Mode.PROT32:
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
        sregs.cr4 = 0
        sregs.efer = 0
    elif mode is Mode.PAE32:
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_NXE
        sregs.cr3 = cr3
    else:
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr4 = CR4_PAE | (CR4_LA57 if mode is Mode.LONG64_LA57 else 0)
        sregs.efer = EFER_LME | EFER_LMA | EFER_NXE | EFER_SCE
        sregs.cr3 = cr3
