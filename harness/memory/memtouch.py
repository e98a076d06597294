"""Host side of guests/payloads/memtouch.c: the guest writes, verifies or reads words of test memory.

The word at offset o (relative to the start of the range) is `word(pattern, o)`; the guest reports
`Result(checksum, bad, first, count, cmd)` after each command. The same functions let the host fill
and check a backing's mapping, so either side can write and the other check.

    with MemTouch.open(kvm) as mt:
        slot = mt.vm.add_memslot(1 << 40, 2 << 20, backing=b)
        gva = mt.map_slot(slot.slot)
        mt.write(gva, 2 << 20, pattern=7)
        assert host_check(b.view(), 7) == (0, None)
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.kvm._cffi import ffi, lib
from harness.kvm.errors import HarnessError
from harness.kvm.exits import Exit, Mmio
from harness.lib.guestvm import GuestVm
from harness.lib.mailbox import Mailbox
from harness.lib.run import DEFAULT_UCALL_TIMEOUT

if TYPE_CHECKING:
    from harness.kvm.system import Kvm
    from harness.kvm.vcpu import Vcpu

MIX = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
NONE = MASK  # "no offset" in the guest's reports
CMD_DONE, CMD_WRITE, CMD_VERIFY, CMD_READ = 0, 1, 2, 3
DESC_SIZE = 40
TEST_GVA = 1 << 39  # test memory is mapped from here up, away from the 1 GiB identity map
GVA_REGION = 1 << 30  # each mapping starts a fresh 1 GiB region (no page-size clashes)


def word(pattern: int, off: int) -> int:
    return ((pattern ^ off) * MIX) & MASK


def offsets(length: int, stride: int = 8) -> range:
    """The offsets the guest visits for (length, stride): 0, stride, ... while off + 8 <= length."""
    return range(0, max(0, length - 7), stride)


def words(pattern: int, length: int, stride: int = 8, base: int = 0) -> array:
    """The words the guest writes, as array('Q'); `base` shifts the offsets (a sub-range).
    word(pattern, base + o) for o in offsets(length, stride), computed in C (kh_memtouch_words)."""
    n = len(offsets(length, stride))
    out = array("Q", bytes(8 * n))
    if n:
        lib.kh_memtouch_words(pattern & MASK, base & MASK, stride, n, ffi.from_buffer("uint64_t[]", out))
    return out


def checksum(values: Iterable[int]) -> int:
    """The guest's checksum of the words it visited: s = s * 31 + v (mod 2^64), in order."""
    if isinstance(values, array) and values.typecode == "Q":
        return int(lib.kh_memtouch_checksum(ffi.from_buffer("uint64_t[]", values), len(values))) if values else 0
    s = 0
    for v in values:
        s = (s * 31 + v) & MASK
    return s


