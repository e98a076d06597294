"""Exact-address and data oracles for MMIO exits, plus a deterministic device model to answer reads.

The oracle compares what KVM reported (a KVM_EXIT_MMIO exit, or a coalesced MMIO ring entry) with
the access the guest made: the GPA exactly (no masking, so an address truncated to 32 bits or to
MAXPHYADDR-1 bits is a failure, named as such), the length, the direction and, for writes, the
bytes the guest stored. Everything here is pure (no KVM): tests/test_mmio_oracle.py feeds it
truncated and otherwise wrong exits.

    mmio_exits(dev.take(), [read(gpa, 8)], maxphyaddr=m).check("8-byte load")  # raises MmioMismatch
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.kvm._cffi import ffi, lib
from harness.oracles.verdict import OracleFailure, Verdict

U64 = (1 << 64) - 1
PAGE = 0x1000


class MmioReport(Protocol):
    """What the oracle reads from an exit: harness.kvm.exits.Mmio and CoalescedMmio both fit.

    `is_write` may be absent (coalesced entries are writes by construction)."""

    phys_addr: int
    len: int
    data: bytes


@dataclass(frozen=True)
class Access:
    """One access the guest made, as KVM must report it."""

    gpa: int
    len: int
    is_write: bool
    data: bytes | None = None  # writes: exactly the `len` bytes the guest stored (None: not checked)

    def __post_init__(self) -> None:
        if self.data is not None and len(self.data) != self.len:
            raise ValueError(f"Access data {self.data.hex()} is not {self.len} bytes")

    def describe(self) -> str:
        s = f"{'write' if self.is_write else 'read'} of {self.len} byte{'s' * (self.len != 1)} at {self.gpa:#x}"
        if self.data is not None:
            s += f" data={self.data.hex()}"
        return s


def read(gpa: int, n: int) -> Access:
    return Access(gpa, n, False)


def write(gpa: int, data: bytes | int, n: int | None = None) -> Access:
    """A write of `data` (bytes, or an int stored little endian in n bytes)."""
    if isinstance(data, int):
        if n is None:
            raise ValueError("write(gpa, int) needs the width n")
        data = (data & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
    return Access(gpa, len(data), True, data)


class MmioMismatch(OracleFailure):
    """KVM's report of an MMIO access differs from the access the guest made (`problems`: each way).

    `then`: what happened after the exits, e.g. the guest's own failure report, appended to the
    message (the exits are checked first so the failure names the wrong GPA)."""

    def __init__(self, verdict: Verdict, context: str = "", then: str = "") -> None:
        super().__init__(verdict, context)
        self.then = then
        if then:
            self.args = (f"{self.args[0]}\n{then}",)


@dataclass(frozen=True)
class MmioVerdict(Verdict):
    """A Verdict on MMIO reports: its explanation shows both sides (the guest's accesses, KVM's
    reports) before the problems, and check() raises MmioMismatch."""

    listing: tuple[str, ...] = ()  # the "expected:" / "got:" lines

    def explain(self, context: str = "") -> str:
        if self.ok:
            return super().explain(context)
        head, *rest = super().explain(context).split("\n")
        return "\n".join([head, *self.listing, *rest])

    def check(self, context: str = "") -> Verdict:
        if self.problems:
            raise MmioMismatch(self, context)
        return self


# ---- address diagnosis ---------------------------------------------------------------------------
def truncations(gpa: int, maxphyaddr: int) -> dict[str, int]:
    """The ways a kernel has been seen to lose address bits, with what each would leave of gpa."""
    return {
        "32 bits": gpa & 0xFFFF_FFFF,
        f"MAXPHYADDR-1 = {maxphyaddr - 1} bits": gpa & ((1 << (maxphyaddr - 1)) - 1),
        f"MAXPHYADDR = {maxphyaddr} bits": gpa & ((1 << maxphyaddr) - 1),
        "the page frame (offset lost)": gpa & ~(PAGE - 1),
    }


def _bits(x: int) -> str:
    """'bit 47' or 'bits 47..32, 12' for the set bits of x."""
    bits = [i for i in range(64) if x >> i & 1]
    if not bits:
        return "no bits"
    # compress runs: 47..32
    runs: list[str] = []
    start = prev = bits[0]
    for b in [*bits[1:], None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        runs.append(f"{prev}..{start}" if prev != start else str(start))
        if b is not None:
            start = prev = b
    word = "bit" if len(bits) == 1 else "bits"
    return f"{word} {', '.join(reversed(runs))}"


def explain_address(got: int, want: int, maxphyaddr: int) -> str:
    """Why `got` is not `want`, in words a maintainer can act on ("" when they are equal)."""
    if got == want:
        return ""
    for name, t in truncations(want, maxphyaddr).items():
        if got == t:
            return f"the GPA truncated to {name} ({_bits(want ^ got)} lost)"
    parts = [f"differs in {_bits(want ^ got)}"]
    if got >> maxphyaddr:
        parts.append(f"reported address is beyond MAXPHYADDR {maxphyaddr}")
    if (got ^ want) < PAGE:
        parts.append("same page, wrong offset")
    elif got & (PAGE - 1) == want & (PAGE - 1):
        parts.append("right page offset, wrong page frame")
    return "; ".join(parts)


def _explain_data(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes where the guest wrote {len(want)}"
    if got == want[::-1]:
        return "byte-swapped"
    if not any(got):
        return "all zero"
    diff = [i for i in range(len(got)) if got[i] != want[i]]
    return f"bytes {diff} differ"


# ---- the oracle ----------------------------------------------------------------------------------
def describe_report(ex: Any) -> str:
    """An exit or ring entry in the oracle's terms (phys_addr, len, direction, data)."""
    is_write = getattr(ex, "is_write", True)
    n = getattr(ex, "len", 0)
    data = bytes(getattr(ex, "data", b""))[: max(0, min(n, 8))]
    s = f"{'write' if is_write else 'read'} of {n} byte{'s' * (n != 1)} at {ex.phys_addr:#x}"
    if is_write:
        s += f" data={data.hex()}"
    return s


