"""The generation protocol shared with guests/payloads/race_toucher.c, and the host's oracles.

Pure logic (no KVM): tag encoding, the control-page layout, and the judgements the oracles make,
so tests/test_race_oracles.py can feed them broken inputs.

The host keeps a per-page seqlock in gentab[] (guest memory, boot slot): gentab[p] is odd while the
host changes page p (the disruptor's syscall, then the rewrite of its tag with a new generation g)
and becomes 2 * g only once tag(g, p) is in place, so a generation is published only after its
data. A guest read bracketed by two equal, even gentab[p] loads started after the guest had seen
generation g and must return exactly tag(g, p).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.oracles.verdict import Verdict
from harness.x86 import kvmclock

MAGIC = 0xA5C3
GEN_BITS = 28
PAGE_BITS = 20
GEN_MASK = (1 << GEN_BITS) - 1
PAGE_MASK = (1 << PAGE_BITS) - 1
VIOLATION = 0x5ACE  # GUEST_SYNC(VIOLATION, page | loc << 32, seen, gentab[page], gva, ctrl seq)
MAX_VCPUS = 16

# struct race_ctrl (u64 offsets in bytes)
CTRL_SEQ, CTRL_STOP, CTRL_LOC, CTRL_BASE0, CTRL_BASE1 = 0, 8, 16, 24, 32
CTRL_NPAGES, CTRL_STRIDE, CTRL_WMASK, CTRL_NVCPUS, CTRL_GENTAB = 40, 48, 56, 64, 72
CTRL_VCPU0, VCPU_SIZE = 128, 64
# struct race_vcpu fields (u64 index within the 64-byte record)
VCPU_FIELDS = ("sweeps", "judged", "influx", "writes", "violations", "last_seq", "pages")


def tag(gen: int, page: int) -> int:
    """The word generation `gen` puts at the start of page `page` (RACE_TAG in the guest)."""
    return (MAGIC << 48) | ((gen & GEN_MASK) << PAGE_BITS) | (page & PAGE_MASK)


def tag_base(gen: int) -> int:
    """tag(gen, 0): tags of one generation are tag_base(gen) + page (pages < 2^20)."""
    return (MAGIC << 48) | ((gen & GEN_MASK) << PAGE_BITS)


def writer_token(vcpu: int, sweep: int) -> int:
    """What a writer vCPU stores in its own word of each page during sweep `sweep` (0-based)."""
    return (vcpu << 56) | ((sweep + 1) & ((1 << 56) - 1))


@dataclass(frozen=True)
class TagInfo:
    magic_ok: bool
    gen: int
    page: int

    @classmethod
    def decode(cls, v: int) -> TagInfo:
        return cls(v >> 48 == MAGIC, (v >> PAGE_BITS) & GEN_MASK, v & PAGE_MASK)


def gen_before(a: int, b: int) -> bool:
    """a is an older generation than b, modulo the 28-bit wrap (soaks never get near it)."""
    d = (b - a) & GEN_MASK
    return 0 < d < (1 << (GEN_BITS - 1))


MMIO_POISON = 0x6D6D696F_DEADF00D  # the host's answer to an MMIO read exit ("mmio")


def classify(seen: int, expected_gen: int, page: int) -> str:
    """Why `seen` is not tag(expected_gen, page): the words a failure message leads with."""
    if seen == MMIO_POISON:
        return "an MMIO exit's answer (KVM found no usable memory at that GPA while it was published)"
    if seen == 0:
        return "zero (a freed, never-written or fresh page: the old generation's data is gone)"
    t = TagInfo.decode(seen)
    if not t.magic_ok:
        return "foreign data (not a tag: leftovers of a page the kernel reused, or an MMIO answer)"
    if t.page != page & PAGE_MASK:
        return f"the tag of page {t.page} (a translation to the wrong page)"
    if t.gen == expected_gen & GEN_MASK:
        return "the expected tag"
    if gen_before(t.gen, expected_gen):
        return f"stale: generation {t.gen}, {(expected_gen - t.gen) & GEN_MASK} older than published"
    return f"newer generation {t.gen} than published (a host protocol error, not the kernel's)"


@dataclass(frozen=True)
class Violation:
    """One guest read that broke the generation protocol, located for the failure message."""

    vcpu: int
    page: int
    seen: int
    seq: int  # gentab[page] as the guest read it on both sides of the load (2 * generation)
    ops: int  # host operations started when the guest reported (ctrl->seq)
    gva: int
    gpa: int
    hva: int
    loc: int = 0
    host_now: int | None = None  # the tag the host mapping held after the race (filled in later)

    @property
    def expected_gen(self) -> int:
        return self.seq >> 1

    @property
    def expected(self) -> int:
        return tag(self.expected_gen, self.page)

    @property
    def seen_gen(self) -> int | None:
        t = TagInfo.decode(self.seen)
        return t.gen if t.magic_ok else None

    @property
    def what(self) -> str:
        return classify(self.seen, self.expected_gen, self.page)

    def describe(self) -> str:
        sg = self.seen_gen
        s = (f"vcpu {self.vcpu} read page {self.page} at GPA {self.gpa:#x} (hva {self.hva:#x}, "
             f"gva {self.gva:#x}): expected generation {self.expected_gen} ({self.expected:#018x}), "
             f"seen {'generation ' + str(sg) if sg is not None else 'no generation'} "
             f"({self.seen:#018x}): {self.what} [after {self.ops} host ops]")
        if self.host_now is not None:
            s += f"; after the race the host mapping holds {self.host_now:#018x}"
            if self.host_now == self.seen:
                s += " (the same: the backing itself held old data, the host's write went elsewhere)"
            elif TagInfo.decode(self.host_now).magic_ok and TagInfo.decode(self.host_now).page == self.page:
                s += " (a tag of this page: the guest's translation pointed at another page than the host's)"
        return s


def judge(seen: int, g1: int, g2: int, page: int) -> Verdict:
    """The guest's check of one read, on the host (race_toucher.c does the same in the guest's hot
    loop): ok when the read is right or not judged (the page was in flux: g1 odd or g1 != g2, the
    gentab[page] loads before and after it; fact `judged`), else the problem says what is wrong."""
    if g1 & 1 or g1 != g2:
        return Verdict.of("stale", (), judged=False)
    if seen == tag(g1 >> 1, page):
        return Verdict.of("stale", (), judged=True)
    return Verdict.of("stale", [classify(seen, g1 >> 1, page)], judged=True)


@dataclass(frozen=True)
class LandedWrite:
    """A guest write that changed a page the host had made PROT_READ."""

    vcpu: int
    page: int
    gpa: int
    hva: int
    before: int
    after: int

    def describe(self) -> str:
        return (f"vcpu {self.vcpu}'s word in page {self.page} at GPA {self.gpa:#x} (hva {self.hva:#x}) "
                f"changed {self.before:#018x} -> {self.after:#018x} while the host mapping was "
                "PROT_READ (mprotect had returned): a guest write went through a read-only mapping")


def landed_writes(before: dict[int, list[int]], after: dict[int, list[int]], first_page: int,
                  locate: tuple[int, int, int]) -> list[LandedWrite]:
    """Compare per-vCPU word columns taken right after mprotect(PROT_READ) returned (before) with
    those taken just before PROT_READ|PROT_WRITE is restored (after). locate = (gpa, hva, stride)
    of page 0."""
    gpa0, hva0, stride = locate
    out = []
    for vcpu, col in before.items():
        now = after.get(vcpu, col)
        for i, (b, a) in enumerate(zip(col, now, strict=True)):
            if a != b:
                p = first_page + i
                out.append(LandedWrite(vcpu, p, gpa0 + p * stride + 8 * (1 + vcpu),
                                       hva0 + p * stride + 8 * (1 + vcpu), b, a))
    return out


# kvmclock (pvclock) areas: vCPU i's struct pvclock_vcpu_time_info at this offset of the region's
# first page (away from the tag at 0 and the vCPU words at 8..136)
PVCLOCK_OFFSET = 0x800
PVCLOCK_SIZE = kvmclock.PVCLOCK_SIZE


# KVM writes the pvclock when the vCPU next enters its guest (KVM_REQ_CLOCK_UPDATE). Where KVM's
# "exits" counter is observable, a vCPU that has not entered since a KVM_SET_CLOCK (fewer than 2
# exits: an entry lies between two) is waited for up to this many seconds; one that still has not is
# no evidence either way. In a one-CPU TCG guest with five busy threads 0.5 s is no proof of an entry.
CLOCK_ENTRY_WAIT = 5.0


@dataclass(frozen=True)
class ClockMiss:
    """A KVM_SET_CLOCK whose pvclock update never reached the page the host has mapped there."""

    vcpu: int
    set_ns: int
    gpa: int
    hva: int
    version: int
    system_time: int
    waited: float
    entries: int | None = None  # times the vCPU surely entered its guest since the set (None: not observable)

    def describe(self) -> str:
        entered = ("VM entries not observable on this backend" if self.entries is None else
                   f"the vCPU entered its guest at least {self.entries} time(s) since, each after KVM handled "
                   "the clock update request (KVM's exits stat)")
        return (f"vcpu {self.vcpu}'s kvmclock at GPA {self.gpa:#x} (hva {self.hva:#x}): {self.waited * 1e3:.0f} ms "
                f"after KVM_SET_CLOCK({self.set_ns}) the host mapping still holds version {self.version}, "
                f"system_time {self.system_time} (no host operation touched that page meanwhile; {entered}): "
                "KVM's gfn_to_pfn_cache wrote the update somewhere else (a page the host no longer maps)")


def pvclock_fresh(version: int, system_time: int, set_ns: int, step: int) -> bool:
    """The pvclock shows a completed update made after KVM_SET_CLOCK(set_ns): even version and a
    system time in [set_ns, set_ns + step/2) (each SET_CLOCK jumps `step` ns ahead)."""
    return version % 2 == 0 and version != 0 and set_ns <= system_time < set_ns + step // 2
