"""One result file from the files of N shards (the kernel runner's --shards: guest I wrote PATH.shardI).

    merge_ktap(parts)    one KTAP v1 document: the first shard's header (suite, `# kernel ...`,
                         `# backend ...`: harness/matrix/cells.py ktap_header reads it), a plan equal to
                         the total, every shard's results in shard order renumbered 1..N, new totals;
                         parsed with the strict parser (ktap_parser.py) and rewritten with the writer
                         (ktap.py), and the result checked by the parser again.
    merge_junit(parts)   one <testsuite> with every shard's <testcase>s in shard order and the counters
                         (tests, errors, failures, skipped) summed; its time is the longest shard's (they
                         ran side by side).

A shard that wrote no file (it crashed, timed out, never started) still shows: one ERROR result /
<error> testcase named after it, with why. A KTAP file cut short (the guest died mid-run) keeps its
complete results and pads the rest of its plan with `# ERROR not run`, as the writer does for a
session that ends early.
"""

from __future__ import annotations

import io
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.report.ktap import KtapResult, KtapWriter, Outcome
from harness.report.ktap_parser import KtapParseError, ParsedBlock, ParsedTest, parse_ktap

_SUITE = "selftests: kvm-harness: "  # KtapWriter's header line between version and plan
_TOTALS = "Totals: "
_TOP_RESULT = re.compile(r"(?:ok|not ok) [0-9]+(?: |$)")
_TOP_PLAN = re.compile(r"1\.\.[0-9]+")


@dataclass
class Part:
    """One shard's file."""

    label: str  # "shard 2/3"
    text: str | None  # the file's contents; None when the shard wrote none
    why: str = ""  # the shard's own outcome, said where its file is missing or short


def read_parts(paths: Sequence[Path], labels: Sequence[str], whys: Sequence[str]) -> list[Part]:
    parts = []
    for path, label, why in zip(paths, labels, whys, strict=True):
        try:
            text: str | None = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = None
        parts.append(Part(label, text, why))
    return parts


def write_atomically(dest: Path, data: str) -> None:
    tmp = dest.with_name(dest.name + ".merging")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, dest)


# ---- KTAP -----------------------------------------------------------------------------------------

_OK: dict[str, Outcome] = {"SKIP": "skip", "XFAIL": "xfail"}
_NOT_OK: dict[str, Outcome] = {"XPASS": "xpass", "TIMEOUT": "timeout", "ERROR": "error", "TODO": "xfail"}


def _outcome(t: ParsedTest) -> Outcome:
    if t.ok:
        return _OK.get(t.directive or "", "pass")
    return _NOT_OK.get(t.directive or "", "fail")


def _result(t: ParsedTest) -> KtapResult:
    """Back to what the writer takes: the "#" lines above the result as they were (" " keeps a bare
    "#"), the directive's reason from the result line."""
    outcome = _outcome(t)
    reason = t.reason if t.directive else ""
    subs = [_result(s) for s in t.subtests.tests] if t.subtests is not None else []
    return KtapResult(t.description, outcome, reason, [d or " " for d in t.diagnostics], subs)


def _salvage(text: str) -> tuple[ParsedBlock, int, str]:
    """(the block, how many results its plan promised, a note): strict first; a document cut short
    keeps the results up to its last top-level result line."""
    try:
        block = parse_ktap(text)
        return block, block.plan or 0, ""
    except KtapParseError as e:
        err = str(e)
    lines = text.split("\n")
    last = max((k for k, ln in enumerate(lines) if _TOP_RESULT.match(ln)), default=None)
    plan_at = next((k for k, ln in enumerate(lines) if _TOP_PLAN.fullmatch(ln)), None)
    if plan_at is None:
        raise KtapParseError(1, f"no plan line ({err})")
    planned = int(lines[plan_at][3:])
    keep = lines[: (last + 1) if last is not None and last > plan_at else plan_at + 1]
    count = sum(1 for ln in keep if _TOP_RESULT.match(ln))
    keep[plan_at] = f"1..{count}"
    block = parse_ktap("\n".join(keep) + "\n")  # still broken: the caller says so
    return block, max(planned, count), f"cut short ({err}): {count} of {planned} results"


def _leading(block: ParsedBlock) -> list[str]:
    """The "#" lines right after the plan: the reporter's header (kernel, backend, paging, oracle),
    which the parser hands to the first result (or to the block's end when there is none)."""
    if block.tests:
        return list(block.tests[0].diagnostics)
    return [d for d in block.trailing_diagnostics if not d.startswith(_TOTALS)]


def _common_prefix(lists: list[list[str]]) -> list[str]:
    out: list[str] = []
    for row in zip(*lists, strict=False):
        if any(x != row[0] for x in row):
            break
        out.append(row[0])
    return out