def mismatches(got: MmioReport, want: Access, *, maxphyaddr: int) -> list[str]:
    """Each way `got` differs from `want`, as readable lines (empty: it matches exactly)."""
    out = []
    if got.phys_addr != want.gpa:
        out.append(f"phys_addr {got.phys_addr:#x} != {want.gpa:#x}: "
                   f"{explain_address(got.phys_addr, want.gpa, maxphyaddr)}")
    if got.len != want.len:
        out.append(f"len {got.len} != {want.len}")
    is_write = bool(getattr(got, "is_write", True))
    if is_write != want.is_write:
        out.append(f"is_write {is_write} != {want.is_write}: KVM reported a "
                   f"{'write' if is_write else 'read'} where the guest made a {'write' if want.is_write else 'read'}")
    if want.is_write and want.data is not None and is_write:
        n = min(max(got.len, 0), 8)
        data = bytes(got.data)[:n]
        if data != want.data:
            out.append(f"data {data.hex()} != the guest's {want.data.hex()} ({_explain_data(data, want.data)})")
    return out


def mmio_exit(got: MmioReport, want: Access, *, maxphyaddr: int) -> MmioVerdict:
    """`got` must report exactly the access `want`."""
    listing = (f"  expected: {want.describe()}", f"  got:      {describe_report(got)}")
    return MmioVerdict("MMIO exit", tuple(mismatches(got, want, maxphyaddr=maxphyaddr)), {}, listing)


