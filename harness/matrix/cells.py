"""One kernel's results as cells: pass / fail / xfail (issue id) / xpass / skip (reason) / error."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

OUTCOMES = ("pass", "fail", "error", "xfail", "xpass", "skip", "missing")
BAD = ("fail", "error", "xpass")  # cells that make the matrix fail (xpass: only when strict)


@dataclass
class Cell:
    outcome: str
    detail: str = ""  # skip / xfail reason, or the failure's first line
    text: str = ""  # the whole failure text (HTML page links it)
    issue: str = ""  # known issue id (xfail / xpass)
    strict: bool = True  # an xpass of a non-strict known issue does not fail the matrix
    seconds: float = 0.0

    @property
    def bad(self) -> bool:
        return self.outcome in ("fail", "error") or (self.outcome == "xpass" and self.strict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class KernelRun:
    """What one kernel's run produced."""

    kernel: str  # host, debian:7.3.4, ...
    release: str = ""  # uname -r seen by the run
    backend: str = ""
    code: int | None = None  # the runner's / pytest's exit status
    outcome: str = ""  # verdict, boot-failure, timeout, ...
    reason: str = ""
    seconds: float = 0.0
    cells: dict[str, Cell] = field(default_factory=dict)
    paging: str = ""  # "tdp" / "shadow" (KTAP header), for entries keyed by paging

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for c in self.cells.values():
            out[c.outcome] += 1
        return {k: v for k, v in out.items() if v}


def _case_id(tc: ET.Element) -> str:
    cls = tc.get("classname", "")
    name = tc.get("name", "")
    # pytest: classname "cases.test_memslots" (+ ".TestClass"), name "test_x[param]"
    parts = cls.split(".")
    mod_end = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    path = "/".join(parts[: mod_end + 1]) + ".py"
    rest = parts[mod_end + 1:]
    return "::".join([path, *rest, name])


def from_junit(path: Path) -> dict[str, Cell]:
    """Cells from pytest's JUnit XML (the harness adds `known_issue` properties to xfail cases)."""
    cells: dict[str, Cell] = {}
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        case = _case_id(tc)
        props = {p.get("name"): p.get("value", "") for p in tc.iter("property")}
        issue = props.get("known_issue", "")
        secs = float(tc.get("time") or 0)
        failure = tc.find("failure")
        error = tc.find("error")
        skipped = tc.find("skipped")
        if failure is not None:
            msg = failure.get("message", "") or ""
            text = (failure.text or "").strip()
            if msg.startswith("[XPASS(strict)]"):
                cells[case] = Cell("xpass", msg.removeprefix("[XPASS(strict)]").strip(), text, issue, True, secs)
            else:
                cells[case] = Cell("fail", msg.splitlines()[0] if msg else "", text, issue, seconds=secs)
        elif error is not None:
            msg = error.get("message", "") or ""
            cells[case] = Cell("error", msg.splitlines()[0] if msg else "", (error.text or "").strip(), issue,
                               seconds=secs)
        elif skipped is not None:
            msg = skipped.get("message", "") or ""
            if skipped.get("type") == "pytest.xfail":
                cells[case] = Cell("xfail", msg, "", issue or _issue_in(msg), seconds=secs)
            else:
                cells[case] = Cell("skip", msg.removeprefix("Skipped: ") if msg else "", seconds=secs)
        elif issue:  # a non-strict known issue that did not reproduce
            cells[case] = Cell("xpass", "known issue did not reproduce (not strict)", "", issue, False, secs)
        else:
            cells[case] = Cell("pass", seconds=secs)
    return cells


def _issue_in(reason: str) -> str:
    m = re.search(r"known (?:kernel issue|\S+ emulator artefact) (\S+):", reason)
    return m.group(1) if m else ""


def ktap_header(path: Path) -> dict[str, str]:
    """`# kernel 7.3.4+deb13-amd64 (x86_64)` and `# backend kvm_amd` from a KTAP file's header."""
    out: dict[str, str] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()[:20]
    except OSError:
        return out
    for ln in lines:
        m = re.match(r"# kernel (\S+)", ln)
        if m:
            out["release"] = m.group(1)
        m = re.match(r"# backend (\S+)", ln)
        if m:
            out["backend"] = m.group(1)
        m = re.match(r"# paging (\S+)", ln)
        if m:
            out["paging"] = m.group(1)
    return out