def merge_ktap(parts: Sequence[Part]) -> str:
    """The merged document (see the module's docstring); raises KtapParseError only if what it wrote
    does not parse, which would be a bug here."""
    parsed: list[tuple[Part, ParsedBlock | None, int, str]] = []
    for p in parts:
        if p.text is None:
            parsed.append((p, None, 0, f"wrote no KTAP file ({p.why or 'no reason known'})"))
            continue
        try:
            block, planned, note = _salvage(p.text)
        except KtapParseError as e:
            parsed.append((p, None, 0, f"its KTAP file is unreadable ({e})"))
            continue
        parsed.append((p, block, planned, f"{note}; {p.why}" if note and p.why else note))
    blocks = [b for _, b, _, _ in parsed if b is not None]
    header = _common_prefix([_leading(b) for b in blocks]) if blocks else []
    suite = next((d.removeprefix(_SUITE) for b in blocks[:1] for d in b.header_diagnostics
                  if d.startswith(_SUITE)), None)
    plan = sum(max(planned, len(b.tests)) if b is not None else 1 for _, b, planned, _ in parsed)

    buf = io.StringIO()
    w = KtapWriter(buf, plan, suite=suite)
    w.diagnostic(f"merged from {len(parts)} shards run side by side: "
                 + ", ".join(f"{p.label} {len(b.tests) if b is not None else 0} results"
                             for p, b, _, _ in parsed))
    for line in header:
        w.diagnostic(line)
    for p, b, planned, note in parsed:
        if b is None:
            w.add(KtapResult(f"kvm-harness {p.label}", "error", note))
            continue
        if note:
            w.diagnostic(f"{p.label}: {note}")
        for k, t in enumerate(b.tests):
            r = _result(t)
            if k == 0:  # the header went on top once
                own = t.diagnostics[len(header):]
                r.diagnostics = [d or " " for d in own]
            w.add(r)
        extra = [d for d in b.trailing_diagnostics if not d.startswith(_TOTALS)]
        if not b.tests:
            extra = extra[len(header):]
        for d in extra:
            w.diagnostic(d or " ")
        for k in range(len(b.tests), planned):
            w.add(KtapResult(f"{p.label} unreported_{k + 1}", "error", "not run"))
    w.close()
    text = buf.getvalue()
    parse_ktap(text)  # the project's strict parser has the last word
    return text


# ---- JUnit ----------------------------------------------------------------------------------------

_COUNTERS = ("tests", "errors", "failures", "skipped")


def _suites(root: ET.Element) -> list[ET.Element]:
    return [root] if root.tag == "testsuite" else list(root.iter("testsuite"))


def merge_junit(parts: Sequence[Part]) -> str:
    """The merged JUnit XML (pytest's layout: <testsuites><testsuite ...>)."""
    suites: list[ET.Element] = []
    missing: list[tuple[Part, str]] = []
    for p in parts:
        if p.text is None:
            missing.append((p, f"wrote no JUnit file ({p.why or 'no reason known'})"))
            continue
        try:
            found = _suites(ET.fromstring(p.text))
        except ET.ParseError as e:
            missing.append((p, f"its JUnit file is unreadable ({e})"))
            continue
        suites += found
    first = suites[0] if suites else None
    out_suite = ET.Element("testsuite", dict(first.attrib) if first is not None else {"name": "pytest"})
    totals = dict.fromkeys(_COUNTERS, 0)
    seconds = 0.0
    props = ET.Element("properties")
    seen_props: set[tuple[str | None, str | None]] = set()
    cases: list[ET.Element] = []
    for s in suites:
        for c in _COUNTERS:
            totals[c] += int(s.get(c) or 0)
        seconds = max(seconds, float(s.get("time") or 0))
        for pe in s.findall("properties/property"):
            key = (pe.get("name"), pe.get("value"))
            if key not in seen_props:
                seen_props.add(key)
                props.append(pe)
        cases += s.findall("testcase")
    for p, why in missing:
        tc = ET.Element("testcase", {"classname": "kvm-harness", "name": p.label, "time": "0"})
        ET.SubElement(tc, "error", {"message": why}).text = why
        cases.append(tc)
        totals["tests"] += 1
        totals["errors"] += 1
    for c in _COUNTERS:
        out_suite.set(c, str(totals[c]))
    out_suite.set("time", f"{seconds:.3f}")
    if len(props):
        out_suite.append(props)
    out_suite.extend(cases)
    root = ET.Element("testsuites", {"name": "pytest tests"})
    root.append(out_suite)
    return '<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root, encoding="unicode") + "\n"