def _strided(buf: Any, stride: int) -> memoryview:
    if stride % 8:
        raise HarnessError(f"stride {stride} is not a multiple of 8")
    mv = memoryview(buf)
    n = len(mv) // 8 * 8
    return mv[:n].cast("Q")[:: stride // 8]


def host_fill(buf: Any, pattern: int, stride: int = 8, base: int = 0) -> None:
    """Write the pattern into a host buffer as the guest's cmd 1 would (offsets relative to buf)."""
    dst = _strided(buf, stride)
    src = words(pattern, len(memoryview(buf)), stride, base)
    dst[:] = memoryview(src)[: len(dst)]


def host_values(buf: Any, stride: int = 8) -> list[int]:
    return _strided(buf, stride).tolist()


def host_check(buf: Any, pattern: int, stride: int = 8, base: int = 0) -> tuple[int, int | None]:
    """(mismatching words, first mismatching offset or None) of buf against the pattern."""
    got = _strided(buf, stride)
    want = words(pattern, len(memoryview(buf)), stride, base)
    have = array("Q", got.tobytes())  # one copy in C; equal (the usual case) is decided in C too
    if have == want[: len(have)]:
        return 0, None
    bad = [i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b]
    return len(bad), (bad[0] * stride if bad else None)


def host_nonzero(buf: Any, stride: int = 8) -> tuple[int, int | None]:
    """(non-zero words, first non-zero offset or None)."""
    nz = [i for i, v in enumerate(host_values(buf, stride)) if v]
    return len(nz), (nz[0] * stride if nz else None)


@dataclass(frozen=True)
class Result:
    checksum: int
    bad: int  # verify: mismatches; read: non-zero words; write: 0
    first: int | None  # offset of the first bad word
    count: int  # words visited
    cmd: int

    @classmethod
    def from_args(cls, args: tuple[int, ...]) -> Result:
        if len(args) < 5:
            raise HarnessError(f"memtouch SYNC carries {len(args)} values, expected 5: {args}")
        c, bad, first, count, cmd = args[:5]
        return cls(c, bad, None if first == NONE else first, count, cmd)


@dataclass
class MmioLog:
    """An on_exit handler that records MMIO exits and answers reads with read_value(gpa, len)."""

    read_value: Callable[[int, int], int] = lambda gpa, n: 0
    exits: list[tuple[int, int, bool, int]] = field(default_factory=list)  # (gpa, len, is_write, value)

    def __call__(self, vcpu: Vcpu, ex: Exit) -> bool:
        if not isinstance(ex, Mmio):
            return False
        if ex.is_write:
            self.exits.append((ex.phys_addr, ex.len, True, ex.value))
        else:
            v = self.read_value(ex.phys_addr, ex.len)
            self.exits.append((ex.phys_addr, ex.len, False, v))
            vcpu.complete_mmio(v)
        return True

    @property
    def reads(self) -> list[int]:
        return [g for g, _, w, _ in self.exits if not w]

    @property
    def writes(self) -> list[tuple[int, int]]:
        return [(g, v) for g, _, w, v in self.exits if w]

    def clear(self) -> None:
        self.exits.clear()


class MemTouch:
    """A GuestVm running memtouch on vCPU 0, with a descriptor in scratch memory."""

    def __init__(self, vm: GuestVm) -> None:
        if vm.guest.name.split(".")[0] != "memtouch":
            raise HarnessError(f"MemTouch needs the memtouch payload, the VM runs {vm.guest.name}")
        self.vm = vm
        self.vcpu = vm.vcpu
        self.mailbox = Mailbox(vm, DESC_SIZE)
        self._next_gva = TEST_GVA
        self.done_sent = False

    @classmethod
    def open(cls, kvm: Kvm, **kw: Any) -> MemTouch:
        return cls(GuestVm(kvm, "memtouch", "long64", **kw))

    # ---- guest page tables ---------------------------------------------------------------------
    def alloc_gva(self, size: int) -> int:
        """A GVA range for `size` bytes that no other mapping of this MemTouch shares a 1 GiB region with."""
        gva = self._next_gva
        self._next_gva += (size + GVA_REGION - 1) // GVA_REGION * GVA_REGION
        return gva

    def map_slot(self, slot: int, gva: int | None = None, page_size: int | None = None) -> int:
        """Map memslot `slot` at gva (a fresh region when None) before the guest first runs.

        Shadow paging (kvm_pvm) may keep translations the host edits later: map up front."""
        m = self.vm.memslots[slot]
        return self.vm.map_slot(slot, self.alloc_gva(m.size) if gva is None else gva, page_size)

    def map(self, gpa: int, size: int, gva: int | None = None, page_size: int = 4096) -> int:
        """Map a GPA range that need not be memory (MMIO probes) at gva (fresh when None)."""
        g = self.alloc_gva(size) if gva is None else gva
        self.vm.map(g, gpa, size, page_size)
        return g

    # ---- commands ------------------------------------------------------------------------------
    def run(self, cmd: int, gva: int, length: int, pattern: int = 0, stride: int = 8, *,
            on_exit: Callable[[Vcpu, Exit], bool | None] | None = None,
            timeout: float | None = None) -> Result:
        if self.done_sent:
            raise HarnessError("memtouch already finished (done() was called)")
        if timeout is None:
            # faulting in a 1 GiB hugetlb page takes seconds, more under parallel load
            timeout = DEFAULT_UCALL_TIMEOUT + 25.0 * (length / (1 << 30))
        uc = self.mailbox.call(cmd, gva, length, pattern & MASK, stride, timeout=timeout, on_exit=on_exit)
        res = Result.from_args(uc.args)
        if res.cmd != cmd:
            raise HarnessError(f"memtouch answered cmd {res.cmd} to cmd {cmd}")
        return res

    def write(self, gva: int, length: int, pattern: int, stride: int = 8, **kw: Any) -> Result:
        return self.run(CMD_WRITE, gva, length, pattern, stride, **kw)

    def verify(self, gva: int, length: int, pattern: int, stride: int = 8, **kw: Any) -> Result:
        return self.run(CMD_VERIFY, gva, length, pattern, stride, **kw)

    def read(self, gva: int, length: int, stride: int = 8, **kw: Any) -> Result:
        return self.run(CMD_READ, gva, length, 0, stride, **kw)

    def read_word(self, gva: int, **kw: Any) -> int:
        """One 8-byte guest load at gva; returns the value the guest saw."""
        return self.read(gva, 8, 8, **kw).checksum

    def done(self) -> None:
        """Send cmd 0 and run to GUEST_DONE."""
        self.mailbox.finish()
        self.done_sent = True

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> MemTouch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
