"""64-bit GPAs and MMIO: every guest mode, width, instruction and path, with exact-address oracles.

Each case maps a GVA window (GVA_WINDOW, below 4 GiB so 32-bit PAE guests reach it too) onto a
high GPA and has the `mmio_matrix` payload make one kind of access there. The oracle
(harness.oracles.mmio) requires every KVM_EXIT_MMIO (or coalesced ring entry) to carry the GPA
exactly, the access's length and direction and, for writes, the guest's bytes; read data comes
from a device model keyed on the full reported address and the guest asserts it received it.
Every case ends with GUEST_DONE within a bounded run. Access GPAs: 8 bytes below 4 GiB, 4 GiB,
2^36, 2^40, the last page below MAXPHYADDR (read from KVM_GET_SUPPORTED_CPUID) and its last 8
bytes; straddles cross the 4 GiB, 2^36, 2^40 boundaries and the last page boundary below
MAXPHYADDR. A kernel that truncates a reported GPA to 32 or to MAXPHYADDR-1 bits fails every case
whose GPA such a truncation changes (tests/test_mmio_oracle.py proves the oracle rejects them).

Modes: pae32 (the i386 payload through PAE tables), long64, long64-la57; unsupported ones skip with
the reason (kvm_pvm: no PAE paging, no LA57). The plain-access and read-modify-write cases also run
in flat prot32 at the GPA below 4 GiB, so the i386 build of the payload runs on every host.
Livelock: a poll the host never satisfies must be reported by run_until_ucall as a Livelock
(RIP, GPA, exit count), not as a timeout.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from harness.kvm.caps import KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_MEM_READONLY, Cap
from harness.kvm.system import Kvm
from harness.lib.failures import GuestFailure, Livelock, describe_pf_error
from harness.lib.ucall import DONE, SYNC, Ucall
from harness.memory.hostmem import Mapping, view
from harness.oracles.mmio import (
    PAGE,
    Access,
    MmioDevice,
    MmioMismatch,
    matrix_gpas,
    mmio_exits,
    pattern,
    pattern_value,
    read,
    split_access,
    straddle_pairs,
    write,
)
from harness.x86.modes import Mode
from harness.x86.paging import PTE_P

pytestmark = [pytest.mark.guest("mmio_matrix"), pytest.mark.kvm_timeout(30)]

GVA_WINDOW = 0x4000_0000  # just above the 1 GiB identity map, below 4 GiB
STEP_TIMEOUT = 5.0
U64 = (1 << 64) - 1
PF_RSVD = 1 << 3
PF_W = 1 << 1

# payload ops (guests/payloads/mmio_matrix.c)
MM_DONE, MM_LOAD, MM_STORE, MM_MOVS_FROM, MM_MOVS_TO, MM_STOS, MM_ADD, MM_XCHG = range(8)
MM_PF_LOAD, MM_PF_STORE, MM_POLL = 8, 9, 10

MODES = (Mode.PAE32, Mode.LONG64, Mode.LONG64_LA57)
# Flat 32-bit protected mode (no paging, GVA == GPA) reaches only the GPA below 4 GiB; it runs the
# i386 build of the payload here, where PAE guests cannot run.
MODES_FLAT = (Mode.PROT32, *MODES)
WIDTHS = (1, 2, 4, 8)
NO_W8_IN_I386 = ("i386 guest: no single 8-byte access without x87/MMX/SSE (guests/runtime/guest.h), "
                 "and no movsq/stosq/8-byte add/xchg")


def _collection_maxphyaddr() -> int:
    """MAXPHYADDR for the test ids (each case re-checks it against its `kvm` fixture)."""
    try:
        k = Kvm(os.environ.get("KVM_HARNESS_DEV", "/dev/kvm"))
    except OSError:
        return 48  # no usable KVM here: every case skips through the kvm fixture anyway
    try:
        return k.maxphyaddr
    except OSError:
        return 48
    finally:
        k.close()


MAXPHYADDR = _collection_maxphyaddr()
GPAS = matrix_gpas(MAXPHYADDR)
PAIRS = straddle_pairs(MAXPHYADDR)
RSVD_BITS = list(range(MAXPHYADDR, 52))


def _gpas(mode: Mode) -> list[int]:
    return [g for g in GPAS if g < 1 << 32] if mode is Mode.PROT32 else GPAS


def _wide(mode: Mode) -> int:
    """The widest single access of the mode's payload build."""
    return 8 if mode.bits == 64 else 4