def mmio_exits(got: Sequence[MmioReport], want: Sequence[Access], *, maxphyaddr: int) -> MmioVerdict:
    """`got` must be exactly the accesses `want`, in order. Facts: how many exits, how many accesses."""
    probs: list[str] = []
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        probs.extend(f"exit #{i}: {p}" for p in mismatches(g, w, maxphyaddr=maxphyaddr))
    if len(got) != len(want):
        probs.append(f"{len(got)} exits where the guest's access{'es' * (len(want) != 1)} need {len(want)}")
    listing = ["  expected:"]
    listing += [f"    #{i} {w.describe()}" for i, w in enumerate(want)] or ["    (no exit)"]
    listing.append("  got:")
    listing += [f"    #{i} {describe_report(g)}" for i, g in enumerate(got)] or ["    (no exit)"]
    return MmioVerdict("MMIO exits", tuple(probs),
                       {"exits": len(got), "accesses": len(want)}, tuple(listing))


# ---- where the matrix puts its accesses ----------------------------------------------------------
def matrix_gpas(maxphyaddr: int) -> list[int]:
    """Access GPAs of the matrix: 8 bytes below 4 GiB, at 4 GiB, 2^36, 2^40 (those below the last
    page), the last page below MAXPHYADDR and its last 8 bytes. Each leaves room for an 8-byte
    access inside its page."""
    top = 1 << maxphyaddr
    fixed = [g for g in (0xFFFF_FFF8, 1 << 32, 1 << 36, 1 << 40) if g < top - PAGE]  # MAXPHYADDR 36/39
    return [*fixed, top - PAGE, top - 8]


def straddle_pairs(maxphyaddr: int) -> list[tuple[int, int]]:
    """(first page, second page) GPAs whose boundary a straddling access crosses: 4 GiB, 2^36,
    2^40 and the last page below MAXPHYADDR."""
    top = 1 << maxphyaddr
    fixed = [(b - PAGE, b) for b in (1 << 32, 1 << 36, 1 << 40) if b < top - PAGE]
    return [*fixed, (top - 2 * PAGE, top - PAGE)]


# ---- a device model ------------------------------------------------------------------------------
def pattern_byte(addr: int) -> int:
    """A byte that depends on every bit of the 64-bit address (splitmix64 finaliser): a read
    answered for a truncated address carries different bytes, so the guest's check fails too."""
    z = (addr + 0x9E37_79B9_7F4A_7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & U64
    return (z ^ (z >> 31)) & 0xFF


def pattern(gpa: int, n: int) -> bytes:
    """pattern_byte of gpa .. gpa+n-1 (computed in C: a page of it per case was 13 ms in Python)."""
    if n <= 0:
        return b""
    buf = ffi.new("uint8_t[]", n)
    lib.kh_pattern_bytes(gpa & U64, buf, n)
    return ffi.buffer(buf)[:]


def pattern_value(gpa: int, n: int) -> int:
    return int.from_bytes(pattern(gpa, n), "little")


@dataclass
class MmioDevice:
    """An on_exit handler (vcpu.run_until_ucall(on_exit=dev)): logs every MMIO exit and answers a
    read with `reader(phys_addr, len)` (default: pattern bytes of the *reported* address)."""

    reader: Callable[[int, int], bytes] = pattern
    log: list[Any] = field(default_factory=list)

    def __call__(self, vcpu: Any, ex: Any) -> bool:
        from harness.kvm.exits import Mmio

        if type(ex) is not Mmio:
            return False
        self.log.append(ex)
        if not ex.is_write:
            vcpu.complete_mmio(self.reader(ex.phys_addr, ex.len))
        return True

    def take(self) -> list[Any]:
        out = list(self.log)
        self.log.clear()
        return out


def split_access(gpas: Iterable[tuple[int, int]], is_write: bool, data: bytes | None = None) -> list[Access]:
    """The exits of one access split into (gpa, len) fragments (page straddles): data is cut
    along the fragments."""
    out = []
    off = 0
    for gpa, n in gpas:
        frag = None if data is None else data[off:off + n]
        out.append(Access(gpa, n, is_write, frag if is_write else None))
        off += n
    return out
