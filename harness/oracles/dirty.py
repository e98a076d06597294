"""Dirty-tracking and write-back oracles: what KVM reported dirty (or what reached the disk) against
what the guest wrote.

A lost dirty bit is lost data in live migration, so the oracles are strict about missing pages and
say exactly which ones (page numbers and GPAs); extra pages pass only when the caller names them as
allowed (e.g. what KVM_DIRTY_LOG_INITIALLY_SET documents). Each returns a Verdict built from page
numbers and bytes only, so tests/test_dirty_oracles.py can feed them stale or missing data.

    dirty_pages(written, vm.get_dirty_pages(slot), gpa=GPA).check(f"round {rnd}")
    ring_order(order, [o for _, o in ring.harvest()], gpa=GPA).check(f"round {rnd}")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from harness.oracles.verdict import Verdict

PAGE = 0x1000  # the dirty log's granularity (kept here: the oracles need no KVM binding)


def ranges(pages: Iterable[int], limit: int = 12) -> str:
    """`3, 7-9, 12 (+40 more)`: page numbers compressed into runs for messages."""
    ps = sorted(set(pages))
    runs: list[tuple[int, int]] = []
    for p in ps:
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    txt = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        txt += f" (+{sum(b - a + 1 for a, b in runs[limit:])} more pages)"
    return txt or "none"


# ---- the dirty log: exact set -------------------------------------------------------------------
def dirty_pages(written: Iterable[int], reported: Iterable[int], *, allowed_extra: Iterable[int] = (),
                gpa: int = 0, what: str = "dirty log") -> Verdict:
    """The pages KVM reported dirty must be exactly the pages the guest wrote (plus allowed_extra,
    which never excuses a missing page). gpa: GPA of page 0, for messages. Facts: the missing and
    extra pages (sorted) and the sizes of both sets."""
    wrote, got, allowed = frozenset(written), frozenset(reported), frozenset(allowed_extra)
    missing = sorted(wrote - got)
    extra = sorted(got - wrote - allowed)
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(wrote)} pages the guest wrote are NOT reported dirty (lost data "
                        f"in a migration): pages {ranges(missing)}; first at GPA {gpa + missing[0] * PAGE:#x}")
    if extra:
        problems.append(f"{len(extra)} pages reported dirty that the guest did not write: pages {ranges(extra)}; "
                        f"first at GPA {gpa + extra[0] * PAGE:#x}")
    return Verdict.of(what, problems, written=len(wrote), reported=len(got), missing=tuple(missing),
                      extra=tuple(extra))


# ---- the dirty ring: order ----------------------------------------------------------------------
def first_writes(order: Iterable[int]) -> list[int]:
    """The order in which pages were first written (later writes of a page dirty nothing new)."""
    seen: set[int] = set()
    out = []
    for p in order:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def full_exit_repushes(harvested: Sequence[int], resets: Sequence[int]) -> list[int]:
    """Indices in `harvested` of entries that repeat the write a ring-full exit interrupted.

    `resets` are the indices where a KVM_EXIT_DIRTY_RING_FULL's harvest + reset ended (the number
    of entries harvested so far at each such exit). KVM pushes a page when its write fault makes the
    page writable; the push that reaches the soft limit makes the vCPU exit before it re-enters the
    guest, so that write has not happened yet. The reset write-protects the page again, the resumed
    guest retries the write, faults and the page is pushed once more: as the first entry after the
    reset, equal to the last one before it (virt/kvm/dirty_ring.c kvm_dirty_ring_push/check_request;
    at every one of 2898 full exits on 7.3.4 under kvm_amd, docs/triage.md). Only that exact pattern."""
    return [i for i in resets if 0 < i < len(harvested) and harvested[i] == harvested[i - 1]]


def repeats(harvested: Sequence[int]) -> int:
    """Entries beyond the first for each page (a measured fact of the backend, not a loss)."""
    return len(harvested) - len(set(harvested))


def ring_order(written_order: Sequence[int], harvested: Sequence[int], *, gpa: int = 0,
               allow_repeats: bool = True, resets: Sequence[int] = ()) -> Verdict:
    """A dirty ring pushes an entry when a page becomes dirty, so one vCPU's entries for one slot
    come out in the order of its first writes: the pages in order of their first appearance in the
    ring must equal first_writes(written_order) (nothing missing, nothing extra, nothing reordered).

    A page written again while still dirty may be pushed again (api.rst promises no dedup; KVM's
    own writes push each time): with allow_repeats a page may appear up to as many times as the
    guest wrote it, never more. Without, every page must appear exactly once. `resets`: where
    ring-full exits reset the ring; the write each of them interrupted is pushed again right after
    it (full_exit_repushes), which is not a repeat of the guest's.

    Facts: entries (harvested), repeats (entries beyond each page's first, repushes included) and
    repushes (entries full_exit_repushes excused)."""
    want = first_writes(written_order)
    drop = set(full_exit_repushes(harvested, resets))
    got = [p for i, p in enumerate(harvested) if i not in drop]
    out = []
    wrote = Counter(written_order)
    pushed = Counter(got)
    limit = wrote if allow_repeats else Counter(dict.fromkeys(wrote, 1))
    over = sorted(p for p, n in pushed.items() if p in wrote and n > limit[p])
    if over:
        p = over[0]
        out.append(f"pages {ranges(over)} pushed more often than allowed (page {p}: {pushed[p]} "
                   f"entries for {wrote[p]} guest writes{'' if allow_repeats else ', repeats not allowed'})")
    missing = set(want) - set(got)
    extra = set(got) - set(want)
    if missing:
        out.append(f"{len(missing)} written pages never pushed: {ranges(missing)} "
                   f"(first at GPA {gpa + min(missing) * PAGE:#x})")
    if extra:
        out.append(f"{len(extra)} pages pushed that the guest did not write: {ranges(extra)}")
    firsts = first_writes(got)
    if not missing and not extra and firsts != want:
        i = next(i for i, (a, b) in enumerate(zip(firsts, want, strict=True)) if a != b)
        out.append(f"entries out of order from the {i}th new page: ring has pages {firsts[i:i + 5]}, "
                   f"the guest first wrote {want[i:i + 5]}")
    return Verdict.of("dirty ring order", out, entries=len(harvested), repeats=repeats(harvested),
                      repushes=len(drop))


# ---- bytes: the live-migration copy and the disk ----------------------------------------------------
def migration_copy(source: bytes, dest: bytes, *, gpa: int = 0, page: int = PAGE, limit: int = 4) -> Verdict:
    """The live-migration oracle: after the final round, the copy built only from pages reported
    dirty must equal the source. Each differing page is one whose dirty bit was lost; the first
    `limit` of them are shown word by word. Facts: pages compared, pages differing."""
    if len(source) != len(dest):
        return Verdict.of("live-migration copy", [f"source has {len(source):#x} bytes, copy {len(dest):#x}"])
    bad = [i // page for i in range(0, len(source), page) if source[i:i + page] != dest[i:i + page]]
    problems = []
    if bad:
        lines = [f"{len(bad)} pages differ between guest memory and the copy made from the dirty reports "
                 f"(their writes were never reported): pages {ranges(bad)}"]
        for p in bad[:limit]:
            o = p * page
            s, d = source[o:o + page], dest[o:o + page]
            w = next(i for i in range(0, page, 8) if s[i:i + 8] != d[i:i + 8])
            has, copied = int.from_bytes(s[w:w + 8], "little"), int.from_bytes(d[w:w + 8], "little")
            lines.append(f"    page {p} (GPA {gpa + o:#x}) +{w:#x}: guest has {has:#x}, copy has {copied:#x}")
        problems.append("\n".join(lines))  # one problem: the lost pages, with the first few shown
    return Verdict.of("live-migration copy", problems, pages=len(source) // page, differing=len(bad))


def disk_contents(disk: bytes, expected: bytes, *, not_on_disk: Sequence[tuple[int, int]] = (),
                  gpa: int = 0, page: int = PAGE, what: str = "disk contents") -> Verdict:
    """The write-back oracle: the file's bytes as the disk holds them (after a sync) must equal what
    the guest wrote. Pages that differ, and ranges with no written extent at all, are named with
    their file offsets and GPAs (gpa = GPA of file offset 0). `what` names the read (e.g. how the
    disk was read). Facts: pages compared, stale pages, ranges not on disk."""
    out = []
    if not_on_disk:
        out.append("file ranges with no written extent on disk: "
                   + ", ".join(f"{lo:#x}-{hi:#x} (GPA {gpa + lo:#x})" for lo, hi in list(not_on_disk)[:5]))
    if len(disk) != len(expected):
        out.append(f"{len(disk):#x} bytes read, {len(expected):#x} expected")
        return Verdict.of(what, out, not_on_disk=len(not_on_disk))
    stale = [i // page for i in range(0, len(disk), page) if disk[i:i + page] != expected[i:i + page]]
    if stale:
        o = stale[0] * page
        w = next(i for i in range(o, o + page, 8) if disk[i:i + 8] != expected[i:i + 8])
        out.append(f"{len(stale)} of {len(disk) // page} pages on disk are not what the guest wrote "
                   f"(pages {ranges(stale)}); first at file offset {w:#x} (GPA {gpa + w:#x}): disk has "
                   f"{int.from_bytes(disk[w:w + 8], 'little'):#x}, the guest wrote "
                   f"{int.from_bytes(expected[w:w + 8], 'little'):#x}")
    return Verdict.of(what, out, pages=len(disk) // page, stale=len(stale), not_on_disk=len(not_on_disk))