def _param(mode: Mode, *values: Any, id: str, width: int = 0) -> Any:
    marks = [pytest.mark.skip(reason=NO_W8_IN_I386)] if width == 8 and mode.bits == 32 else []
    return pytest.param(mode, *values, id=f"{mode.value}-{id}", marks=marks)


def _ram_bytes(gpa: int, n: int) -> bytes:
    """Host-chosen RAM contents, distinct from the device pattern at the same address."""
    return pattern(gpa ^ 0x5A5A_0000_0000_0000, n)


def _mask(width: int) -> int:
    return (1 << (8 * width)) - 1


def _value(gpa: int, width: int, salt: int = 0) -> int:
    """A value for the guest to store: differs per GPA, width and salt, no zero bytes to hide in."""
    return int.from_bytes(bytes(b | 1 for b in pattern(gpa ^ (salt << 56) ^ 0xC0DE, width)), "little")


class Rig:
    """The payload's descriptor, buffers and device, and one `step` per guest access."""

    def __init__(self, vm: Any, vcpu: Any, kvm: Kvm) -> None:
        assert kvm.maxphyaddr == MAXPHYADDR, (
            f"MAXPHYADDR changed between collection ({MAXPHYADDR}) and run ({kvm.maxphyaddr})")
        self.vm, self.vcpu, self.m = vm, vcpu, kvm.maxphyaddr
        self.desc = vm.alloc(64, 64)
        self.buf = vm.alloc(PAGE, 64)
        self.expect_buf = vm.alloc(PAGE, 64)
        self.dev = MmioDevice()
        vcpu.set_args(self.desc)

    def map(self, *gpas: int) -> int:
        """Map consecutive GVA pages from GVA_WINDOW onto these GPAs; returns GVA_WINDOW."""
        for i, g in enumerate(gpas):
            self.vm.map(GVA_WINDOW + i * PAGE, g, PAGE)
        return GVA_WINDOW

    def step(self, op: int, gva: int, width: int = 0, value: int = 0, expect: int = 0,
             count: int = 0, *, want: list[Access], what: str, **kw: Any) -> Ucall:
        """Run one op to its SYNC and check the MMIO exits KVM made on the way against `want`.

        If the guest fails its own check first (e.g. it loaded the device's answer for a wrong
        address), the exits are still checked so the failure names the wrong GPA; the guest's
        report is chained to it."""
        self.vm.write(self.desc, struct.pack("<8Q", op, gva, width, value & U64, expect & U64, count,
                                             self.buf, self.expect_buf))
        self.dev.log.clear()
        try:
            uc = self.vcpu.run_until_ucall(STEP_TIMEOUT, on_exit=self.dev, **kw)
        except GuestFailure as e:
            v = mmio_exits(self.dev.take(), want, maxphyaddr=self.m)
            if not v.ok:
                guest = "\n".join("    " + line for line in str(e).splitlines())
                raise MmioMismatch(v, what, then=f"  and then the guest failed:\n{guest}") from e
            raise
        assert uc.cmd == SYNC, f"{what}: expected SYNC, got {uc}"
        mmio_exits(self.dev.take(), want, maxphyaddr=self.m).check(what)
        return uc

    def done(self) -> None:
        """The guest must reach GUEST_DONE, with no exit on the way."""
        self.vm.write(self.desc, bytes(64))
        uc = self.vcpu.run_until_ucall(STEP_TIMEOUT, on_exit=self.dev)
        assert uc.cmd == DONE, f"expected DONE, got {uc}"
        assert not self.dev.log, f"exits on the way to DONE: {self.dev.log}"

    def ram_slot(self, gpa: int, size: int = PAGE, flags: int = 0) -> tuple[int, Any]:
        """A RAM slot at gpa filled with _ram_bytes; returns (slot id, host view of its memory)."""
        mem = self.vm.own(Mapping(size))
        v = view(mem.addr, size)
        v[:] = _ram_bytes(gpa, size)
        slot = self.vm.add_memslot(gpa, size, flags=flags, backing=mem)
        return slot.slot, v


