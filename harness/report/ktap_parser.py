"""A strict KTAP v1 parser, written from Documentation/dev-tools/ktap.rst and independently of
harness/report/ktap.py, so tests can validate the writer (and later the whole suite's output).

Two conformance levels:

``"harness"`` (default) -- what kvm-harness must emit; everything not listed is an error:
    * the first line is exactly "KTAP version 1"; every subtest block starts with one too;
    * diagnostic lines ("#" or "# text") may sit between version and plan;
    * a plan "1..N" must follow the version line (a trailing TAP13-style plan is rejected);
    * result lines: "ok|not ok N description[ # DIRECTIVE[ reason]]", N counting from 1, a
      non-empty description without '#', and if '#' is present the first word after it must be
      one of SKIP TODO XFAIL TIMEOUT ERROR XPASS (exact case);
    * SKIP/XFAIL only on "ok"; TIMEOUT/ERROR/XPASS only on "not ok";
    * a parent reporting plain "ok" (or SKIP) over a failing subtest is rejected (bubbling rule);
    * no unknown lines, no blank lines, no trailing whitespace, no control characters (tab, CR,
      ESC...), a final newline, indentation exactly two spaces per level.

``"spec"`` -- only what the spec itself forbids; it additionally accepts what the spec permits:
unknown lines anywhere (kept in ``unknown``, they do not affect results), "TAP version 13/14",
a missing plan, "not ok # SKIP", TIMEOUT/ERROR on "ok" (spec says "should"), data after '#' that
is not a directive, directives in any case, an empty description, and an optional "- " before it.

Violations raise ``KtapParseError(line_no, message)`` with a 1-based line number.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

DIRECTIVES = ("SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR", "XPASS")
_OK_ONLY = {"SKIP", "XFAIL"}
_NOT_OK_ONLY = {"TIMEOUT", "ERROR", "XPASS"}

Conformance = Literal["harness", "spec"]

_VERSION_RE = re.compile(r"(KTAP version 1|TAP version 13|TAP version 14)")
_PLAN_RE = re.compile(r"1\.\.(0|[1-9][0-9]*)")
_PLAN_SPEC_RE = re.compile(r"1\.\.(\d+)(?: # .*)?")
_RESULT_RE = re.compile(r"(ok|not ok) ([0-9]+)(?P<rest> .*)?")


class KtapParseError(Exception):
    def __init__(self, line_no: int, message: str) -> None:
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no
        self.message = message


@dataclass
class ParsedTest:
    number: int
    ok: bool
    description: str
    directive: str | None  # upper-cased
    reason: str  # text after the directive (or all data after '#' when there is no directive)
    diagnostics: list[str]  # "#"-lines directly before the result line (text after "# ")
    subtests: ParsedBlock | None
    line_no: int

    @property
    def failed(self) -> bool:
        """A failure by the bubbling rule: "not ok" that is not a SKIP or TODO."""
        return not self.ok and self.directive not in ("SKIP", "TODO")


@dataclass
class ParsedBlock:
    version: str
    plan: int | None
    tests: list[ParsedTest] = field(default_factory=list)
    header_diagnostics: list[str] = field(default_factory=list)  # between version and plan
    trailing_diagnostics: list[str] = field(default_factory=list)  # after the last result
    unknown: list[tuple[int, str]] = field(default_factory=list)  # spec mode only


@dataclass
class _Line:
    no: int
    raw: str
    indent: int  # in spaces
    body: str
    kind: str  # version | plan | result | diag | unknown


def _classify(no: int, raw: str, mode: Conformance) -> _Line:
    body = raw.lstrip(" ")
    indent = len(raw) - len(body)
    if mode == "harness":
        bad = next((ch for ch in raw if unicodedata.category(ch) in ("Cc", "Zl", "Zp")), None)
        if bad is not None:
            raise KtapParseError(no, f"control character {bad!r} in line")
        if raw != raw.rstrip():
            raise KtapParseError(no, "trailing whitespace")
        if not body:
            raise KtapParseError(no, "blank line")
    if _VERSION_RE.fullmatch(body):
        kind = "version"
    elif (_PLAN_RE if mode == "harness" else _PLAN_SPEC_RE).fullmatch(body):
        kind = "plan"
    elif _RESULT_RE.fullmatch(body):
        kind = "result"
    elif body == "#" or body.startswith("# "):
        kind = "diag"
    else:
        kind = "unknown"
    if kind == "unknown" and mode == "harness":
        raise KtapParseError(no, f"not a KTAP line: {raw!r}")
    if kind != "unknown" and indent % 2:
        if mode == "harness":
            raise KtapParseError(no, f"bad indentation ({indent} spaces)")
        kind = "unknown"  # spec mode: mis-indented lines can only be unknown lines
    return _Line(no, raw, indent, body, kind)


class _Parser:
    def __init__(self, text: str, mode: Conformance) -> None:
        if mode not in ("harness", "spec"):
            raise ValueError(f"unknown conformance {mode!r}")
        self.mode = mode
        raw_lines = text.split("\n")
        if raw_lines and raw_lines[-1] == "":
            raw_lines.pop()  # the final newline
        elif mode == "harness" and text:
            raise KtapParseError(len(raw_lines), "missing final newline")
        self.lines = [_classify(i, ln, mode) for i, ln in enumerate(raw_lines, 1)]
        self.pos = 0
        self.unknown: list[tuple[int, str]] = []

    def peek(self) -> _Line | None:
        # Unknown lines are skipped wherever they appear (spec mode only; harness mode raised).
        while self.pos < len(self.lines) and self.lines[self.pos].kind == "unknown":
            ln = self.lines[self.pos]
            self.unknown.append((ln.no, ln.raw))
            self.pos += 1
        return self.lines[self.pos] if self.pos < len(self.lines) else None

    def take(self) -> _Line:
        ln = self.peek()
        assert ln is not None
        self.pos += 1
        return ln

    def parse(self) -> ParsedBlock:
        first = self.peek()
        if first is None:
            raise KtapParseError(1, "empty input: missing version line")
        # Diagnostics before the top-level version line are not allowed: results *begin* with it.
        if first.kind != "version":
            raise KtapParseError(first.no, "missing version line")
        if first.indent:
            raise KtapParseError(first.no, "top-level version line is indented")
        block = self.block(0)
        rest = self.peek()
        if rest is not None:
            raise KtapParseError(rest.no, f"line after the end of the top-level block: {rest.raw!r}")
        block.unknown = self.unknown
        return block

    def block(self, depth: int) -> ParsedBlock:
        """Parse one block whose version line is the next line, at indentation 2*depth."""
        want = 2 * depth
        ver = self.take()
        if self.mode == "harness" and ver.body != "KTAP version 1":
            raise KtapParseError(ver.no, f"expected 'KTAP version 1', got {ver.body!r}")
        block = ParsedBlock(version=ver.body, plan=None)

        # Header: diagnostics, then the plan.
        while (ln := self.peek()) is not None and ln.indent == want and ln.kind == "diag":
            block.header_diagnostics.append(_diag_text(self.take().body))
        ln = self.peek()
        if ln is not None and ln.indent == want and ln.kind == "plan":
            block.plan = int(self.take().body[3:].partition(" ")[0])
        elif self.mode == "harness":
            raise KtapParseError(ln.no if ln else ver.no, "missing plan line after version line")

        pending_diags: list[str] = []
        pending_sub: ParsedBlock | None = None
        sub_line = 0
        while (ln := self.peek()) is not None:
            if ln.indent < want:
                break  # end of this nested block; the parent handles the line
            if ln.indent > want:
                if ln.indent == want + 2 and ln.kind == "version":
                    if pending_sub is not None:
                        raise KtapParseError(ln.no, "second subtest block without a result line")
                    sub_line = ln.no
                    pending_sub = self.block(depth + 1)
                    continue
                if self.mode == "spec" and ln.kind == "diag":
                    # Not a diagnostic at this level, so it can only be an unknown line.
                    self.unknown.append((ln.no, ln.raw))
                    self.pos += 1
                    continue
                raise KtapParseError(ln.no, f"bad indentation ({ln.indent} spaces, expected {want})")
            self.take()
            if ln.kind == "diag":
                pending_diags.append(_diag_text(ln.body))
            elif ln.kind == "version":
                raise KtapParseError(ln.no, "duplicate version line")
            elif ln.kind == "plan":
                what = "duplicate plan line" if block.plan is not None else "plan not after version line"
                raise KtapParseError(ln.no, what)
            else:
                test = self.result(ln, len(block.tests) + 1, pending_diags, pending_sub)
                block.tests.append(test)
                pending_diags, pending_sub = [], None

        end_no = ln.no if ln is not None else (self.lines[-1].no if self.lines else 0)
        if pending_sub is not None:
            raise KtapParseError(sub_line, "subtest block not followed by its parent's result line")
        block.trailing_diagnostics = pending_diags
        if block.plan is not None and block.plan != len(block.tests):
            raise KtapParseError(
                end_no, f"plan says {block.plan} tests but {len(block.tests)} result lines at depth {depth}"
            )
        return block

    def result(self, ln: _Line, expected: int, diags: list[str], sub: ParsedBlock | None) -> ParsedTest:
        m = _RESULT_RE.fullmatch(ln.body)
        assert m is not None
        ok = m.group(1) == "ok"
        num_s = m.group(2)
        if self.mode == "harness" and num_s != str(int(num_s)):
            raise KtapParseError(ln.no, f"test number with leading zeros: {num_s}")
        if int(num_s) != expected:
            raise KtapParseError(ln.no, f"test number {int(num_s)}, expected {expected}")
        rest = m.group("rest") or ""
        rest = rest[1:]  # the space after the number
        desc_part, hash_, after = rest.partition("#")
        if self.mode == "spec" and desc_part.startswith("- "):
            desc_part = desc_part[2:]
        directive: str | None = None
        reason = ""
        if self.mode == "harness":
            if not hash_:
                desc = desc_part
            else:
                if not desc_part.endswith(" ") or desc_part.endswith("  "):
                    raise KtapParseError(ln.no, "directive separator must be ' # '")
                desc = desc_part[:-1]
                word, _, reason = after.removeprefix(" ").partition(" ")
                if not after.startswith(" ") or word not in DIRECTIVES:
                    raise KtapParseError(ln.no, f"unknown directive {word!r}")
                directive = word
                if reason != reason.strip():
                    raise KtapParseError(ln.no, "extra whitespace around the directive's reason")
            if not desc:
                raise KtapParseError(ln.no, "missing test description")
            if desc.startswith("- "):
                raise KtapParseError(ln.no, "description starts with '- ' (TAP parsers would drop it)")
            if desc != desc.strip():
                raise KtapParseError(ln.no, "description with surrounding whitespace")
        else:
            desc = desc_part.strip()
            if hash_:
                word, _, more = after.strip().partition(" ")
                if word.upper() in DIRECTIVES:
                    directive, reason = word.upper(), more.strip()
                else:
                    reason = after.strip()  # plain diagnostic data, e.g. "# rcode=0"

        if directive is not None and self.mode == "harness":
            if directive in _OK_ONLY and not ok:
                raise KtapParseError(ln.no, f"{directive} on a 'not ok' result")
            if directive in _NOT_OK_ONLY and ok:
                raise KtapParseError(ln.no, f"{directive} on an 'ok' result")
        test = ParsedTest(int(num_s), ok, desc, directive, reason, diags, sub, ln.no)
        if self.mode == "harness" and sub is not None and ok and directive in (None, "SKIP"):
            bad = [t.description for t in sub.tests if t.failed]
            if bad:
                raise KtapParseError(ln.no, f"parent is ok but subtests failed: {', '.join(bad)}")
        return test


def _diag_text(body: str) -> str:
    return body[2:] if body.startswith("# ") else ""


def parse_ktap(text: str, *, conformance: Conformance = "harness") -> ParsedBlock:
    """Parse a complete KTAP document into a tree; raise KtapParseError on the first violation."""
    return _Parser(text, conformance).parse()


def walk(block: ParsedBlock, depth: int = 0) -> Iterator[tuple[int, ParsedTest]]:
    """Yield (depth, test) for every test in the tree, parents after their subtests."""
    for t in block.tests:
        if t.subtests is not None:
            yield from walk(t.subtests, depth + 1)
        yield depth, t


def main(argv: list[str]) -> int:
    """`python -m harness.report.ktap_parser FILE`: 0 and a one-line summary when FILE is valid strict KTAP."""
    import sys

    if len(argv) != 1:
        print("usage: python -m harness.report.ktap_parser FILE", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        text = f.read()
    try:
        doc = parse_ktap(text)
    except KtapParseError as e:
        print(f"{argv[0]}: not valid KTAP: {e}", file=sys.stderr)
        return 1
    failed = sum(1 for _, t in walk(doc) if t.failed)
    print(f"{argv[0]}: valid KTAP v1, {len(doc.tests)} results, {failed} failed")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
