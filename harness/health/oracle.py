"""The kernel-health oracle: did the kernel log a splat, or change its taint, while a case ran?

One `KmsgOracle` per test process holds a /dev/kmsg reader positioned at the end of the log. Each
case gets a `Window`: opened when its setup starts (records logged before are not its business),
checked after the test body and again after its teardown. Only records that the matcher calls a
splat count (WARNING, BUG, Oops, GPF, KASAN, UBSAN, lockdep, RCU stall, hung task, ...), and only
kernel records (facility 0) unless the case says it accepts user-space ones: anything can write
"WARNING: CPU: ..." into /dev/kmsg.

The kernel log is machine-wide. Under pytest-xdist every worker reads every record, so a record
fails every case whose window holds it, in every worker; the message says it cannot be pinned.
Cases expected to splat (a known issue in force names them with a `kmsg` pattern) run alone
(exclusive.py), so their records are pinned to them: a known splat in their window is judged as
their xfail, and the same splat in any other window fails that case like any other splat (some case
that the issue does not name triggered it). One rule everywhere: the autouse per-case check, a
case's own mid-body check and the race engine all judge through the case's `CaseHealth` (case.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from harness import known_issues
from harness.health.kmsg import (
    KmsgReader,
    KmsgRecord,
    SplatMatcher,
    find_splats,
    read_tainted,
    taint_letters,
)

MODES = ("off", "warn", "fail")
TAINT_WARN = 1 << 9  # "W": a WARN fired
QUOTE_RECORDS = 24  # lines quoted per splat: the header and what follows it (stack, registers)


def format_record(rec: KmsgRecord) -> str:
    who = "" if rec.is_kernel else f" (user-space record, facility {rec.facility})"
    sec, usec = divmod(rec.ts_usec, 1_000_000)
    lines = rec.text.split("\n")
    out = [f"[{sec:5d}.{usec:06d}] {lines[0]}{who}"]
    out += [f"               {ln}" for ln in lines[1:]]
    return "\n".join(out)


@dataclass(frozen=True)
class KnownSplat:
    """A splat a known kernel issue in force explains: `kmsg = "regex"` in its known-issues.toml
    entry (searched in the header record's text)."""

    issue: str
    pattern: re.Pattern[str]
    cases: tuple[str, ...]  # node-id patterns of the issue, * and ? wildcards

    def names(self, nodeid: str) -> bool:
        return known_issues.case_matches(self.cases, nodeid)


def known_splats(in_force_ids: set[str], path: Path) -> list[KnownSplat]:
    """The `kmsg` patterns of the known issues in force (entries without one contribute nothing)."""
    try:
        issues = known_issues.load(path)
    except (OSError, ValueError):
        return []
    return [KnownSplat(ki.id, re.compile(ki.kmsg), ki.cases) for ki in issues
            if ki.id in in_force_ids and ki.kmsg]


@dataclass
class Window:
    """The records and taint of one case, from its setup to its teardown."""

    nodeid: str
    accept_user: bool
    taint_start: int | None
    records: list[KmsgRecord] = field(default_factory=list)
    reported: set[int] = field(default_factory=set)  # seqs of headers already failed on
    taint_seen: int | None = None  # taint at the last check
    lost: int = 0
    exclusive: bool = False  # the case held the kernel log alone (exclusive.py): records are its own

    def __post_init__(self) -> None:
        self.taint_seen = self.taint_start


@dataclass
class Finding:
    """What one check found: new splats (with their context) and/or a taint change."""

    nodeid: str
    splats: list[tuple[str, list[KmsgRecord]]]
    taint: tuple[int, int] | None
    lost: int
    workers: int
    notes: list[str] = field(default_factory=list)
    exclusive: bool = False

    def __bool__(self) -> bool:
        return bool(self.splats or self.taint)

    def summary(self) -> str:
        """One line: kinds and the first header (JUnit property, KTAP)."""
        parts = [f"{k} seq {recs[0].seq}: {recs[0].text.splitlines()[0][:160]}" for k, recs in self.splats]
        if self.taint:
            parts.append(f"taint {self.taint[0]} -> {self.taint[1]}")
        return "; ".join(parts)

    def message(self, phase: str) -> str:
        n = len(self.splats)
        head = []
        if n:
            kinds = ", ".join(dict.fromkeys(k for k, _ in self.splats))
            head.append(f"{n} kernel log splat{'s' if n > 1 else ''} ({kinds})")
        if self.taint:
            a, b = self.taint
            head.append(f"kernel taint changed {a} -> {b} (new flags: {taint_letters(b & ~a) or '?'})")
        lines = [f"kernel health: {' and '.join(head)} during {phase}"]
        if self.nodeid not in phase:
            lines[0] += f" of {self.nodeid}"
        for kind, recs in self.splats:
            lines.append(f"--- {kind} (seq {recs[0].seq}) ---")
            lines.extend(format_record(r) for r in recs)
        lines.extend(self.notes)
        if self.lost:
            lines.append(f"note: the kernel ring buffer overwrote records {self.lost} time(s) before "
                         "they were read; more may have been lost")
        if self.workers > 1 and not self.exclusive:
            lines.append(f"note: {self.workers} pytest-xdist workers ran cases at the same time and the "
                         "kernel log is machine-wide: this record cannot be pinned to one case, so every "
                         "case whose time window holds it fails")
        return "\n".join(lines)


class KmsgOracle:
    """Per-process kernel-log oracle; `mode` is one of MODES."""

    def __init__(self, mode: str = "fail", path: str = "/dev/kmsg", matcher: SplatMatcher | None = None,
                 tainted_path: str | None = None, workers: int = 1, known: list[KnownSplat] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"--kmsg must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.workers = workers  # test processes of this run sharing the kernel log (xdist)
        self.known = known or []
        self.matcher = matcher or SplatMatcher()
        self._tainted_path = tainted_path
        self.reader: KmsgReader | None = None
        self.reason = ""
        self.outside: list[tuple[str, KmsgRecord]] = []  # splats logged between cases
        if mode != "off":
            self.reader = KmsgReader(path)
            if not self.reader.available:
                self.reason = self.reader.reason
                self.reader = None

    @property
    def active(self) -> bool:
        return self.reader is not None

    def _taint(self) -> int | None:
        try:
            return read_tainted() if self._tainted_path is None else read_tainted(self._tainted_path)
        except (OSError, ValueError):
            return None

    def begin(self, nodeid: str, accept_user: bool = False, exclusive: bool = False) -> Window | None:
        """Open a case's window: what was logged before now is not this case's."""
        if self.reader is None:
            return None
        before = self.reader.drain()
        self.outside += [(k, r) for k, r in find_splats(before, matcher=self.matcher)]
        return Window(nodeid, accept_user, self._taint(), exclusive=exclusive)

    def check(self, w: Window | None) -> Finding | None:
        """New splats and taint changes since the window's last check (each reported once)."""
        if w is None or self.reader is None:
            return None
        lost0 = self.reader.lost
        w.records += self.reader.drain()
        w.lost += self.reader.lost - lost0
        found = []
        notes: list[str] = []
        splats = find_splats(w.records, kernel_only=not w.accept_user, matcher=self.matcher)
        headers = {r.seq for _, r in splats}
        for kind, rec in splats:
            if rec.seq in w.reported:
                continue
            w.reported.add(rec.seq)
            ks = next((k for k in self.known if k.pattern.search(rec.text)), None)
            if ks is not None and ks.names(w.nodeid):
                notes.append(f"note: seq {rec.seq} is known kernel issue {ks.issue} (this case is its xfail)")
            elif ks is not None:
                # Its own cases run alone (exclusive.py): this window did not share the log with them.
                notes.append(f"note: seq {rec.seq} matches known kernel issue {ks.issue}, whose cases do "
                             "not name this one: this case (or one beside it) triggers it too")
            found.append((kind, self._context(w, rec, headers)))
        taint = self._taint()
        change = None
        if taint is not None and w.taint_seen is not None and taint != w.taint_seen:
            change = (w.taint_seen, taint)
            if found and not (taint & ~w.taint_seen & ~TAINT_WARN):
                # A W taint that came with a splat is judged with that splat, not on its own.
                notes.append(f"note: taint {change[0]} -> {change[1]} (W) came with the splat above")
        w.taint_seen = taint
        lost, w.lost = w.lost, 0
        return Finding(w.nodeid, found, change, lost, self.workers, notes, w.exclusive)

    @staticmethod
    def _context(w: Window, header: KmsgRecord, headers: set[int]) -> list[KmsgRecord]:
        """The header record and the records after it up to the next splat header (same origin:
        kernel records only, unless the header itself is a user record)."""
        i = w.records.index(header)
        out = [header]
        for r in w.records[i + 1 :]:
            if len(out) >= QUOTE_RECORDS or r.seq in headers:
                break
            if r.is_kernel == header.is_kernel:
                out.append(r)
        return out

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