@pytest.fixture
def rig(vm: Any, vcpu: Any, kvm: Kvm) -> Rig:
    return Rig(vm, vcpu, kvm)


def _page(gpa: int) -> int:
    return gpa & ~(PAGE - 1)


def _window(rig: Rig, gpa: int) -> int:
    """Map gpa's page at the window; returns the GVA of gpa (gpa itself in flat prot32)."""
    if rig.vm.pt is None:
        assert gpa + 8 <= 1 << 32, f"gpa {gpa:#x} is out of reach without paging"
        return gpa
    return rig.map(_page(gpa)) + (gpa & (PAGE - 1))


# ---- no memslot: plain MMIO exits -----------------------------------------------------------------
@pytest.mark.parametrize("mode,gpa,width,direction", [
    _param(m, g, w, d, id=f"gpa={g:#x}-w{w}-{d}", width=w)
    for m in MODES_FLAT for g in _gpas(m) for w in WIDTHS for d in ("read", "write")])
def test_mmio_access(rig: Rig, mode: Mode, gpa: int, width: int, direction: str) -> None:
    """One load/store of each width at each GPA with no memslot: one exit, exact GPA, len, data."""
    gva = _window(rig, gpa)
    if direction == "read":
        want = pattern_value(gpa, width)
        uc = rig.step(MM_LOAD, gva, width, expect=want, want=[read(gpa, width)],
                 what=f"{width}-byte load at gva {gva:#x}")
        assert uc.args[0] == want, f"guest loaded {uc.args[0]:#x}, device supplied {want:#x}"
    else:
        value = _value(gpa, width)
        rig.step(MM_STORE, gva, width, value, want=[write(gpa, value, width)],
                 what=f"{width}-byte store of {value:#x} at gva {gva:#x}")
    rig.done()


