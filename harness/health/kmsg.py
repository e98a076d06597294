"""Kernel log health: read /dev/kmsg and recognise kernel splats (WARN, BUG, Oops, KASAN, ...).

/dev/kmsg hands out one record per read(): ``pri,seq,ts_usec,flags[,more];text`` followed by
optional continuation lines `` KEY=value`` (SUBSYSTEM=, DEVICE=). pri = facility*8 + level.
Non-printable bytes (and the backslash) in text and values are escaped as ``\\xNN``.

Matching is per record, anchored at the start of the (unescaped) message: the kernel prints every
splat header at the start of its own record, so "comm=\"warning\"" or "ACPI Warning:" never match,
and neither do the "------------[ cut here ]------------", "Call Trace:", " <TASK>", "RIP:", "Code:"
lines around a splat. find_splats() then folds the follow-on header of one event into its first
header (see there), so each event counts once.

Messages written to /dev/kmsg from user space get facility 1 (LOG_USER) from the kernel itself,
whatever "<N>" prefix was written, which is why find_splats() ignores them by default: anything
can write "WARNING: CPU: ..." there.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from harness.health.procfs import read_text

FACILITY_KERNEL = 0
FACILITY_USER = 1

_ESCAPE_RE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _unescape(text: str) -> str:
    raw = _ESCAPE_RE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class KmsgRecord:
    level: int
    facility: int
    seq: int
    ts_usec: int
    text: str  # unescaped; may contain "\n" when the kernel logged an embedded newline
    continuation: tuple[str, ...] = ()  # "KEY=value" (unescaped, leading space dropped)
    flags: str = "-"
    caller: str | None = None  # "T123" / "C1" with CONFIG_PRINTK_CALLER

    @property
    def is_kernel(self) -> bool:
        return self.facility == FACILITY_KERNEL

    @property
    def fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for c in self.continuation:
            key, _, value = c.partition("=")
            out[key] = value
        return out


def parse_kmsg_record(raw: str) -> KmsgRecord:
    """Parse one /dev/kmsg record (as returned by one read(), continuation lines included)."""
    head, sep, rest = raw.partition(";")
    if not sep:
        raise ValueError(f"not a kmsg record (no ';'): {raw[:80]!r}")
    parts = head.split(",")
    if len(parts) < 4:
        raise ValueError(f"kmsg record prefix needs pri,seq,ts,flags: {head!r}")
    try:
        pri, seq, ts = (int(p) for p in parts[:3])
    except ValueError:
        raise ValueError(f"bad numbers in kmsg record prefix: {head!r}") from None
    if pri < 0 or seq < 0 or ts < 0:
        raise ValueError(f"negative field in kmsg record prefix: {head!r}")
    caller = next((p[7:] for p in parts[4:] if p.startswith("caller=")), None)

    lines = rest.removesuffix("\n").split("\n")
    cont = []
    for ln in lines[1:]:
        if not ln.startswith(" "):
            raise ValueError(f"kmsg continuation line without leading space: {ln!r}")
        cont.append(_unescape(ln[1:]))
    return KmsgRecord(
        level=pri & 7,
        facility=pri >> 3,
        seq=seq,
        ts_usec=ts,
        text=_unescape(lines[0]),
        continuation=tuple(cont),
        flags=parts[3],
        caller=caller,
    )


def parse_kmsg_dump(text: str) -> list[KmsgRecord]:
    """Parse saved /dev/kmsg output (records back to back): a line starting with a space belongs
    to the record before it, every other non-empty line starts a record."""
    chunks: list[str] = []
    for ln in text.splitlines():
        if ln.startswith(" ") and chunks:
            chunks[-1] += "\n" + ln
        elif ln.strip():
            chunks.append(ln)
    return [parse_kmsg_record(c) for c in chunks]


# Splat kinds. Order matters: the first pattern that matches wins, so specific BUG:/WARNING:
# headers come before the generic ones.
WARNING = "WARNING"
BUG = "BUG"
OOPS = "Oops"
GPF = "GPF"
KASAN = "KASAN"
KFENCE = "KFENCE"
KCSAN = "KCSAN"
KMSAN = "KMSAN"
UBSAN = "UBSAN"
LOCKDEP = "lockdep"
RCU_STALL = "RCU stall"
HUNG_TASK = "hung task"
SOFT_LOCKUP = "soft lockup"
HARD_LOCKUP = "hard lockup"
REFCOUNT = "refcount"
LIST_CORRUPTION = "list corruption"
SLAB = "slab corruption"
KMEMLEAK = "kmemleak"
PANIC = "panic"

_PATTERNS: list[tuple[str, str]] = [
    (KASAN, r"BUG: KASAN: "),
    (KFENCE, r"BUG: KFENCE: "),
    (KCSAN, r"BUG: KCSAN: "),
    (KMSAN, r"BUG: KMSAN: "),
    (UBSAN, r"UBSAN: \S"),
    # lockdep's own reports (kernel/locking/lockdep.c), incl. RCU-lockdep.
    (LOCKDEP, r"WARNING: (possible circular locking dependency|possible recursive locking"
              r"|inconsistent lock state|possible irq lock inversion dependency"
              r"|\S+-safe -> \S+-unsafe lock order|suspicious RCU usage|bad unlock balance"
              r"|held lock freed|lock held when returning to user space|Nested lock was not taken"
              r"|lock held at task exit time|bad contention detected|circular locking deadlock)"),
    (SOFT_LOCKUP, r"(watchdog: )?BUG: soft lockup"),
    (HARD_LOCKUP, r"(\S+ )?(watchdog: )?Watchdog detected hard LOCKUP"),
    # "CPU: n PID: n at ...", the newer "file:line at func, CPU#n: comm/pid" layout, and the
    # old "at file:line func" / "at func+0x../0x.." (a bare "WARNING: at least ..." is no WARN).
    (WARNING, r"WARNING: (CPU: \d+ PID: \d+ at |\S+:\d+ at .+, CPU#\d+: "
              r"|at (\S+:\d+ |\S+\+0x[0-9a-f]+/0x[0-9a-f]+))"),
    (GPF, r"(Oops: )?general protection fault\b"),
    (OOPS, r"Oops: |Internal error: Oops|[a-z][a-z ]+: [0-9a-f]{4} \[#\d+\]"),
    (BUG, r"BUG: |kernel BUG at |kernel tried to execute NX-protected page"
          r"|unable to execute userspace code \(SMEP"),
    # SLUB debug: "BUG kmalloc-64 (Not tainted): Redzone overwritten", "(Tainted: G  W  ): ...".
    (SLAB, r"BUG \S+ \((Not tainted|Tainted: [^)]*)\): "),
    (RCU_STALL, r"(rcu: )?INFO: rcu_\w+ (self-)?detected (expedited )?stall"),
    (HUNG_TASK, r"INFO: task \S.* blocked for more than \d+ seconds"),
    (REFCOUNT, r"refcount_t: \S"),
    (LIST_CORRUPTION, r"list_(add|del) (corruption|double add)"),
    (KMEMLEAK, r"kmemleak: \d+ new suspected memory leaks"),
    (PANIC, r"Kernel panic - not syncing"),
]

KINDS: tuple[str, ...] = tuple(dict.fromkeys(kind for kind, _ in _PATTERNS))

# Headers after which x86 die()s: the same event then prints a page-fault BUG line (after NX/SMEP)
# and/or the die line "Oops: 0000 [#1] ..." / "Oops: invalid opcode: 0000 [#1]" (older kernels:
# no "Oops: " prefix). find_splats folds those follow-on headers into the first one.
_DIES_AFTER = re.compile(r"BUG: (kernel NULL pointer dereference|unable to handle|(TASK )?stack guard page)"
                         r"|kernel BUG at |kernel tried to execute NX-protected page"
                         r"|unable to execute userspace code")
_FOLLOW_ON = re.compile(r"Oops: (?!general protection)|[a-z][a-z ]+: [0-9a-f]{4} \[#\d+\]"
                        r"|BUG: unable to handle (page fault|kernel paging request)")
_FOLD_WINDOW = 12  # records from one header to the next of the same event (#PF:, PGD ... lines)


class SplatMatcher:
    """Recognises the first line of a kernel splat. ``extra`` patterns (kind, regex matched at the
    start of a line) are tried before the built-in ones."""

    def __init__(self, extra: Iterable[tuple[str, str]] = ()) -> None:
        self.patterns: list[tuple[str, re.Pattern[str]]] = [
            (kind, re.compile(rx)) for kind, rx in [*extra, *_PATTERNS]
        ]

    def match_line(self, line: str) -> str | None:
        for kind, rx in self.patterns:
            if rx.match(line):
                return kind
        return None

    def match(self, rec: KmsgRecord) -> str | None:
        # Each line of a record with embedded newlines can carry its own header.
        for line in rec.text.split("\n"):
            kind = self.match_line(line)
            if kind is not None:
                return kind
        return None


_DEFAULT_MATCHER = SplatMatcher()


def find_splats(
    records: Iterable[KmsgRecord], *, kernel_only: bool = True, matcher: SplatMatcher | None = None
) -> list[tuple[str, KmsgRecord]]:
    """(kind, header record) for every splat, in log order.

    One event counts once: a follow-on header (the "Oops: ... [#N]" die line, or "BUG: unable to
    handle page fault" after "kernel tried to execute NX-protected page") within a few records
    after a header that leads to die() is folded into it. So a NULL dereference is one ("BUG",
    record of "BUG: kernel NULL pointer dereference"), not BUG + Oops, and "kernel BUG at" plus
    "Oops: invalid opcode" is one BUG; a die line with no such header before it (a GPF, arm64
    "Internal error: Oops") is reported itself. Other headers always count, even back to back.

    kernel_only: only facility 0; user-space writes to /dev/kmsg (facility 1+) are ignored.
    """
    m = matcher or _DEFAULT_MATCHER
    out: list[tuple[str, KmsgRecord]] = []
    event_seq: int | None = None  # seq of the latest header of an event that is about to die()
    for rec in records:
        if kernel_only and not rec.is_kernel:
            continue
        kind = m.match(rec)
        if kind is None:
            continue
        lines = rec.text.split("\n")
        if (
            kind in (BUG, OOPS)
            and event_seq is not None
            and 0 < rec.seq - event_seq <= _FOLD_WINDOW
            and any(_FOLLOW_ON.match(ln) for ln in lines)
        ):
            event_seq = rec.seq
            continue
        event_seq = rec.seq if any(_DIES_AFTER.match(ln) for ln in lines) else None
        out.append((kind, rec))
    return out


class KmsgReader:
    """Non-blocking reader of new /dev/kmsg records (those logged after construction).

    If the log cannot be opened (no CAP_SYSLOG under dmesg_restrict, no /dev/kmsg in a
    container), ``available`` is False, ``reason`` says why, and drain() returns [].
    ``lost`` counts EPIPE events: the ring buffer overwrote records before we read them.
    """

    READ_SIZE = 1 << 16  # read() fails with EINVAL if one record does not fit

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self.available = False
        self.reason = ""
        self.lost = 0
        self.errors: list[str] = []  # unparsable records (should not happen), kept for reports
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:  # PermissionError, FileNotFoundError, ...
            self.reason = f"cannot open {path}: {e.strerror or e}"
            return
        try:
            # Start after the newest record: only what happens from now on is ours to judge.
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:
            self.close()
            self.reason = f"cannot seek {path}: {e.strerror or e}"
            return
        self.available = True

    def drain(self) -> list[KmsgRecord]:
        """Every record logged since the last drain (or construction); never blocks."""
        if self._fd is None:
            return []
        out: list[KmsgRecord] = []
        while True:
            try:
                data = os.read(self._fd, self.READ_SIZE)
            except BlockingIOError:
                break
            except BrokenPipeError:
                # Records were overwritten; the next read continues at the oldest one left.
                self.lost += 1
                continue
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EINVAL:
                    self.errors.append(f"read: {e}")
                    break
                raise
            if not data:
                break
            raw = data.decode("utf-8", "surrogateescape")
            try:
                out.append(parse_kmsg_record(raw))
            except ValueError as e:
                self.errors.append(str(e))
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> KmsgReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TAINTED_PATH = "/proc/sys/kernel/tainted"

# Bit -> letter, Documentation/admin-guide/tainted-kernels.rst.
TAINT_LETTERS = "PFSRMBUDAWCIOELKXTNJ"


def read_tainted(path: str = TAINTED_PATH) -> int:
    """The kernel taint mask; compare before/after a test (W = bit 9 after a WARN, D = bit 7 after
    an Oops, B = bit 5 bad page, L = bit 14 soft lockup)."""
    return int(read_text(path).strip())


def taint_letters(mask: int) -> str:
    """Letters for the set bits, e.g. 0x200 -> "W"; bits the table does not know show as "?"."""
    out = [TAINT_LETTERS[b] if b < len(TAINT_LETTERS) else "?" for b in range(mask.bit_length())
           if mask >> b & 1]
    return "".join(out)
