"""KTAP v1 output (Documentation/dev-tools/ktap.rst in the kernel tree).

Layout of one test, at its nesting depth (two spaces per level):

    <subtest block: "KTAP version 1", "1..M", M results>   (only if it has subtests)
    # <diagnostics ...>
    # <reason lines, when the reason does not fit on the result line>
    ok|not ok N <name>[ # DIRECTIVE[ reason]]

Diagnostic lines go *before* the result line they belong to, as the spec asks. Outcome mapping
(kselftest conventions where they exist, kselftest.h prints "ok N # XFAIL" / "ok N # SKIP"):

    pass     ok N name
    skip     ok N name # SKIP reason
    xfail    ok N name # XFAIL reason
    fail     not ok N name                  (failure text as "# " lines above)
    xpass    not ok N name # XPASS reason   (the suite runs xfail_strict: an unexpected pass is a
                                             failure, a known issue got fixed and its entry is stale)
    timeout  not ok N name # TIMEOUT reason
    error    not ok N name # ERROR reason   (spec spelling; kselftest.h prints "# error")

The top level always gets a plan up front ("1..N" right after the version line): KTAP has no
trailing plan (that is TAP 13), and omitting it is only tolerated when the count is unknown.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TextIO

Outcome = Literal["pass", "fail", "skip", "xfail", "xpass", "error", "timeout"]

OK_OUTCOMES: frozenset[str] = frozenset({"pass", "skip", "xfail"})
NOT_OK_OUTCOMES: frozenset[str] = frozenset({"fail", "xpass", "error", "timeout"})
_DIRECTIVE: dict[str, str] = {
    "skip": "SKIP",
    "xfail": "XFAIL",
    "xpass": "XPASS",
    "timeout": "TIMEOUT",
    "error": "ERROR",
}
VERSION_LINE = "KTAP version 1"
INDENT = "  "


@dataclass
class KtapResult:
    name: str
    outcome: Outcome
    reason: str = ""
    diagnostics: list[str] = field(default_factory=list)
    subtests: list[KtapResult] = field(default_factory=list)


def aggregate_outcome(subtests: Sequence[KtapResult]) -> Outcome:
    """Parent outcome per the spec's bubbling rule: any failing subtest fails the parent; a parent
    whose subtests were all skipped is skipped; otherwise it passed."""
    if any(s.outcome in NOT_OK_OUTCOMES for s in subtests):
        return "fail"
    if subtests and all(s.outcome == "skip" for s in subtests):
        return "skip"
    return "pass"


def sanitize_name(name: str) -> str:
    """A test description for a result line: no '#' (it starts the directive) and no line breaks
    or other control characters; everything else (pytest node ids, "[long64-gpa=0x1000]") stays."""
    out = "".join("_" if ch == "#" or _is_break_or_control(ch) else ch for ch in name).strip()
    if out.startswith("- "):
        # TAP parsers drop an optional "- " before the description; keep ours intact.
        out = "_" + out[1:]
    if not out:
        raise ValueError(f"empty KTAP test name: {name!r}")
    return out


def _is_break_or_control(ch: str) -> bool:
    # Cc covers \n \r \t and friends; Zl/Zp are what str.splitlines() also breaks on.
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def _one_line(text: str) -> str:
    return "".join(" " if _is_break_or_control(ch) else ch for ch in text).strip()


def _escape_controls(line: str) -> str:
    # ANSI colour codes from pytest, stray CRs etc. would garble a KTAP file; show them like
    # /dev/kmsg does (\xNN) instead of passing them through.
    line = line.expandtabs(8)
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" else ch for ch in line)


def _diag_lines(text: str) -> list[str]:
    # "#" alone for blank lines so the output carries no trailing whitespace.
    out = []
    for ln in text.splitlines():
        ln = _escape_controls(ln).rstrip()
        out.append(f"# {ln}" if ln else "#")
    return out


def _check_consistent(result: KtapResult) -> None:
    if result.outcome not in OK_OUTCOMES and result.outcome not in NOT_OK_OUTCOMES:
        raise ValueError(f"unknown outcome {result.outcome!r} for {result.name!r}")
    failing = [s.name for s in result.subtests if s.outcome in NOT_OK_OUTCOMES]
    # A parent that reports success over failing subtests contradicts the spec's bubbling rule;
    # an expected failure (xfail) over failing subtests is consistent.
    if failing and result.outcome in ("pass", "skip"):
        raise ValueError(
            f"{result.name!r} is {result.outcome} but subtests failed: {', '.join(failing)}"
            " (use aggregate_outcome())"
        )


def _result_lines(result: KtapResult, number: int, depth: int) -> list[str]:
    """All lines for one test (its subtest block, diagnostics, result line), indented for depth."""
    _check_consistent(result)
    pad = INDENT * depth
    lines: list[str] = []
    if result.subtests:
        sub = INDENT * (depth + 1)
        lines.append(sub + VERSION_LINE)
        lines.append(f"{sub}1..{len(result.subtests)}")
        for i, st in enumerate(result.subtests, 1):
            lines.extend(_result_lines(st, i, depth + 1))
    for d in result.diagnostics:
        lines.extend(pad + ln for ln in _diag_lines(d))

    name = sanitize_name(result.name)
    status = "ok" if result.outcome in OK_OUTCOMES else "not ok"
    directive = _DIRECTIVE.get(result.outcome)
    reason = result.reason.strip("\n")
    tail = ""
    if directive is None:
        # pass/fail: the whole reason (a failure's text) goes above as diagnostics.
        if reason.strip():
            lines.extend(pad + ln for ln in _diag_lines(reason))
    else:
        first = next((ln for ln in reason.splitlines() if ln.strip()), "")
        tail = f" # {directive}"
        if first:
            tail += " " + _escape_controls(first).strip()
        if len([ln for ln in reason.splitlines() if ln.strip()]) > 1:
            # Only the first line fits on the result line; keep the rest readable above it.
            lines.extend(pad + ln for ln in _diag_lines(reason))
    lines.append(f"{pad}{status} {number} {name}{tail}")
    return lines


class KtapWriter:
    """Streams KTAP to a text stream, one top-level result at a time (flushed after each, so a
    host crash still leaves every finished result on disk).

    ``plan`` is the number of top-level results and is written right after the version line.
    ``plan=None`` omits the plan (the spec tolerates that when the count is unknown) but the
    strict parser in harness/report/ktap_parser.py rejects such output; pass the collected count.
    """

    def __init__(self, stream: TextIO, plan: int | None, *, suite: str | None = None) -> None:
        if plan is not None and plan < 0:
            raise ValueError("negative plan")
        self._out = stream
        self.plan = plan
        self.count = 0
        self.totals: dict[str, int] = {k: 0 for k in ("pass", "fail", "xfail", "xpass", "skip",
                                                      "error", "timeout")}
        self._closed = False
        header = [VERSION_LINE]
        if suite:
            # KUnit puts its "# Subtest:" header between version and plan; same place here.
            header.append(f"# selftests: kvm-harness: {_one_line(suite)}")
        if plan is not None:
            header.append(f"1..{plan}")
        self._emit(header)

    def _emit(self, lines: list[str]) -> None:
        self._out.write("".join(ln + "\n" for ln in lines))
        self._out.flush()

    def diagnostic(self, text: str) -> None:
        """Free-form "# " lines at top level; they read as belonging to the next result."""
        self._check_open()
        self._emit(_diag_lines(text))

    def add(self, result: KtapResult) -> int:
        """Write one top-level result (with its subtests); returns its test number."""
        self._check_open()
        if self.plan is not None and self.count >= self.plan:
            raise ValueError(f"more results than the plan of {self.plan}")
        lines = _result_lines(result, self.count + 1, 0)
        self.count += 1
        self.totals[result.outcome] += 1
        self._emit(lines)
        return self.count

    def close(self, not_run: Sequence[str] = ()) -> int:
        """Finish the stream. Planned results that never arrived (aborted session) are written
        as ``not ok N <name> # ERROR not run`` so the output stays valid and shows the failure;
        names come from ``not_run`` in order, else ``unreported_N``. Ends with a kselftest-style
        "# Totals:" line. Returns how many results were padded."""
        if self._closed:
            return 0
        padded = 0
        if self.plan is not None:
            names = list(not_run)
            while self.count < self.plan:
                name = names.pop(0) if names else f"unreported_{self.count + 1}"
                self.add(KtapResult(name, "error", "not run"))
                padded += 1
        t = self.totals
        self._emit([
            f"# Totals: pass:{t['pass']} fail:{t['fail']} xfail:{t['xfail']} xpass:{t['xpass']}"
            f" skip:{t['skip']} error:{t['error']} timeout:{t['timeout']}"
        ])
        self._closed = True
        return padded

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("KtapWriter is closed")

    def __enter__(self) -> KtapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def render_ktap(results: Sequence[KtapResult], *, suite: str | None = None) -> str:
    """The whole KTAP document for a finished result list."""
    buf = io.StringIO()
    with KtapWriter(buf, len(results), suite=suite) as w:
        for r in results:
            w.add(r)
    return buf.getvalue()