# ---- straddles -----------------------------------------------------------------------------------
def _straddle_params() -> Iterator[Any]:
    for m in MODES:
        w = _wide(m)
        for first, second in PAIRS:
            for kind in ("mmio-mmio", "ram-mmio", "mmio-ram"):
                for split in (w // 2, w // 2 - 1):
                    for d in ("read", "write"):
                        start = first + PAGE - split
                        yield _param(m, first, second, kind, split, d,
                                     id=f"gpa={start:#x}-{kind}-split={split}+{w - split}-{d}")


@pytest.mark.parametrize("mode,first,second,kind,split,direction", list(_straddle_params()))
def test_page_straddle(rig: Rig, mode: Mode, first: int, second: int, kind: str, split: int,
                       direction: str) -> None:
    """An access crossing from page `first` into page `second` (each RAM or MMIO): KVM splits it
    at the page boundary; each MMIO part exits with its own exact GPA, RAM parts hit the slot."""
    w = _wide(mode)
    gva = rig.map(first, second) + PAGE - split
    frags = [(first + PAGE - split, split), (second, w - split)]
    ram_page = {"ram-mmio": first, "mmio-ram": second}.get(kind)
    ram = rig.ram_slot(ram_page)[1] if ram_page is not None else None
    mmio_frags = [f for f in frags if _page(f[0]) != ram_page]

    def source(gpa: int, n: int) -> bytes:  # what a read of [gpa, gpa+n) must return
        if _page(gpa) == ram_page:
            return _ram_bytes(gpa, n)
        return pattern(gpa, n)

    what = f"{w}-byte {direction} at gva {gva:#x} crossing {first:#x}+{PAGE:#x} -> {second:#x} ({kind})"
    if direction == "read":
        want = int.from_bytes(b"".join(source(g, n) for g, n in frags), "little")
        uc = rig.step(MM_LOAD, gva, w, expect=want, want=split_access(mmio_frags, False), what=what)
        assert uc.args[0] == want, f"guest loaded {uc.args[0]:#x}, expected {want:#x}"
    else:
        value = _value(first, w)
        data = value.to_bytes(w, "little")
        parts = {g: data[sum(n for _, n in frags[:i]):][:n] for i, (g, n) in enumerate(frags)}
        rig.step(MM_STORE, gva, w, value, want=[write(g, parts[g]) for g, _ in mmio_frags], what=what)
        if ram is not None:
            (rg, rn), = [f for f in frags if _page(f[0]) == ram_page]
            off = rg - ram_page
            expect = bytearray(_ram_bytes(ram_page, PAGE))
            expect[off:off + rn] = parts[rg]
            got = bytes(ram)
            assert got == bytes(expect), (
                f"RAM page {ram_page:#x} after the store: bytes {off:#x}..{off + rn - 1:#x} should be "
                f"{parts[rg].hex()} and the rest unchanged; got {got[off:off + rn].hex()} there, "
                f"{sum(a != b for a, b in zip(got, expect, strict=True))} bytes differ in all")
    rig.done()


@pytest.mark.parametrize("mode,gpa,direction", [
    _param(m, _page(g) + 0x40 - _wide(m) // 2, d, id=f"gpa={_page(g) + 0x40 - _wide(m) // 2:#x}-w{_wide(m)}-{d}")
    for m in MODES for g in GPAS[:-1] for d in ("read", "write")])
def test_cacheline_straddle(rig: Rig, mode: Mode, gpa: int, direction: str) -> None:
    """An access across a 64-byte line inside one MMIO page is one exit of the full width."""
    w = _wide(mode)
    gva = _window(rig, gpa)
    if direction == "read":
        want = pattern_value(gpa, w)
        uc = rig.step(MM_LOAD, gva, w, expect=want, want=[read(gpa, w)],
                 what=f"{w}-byte load across a cache line at gva {gva:#x}")
        assert uc.args[0] == want
    else:
        value = _value(gpa, w)
        rig.step(MM_STORE, gva, w, value, want=[write(gpa, value, w)],
                 what=f"{w}-byte store across a cache line at gva {gva:#x}")
    rig.done()


# ---- string instructions and read-modify-write -------------------------------------------------
STRING_COUNT = 4  # two elements in each of the two pages


@pytest.mark.parametrize("mode,first,second,kind,width", [
    _param(m, a, b, k, w, id=f"gpa={a + PAGE - 2 * w:#x}-{k}-w{w}", width=w)
    for m in MODES for a, b in PAIRS for k in ("movs-from", "movs-to", "stos") for w in WIDTHS])
def test_rep_string(rig: Rig, mode: Mode, first: int, second: int, kind: str, width: int) -> None:
    """rep movs/stos of 4 elements starting 2 elements before a page boundary between two MMIO
    pages: one exit per element, each at its exact GPA, in order."""
    gva = rig.map(first, second) + PAGE - 2 * width
    elems = [first + PAGE - 2 * width + i * width for i in range(2)] + [second + i * width for i in range(2)]
    what = f"rep {kind} x{STRING_COUNT} of {width}-byte elements at gva {gva:#x}"
    if kind == "movs-from":
        want = b"".join(pattern(g, width) for g in elems)
        rig.vm.write(rig.expect_buf, want)
        uc = rig.step(MM_MOVS_FROM, gva, width, count=STRING_COUNT, want=[read(g, width) for g in elems],
                      what=what)
        got = rig.vm.read(rig.buf, len(want))
        assert got == want, f"RAM destination holds {got.hex()}, the device supplied {want.hex()}"
        assert uc.args[0] == int.from_bytes(want[:8], "little")
    elif kind == "movs-to":
        src = b"".join(_value(g, width).to_bytes(width, "little") for g in elems)
        rig.vm.write(rig.buf, src)
        parts = [src[i * width:(i + 1) * width] for i in range(STRING_COUNT)]
        rig.step(MM_MOVS_TO, gva, width, count=STRING_COUNT,
                 want=[write(g, d) for g, d in zip(elems, parts, strict=True)], what=what)
    else:
        value = _value(first, width)
        rig.step(MM_STOS, gva, width, value, count=STRING_COUNT,
                 want=[write(g, value, width) for g in elems], what=what)
    rig.done()


@pytest.mark.parametrize("mode,gpa,kind,width", [
    _param(m, g, k, w, id=f"gpa={g:#x}-{k}-w{w}", width=w)
    for m in MODES_FLAT for g in _gpas(m) for k in ("add", "xchg") for w in WIDTHS])
def test_read_modify_write(rig: Rig, mode: Mode, gpa: int, kind: str, width: int) -> None:
    """`add [mem], reg` and `xchg [mem], reg` on MMIO: a read then a write, both at the exact GPA;
    the add writes old + reg, the xchg writes reg and the old value lands in the register."""
    gva = _window(rig, gpa)
    old = pattern_value(gpa, width)
    value = _value(gpa, width, salt=1)
    what = f"{width}-byte {kind} at gva {gva:#x}"
    if kind == "add":
        total = (old + value) & _mask(width)
        rig.step(MM_ADD, gva, width, value, want=[read(gpa, width), write(gpa, total, width)], what=what)
    else:
        uc = rig.step(MM_XCHG, gva, width, value, expect=old,
                      want=[read(gpa, width), write(gpa, value, width)], what=what)
        assert uc.args[0] == old, f"xchg left {uc.args[0]:#x} in the register, the device held {old:#x}"
    rig.done()


# ---- memslot paths -------------------------------------------------------------------------------
def _slot_params(widths: bool = True) -> list[Any]:
    ws = WIDTHS if widths else (None,)
    out = []
    for m in MODES:
        for g in GPAS:
            for w in ws:
                w_ = w or _wide(m)
                out.append(_param(m, g, w_, id=f"gpa={g:#x}" + (f"-w{w}" if w else ""), width=w_))
    return out


@pytest.mark.requires_cap(Cap.READONLY_MEM)
@pytest.mark.parametrize("mode,gpa,width", _slot_params())
def test_readonly_slot(rig: Rig, mode: Mode, gpa: int, width: int) -> None:
    """A READONLY slot at a high GPA: loads read the slot without exiting; a store exits as an MMIO
    write at the exact GPA with the guest's data, and the host memory is left unchanged."""
    _, ram = rig.ram_slot(_page(gpa), flags=KVM_MEM_READONLY)
    gva = _window(rig, gpa)
    before = _ram_bytes(_page(gpa), PAGE)
    want = int.from_bytes(before[gpa - _page(gpa):][:width], "little")
    uc = rig.step(MM_LOAD, gva, width, expect=want, want=[],
             what=f"{width}-byte load from a READONLY slot at gva {gva:#x}")
    assert uc.args[0] == want, f"guest loaded {uc.args[0]:#x} from the READONLY slot, host wrote {want:#x}"
    value = _value(gpa, width)
    rig.step(MM_STORE, gva, width, value, want=[write(gpa, value, width)],
             what=f"{width}-byte store to a READONLY slot at gva {gva:#x}")
    assert bytes(ram) == before, "the store to a READONLY slot changed its host memory"
    rig.step(MM_LOAD, gva, width, expect=want, want=[], what="load after the refused store")  # still the slot
    rig.done()


@pytest.mark.parametrize("mode,gpa,width", _slot_params(widths=False))
def test_slot_deleted_while_stopped(rig: Rig, mode: Mode, gpa: int, width: int) -> None:
    """The guest uses a RAM slot at a high GPA; the host deletes it while the vCPU is stopped at a
    SYNC; the same accesses then exit as MMIO at the exact GPA and reach no stale mapping."""
    slot, ram = rig.ram_slot(_page(gpa))
    gva = _window(rig, gpa)
    off = gpa - _page(gpa)
    want = int.from_bytes(_ram_bytes(_page(gpa), PAGE)[off:off + width], "little")
    rig.step(MM_LOAD, gva, width, expect=want, want=[],
             what="load from the RAM slot before deletion")
    v1 = _value(gpa, width, salt=1)
    rig.step(MM_STORE, gva, width, v1, want=[],
             what="store to the RAM slot before deletion")
    assert bytes(ram[off:off + width]) == v1.to_bytes(width, "little"), "the store did not land in the slot"

    rig.vm.delete_memslot(slot)
    dev = pattern_value(gpa, width)
    uc = rig.step(MM_LOAD, gva, width, expect=dev, want=[read(gpa, width)],
             what=f"load at gva {gva:#x} after slot {slot} was deleted")
    assert uc.args[0] == dev, f"guest loaded {uc.args[0]:#x} after the deletion, the device supplied {dev:#x}"
    v2 = _value(gpa, width, salt=2)
    rig.step(MM_STORE, gva, width, v2, want=[write(gpa, v2, width)],
             what=f"store at gva {gva:#x} after slot {slot} was deleted")
    assert bytes(ram[off:off + width]) == v1.to_bytes(width, "little"), (
        "a store after the slot's deletion reached its old host memory")
    rig.done()


@pytest.mark.parametrize("mode,gpa,width", _slot_params())
def test_high_ram_slot(rig: Rig, mode: Mode, gpa: int, width: int) -> None:
    """A RAM slot at a high GPA: a guest store lands in the host buffer at exactly gpa - slot base
    (and nowhere else), a host write is what the guest loads; no exits."""
    base = _page(gpa)
    _, ram = rig.ram_slot(base)
    gva = _window(rig, gpa)
    off = gpa - base
    value = _value(gpa, width)
    rig.step(MM_STORE, gva, width, value, want=[],
             what=f"{width}-byte store to a RAM slot at gva {gva:#x}")
    expect = bytearray(_ram_bytes(base, PAGE))
    expect[off:off + width] = value.to_bytes(width, "little")
    got = bytes(ram)
    if got != bytes(expect):
        where = [hex(base + i) for i in range(PAGE) if got[i] != expect[i]][:8]
        pytest.fail(f"guest store of {value:#x} at gpa {gpa:#x}: host buffer differs from the expected "
                    f"page at {where} (the value must land at offset {off:#x} only)")
    host = _value(gpa, width, salt=3)
    ram[off:off + width] = host.to_bytes(width, "little")
    uc = rig.step(MM_LOAD, gva, width, expect=host, want=[],
             what=f"{width}-byte load from a RAM slot at gva {gva:#x}")
    assert uc.args[0] == host
    rig.done()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.mark.requires_cap(Cap.IOEVENTFD)
@pytest.mark.parametrize("mode,gpa,width", _slot_params())
def test_ioeventfd(rig: Rig, mode: Mode, gpa: int, width: int) -> None:
    """KVM_IOEVENTFD at a 64-bit address: a store of its length fires the eventfd without an exit;
    a store of another length and a load at the same address exit as MMIO at the exact GPA."""
    fd = _eventfd()
    try:
        rig.vm.ioeventfd(gpa, width, fd)
        gva = _window(rig, gpa)
        value = _value(gpa, width)
        rig.step(MM_STORE, gva, width, value, want=[],
                 what=f"{width}-byte store to the ioeventfd at {gpa:#x}")
        assert _eventfd_count(fd) == 1, f"ioeventfd at {gpa:#x} did not fire for a {width}-byte store"
        other = 2 if width == 1 else 1
        rig.step(MM_STORE, gva, other, value, want=[write(gpa, value, other)],
                 what=f"{other}-byte store (ioeventfd length is {width})")
        assert _eventfd_count(fd) == 0, "ioeventfd fired for a store of another length"
        want = pattern_value(gpa, width)
        rig.step(MM_LOAD, gva, width, expect=want, want=[read(gpa, width)],
                 what="load from the ioeventfd address (ioeventfds take writes only)")
        rig.done()
    finally:
        os.close(fd)


@pytest.mark.requires_cap(Cap.IOEVENTFD)
@pytest.mark.parametrize("mode,gpa,width", _slot_params(widths=False))
def test_ioeventfd_datamatch(rig: Rig, mode: Mode, gpa: int, width: int) -> None:
    """A DATAMATCH ioeventfd at a 64-bit address fires for the matching value only; another value
    exits as an MMIO write at the exact GPA with the guest's data."""
    fd = _eventfd()
    try:
        match = _value(gpa, width)
        rig.vm.ioeventfd(gpa, width, fd, KVM_IOEVENTFD_FLAG_DATAMATCH, match)
        gva = _window(rig, gpa)
        rig.step(MM_STORE, gva, width, match, want=[],
                 what=f"store of the matching value {match:#x}")
        assert _eventfd_count(fd) == 1, f"DATAMATCH ioeventfd at {gpa:#x} did not fire for {match:#x}"
        other = match ^ 0x80
        rig.step(MM_STORE, gva, width, other, want=[write(gpa, other, width)],
                 what=f"store of a non-matching value {other:#x}")
        assert _eventfd_count(fd) == 0, f"DATAMATCH ioeventfd fired for {other:#x}"
        rig.done()
    finally:
        os.close(fd)


@pytest.mark.requires_cap(Cap.COALESCED_MMIO)
@pytest.mark.parametrize("mode,gpa,width", _slot_params())
def test_coalesced_mmio(rig: Rig, mode: Mode, gpa: int, width: int) -> None:
    """A coalesced MMIO zone at a 64-bit address: stores land in the ring (no exit) with the full
    address, length and data, in order; loads still exit."""
    base = _page(gpa)
    rig.vm.register_coalesced_mmio(base, PAGE)
    rig.vcpu.coalesced_mmio()  # start from an empty ring
    gva = _window(rig, gpa)
    v1, v2 = _value(gpa, width, salt=1), _value(gpa, width, salt=2)
    rig.step(MM_STORE, gva, width, v1, want=[],
             what=f"{width}-byte store into the coalesced zone")
    second = base + 0x100
    rig.step(MM_STORE, gva - gpa + second, width, v2, want=[],
             what=f"{width}-byte store into the coalesced zone")
    ring = rig.vcpu.coalesced_mmio()
    mmio_exits(ring, [write(gpa, v1, width), write(second, v2, width)], maxphyaddr=rig.m).check(
        "coalesced MMIO ring entries")
    assert not any(e.pio for e in ring), f"ring entries marked PIO: {ring}"
    want = pattern_value(gpa, width)
    rig.step(MM_LOAD, gva, width, expect=want, want=[read(gpa, width)],
             what="load from the coalesced zone")
    rig.done()
    assert rig.vcpu.coalesced_mmio() == [], "ring entries appeared without a store"


# ---- beyond MAXPHYADDR ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode,bit,direction", [
    _param(m, b, d, id=f"bit={b}-{d}") for m in MODES for b in RSVD_BITS for d in ("read", "write")])
def test_reserved_pa_bit_faults(rig: Rig, mode: Mode, bit: int, direction: str) -> None:
    """A guest PTE with a physical-address bit >= MAXPHYADDR set: the access takes #PF with
    P|RSVD (|W) and cr2 = the GVA in the guest's own handler; no exit, no shutdown, no hang."""
    target = (1 << rig.m) - PAGE
    rig.vm.map(GVA_WINDOW, target | (1 << bit), PAGE, allow_reserved=True)
    gva = GVA_WINDOW + 0x10
    op = MM_PF_LOAD if direction == "read" else MM_PF_STORE
    uc = rig.step(op, gva, 4, 0x5A5A5A5A, want=[],
             what=f"{direction} through a PTE with reserved bit {bit}")
    vector, error, cr2, faults = uc.args[:4]
    want = PTE_P | PF_RSVD | (PF_W if direction == "write" else 0)
    assert (vector, error, cr2, faults) == (14, want, gva, 1), (
        f"guest saw vector {vector}, error {error:#x} ({describe_pf_error(error)}), cr2 {cr2:#x}, "
        f"{faults} faults; want #PF error {want:#x} ({describe_pf_error(want)}) cr2 {gva:#x} once")
    rig.done()


# ---- livelock reporting --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [Mode.LONG64], ids=["long64"])
def test_livelock_is_reported_with_rip_gpa_and_count(rig: Rig, mode: Mode) -> None:
    """A guest polling an MMIO register the host never makes ready exits at the same RIP and GPA
    forever: run_until_ucall reports a Livelock naming RIP, GPA and exit count (not a timeout)."""
    gpa = (1 << rig.m) - PAGE + 0x20
    gva = _window(rig, gpa)
    rig.dev.reader = lambda g, n: bytes(n)  # never the 1 the guest waits for
    rig.vm.write(rig.desc, struct.pack("<8Q", MM_POLL, gva, 4, 0, 1, 0, 0, 0))
    with pytest.raises(Livelock) as ei:
        rig.vcpu.run_until_ucall(STEP_TIMEOUT, on_exit=rig.dev, livelock_exits=300)
    e = ei.value
    assert e.gpa == gpa and e.count == 300, (e.gpa, e.count)
    lo, hi = rig.vm.guest.extent
    assert lo <= e.rip < hi, f"livelock rip {e.rip:#x} outside the payload"
    code = rig.vm.read(e.rip, 2)
    opcode = code[1] if 0x40 <= code[0] <= 0x4F else code[0]  # skip a REX prefix
    assert opcode == 0x8B, f"livelock rip {e.rip:#x} is not the poll's 4-byte load (code {code.hex()})"
    msg = str(e)
    assert f"gpa={gpa:#x}" in msg and "300 exits" in msg and f"rip={e.rip:#x}" in msg, msg
    assert len(rig.dev.log) == 300
    assert all(x.phys_addr == gpa and x.len == 4 and not x.is_write for x in rig.dev.log)


@pytest.mark.parametrize("mode", [Mode.LONG64], ids=["long64"])
def test_polling_that_progresses_is_not_a_livelock(rig: Rig, mode: Mode) -> None:
    """The same poll answered ready just before the livelock bound ends normally."""
    gpa = (1 << rig.m) - PAGE + 0x20
    gva = _window(rig, gpa)
    reads = 0

    def reader(g: int, n: int) -> bytes:
        nonlocal reads
        reads += 1
        return (1 if reads == 299 else 0).to_bytes(n, "little")

    rig.dev.reader = reader
    uc = rig.step(MM_POLL, gva, 4, expect=1, livelock_exits=300, want=[read(gpa, 4)] * 299,
                  what="a poll answered ready at its 299th read")
    assert uc.args[0] == 1
    rig.done()
