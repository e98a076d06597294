"""The matrix as a table: cases x kernels, as text, JSON and a static HTML page."""

from __future__ import annotations

import datetime
import html
import json
import shlex
from pathlib import Path

from harness.matrix.cells import Cell, KernelRun

SHORT = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "xfail": "xfail", "xpass": "XPASS", "skip": "skip",
         "missing": "-"}


def cell_text(c: Cell | None) -> str:
    if c is None:
        return "-"
    s = SHORT[c.outcome]
    if c.outcome in ("xfail", "xpass") and c.issue:
        s += f"({c.issue})"
    if c.outcome == "xpass" and not c.strict:
        s = s.lower()  # a non-strict known issue that did not reproduce: fine
    return s


def cases_of(runs: list[KernelRun]) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for c in r.cells:
            seen.setdefault(c, None)
    return sorted(seen)


def failing(runs: list[KernelRun]) -> list[tuple[str, str, Cell]]:
    return [(case, r.kernel, c) for r in runs for case, c in sorted(r.cells.items()) if c.bad]


def verdict(runs: list[KernelRun]) -> int:
    """0 when no cell failed (or strictly XPASSed) and every kernel gave a verdict, else 1."""
    if failing(runs):
        return 1
    return 0 if all(r.outcome == "verdict" and r.cells for r in runs) else 1


def text(runs: list[KernelRun], command: list[str], only_interesting: bool = False) -> str:
    cases = cases_of(runs)
    lines = [f"kvm-harness matrix, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
             f"command: {shlex.join(command)}", ""]
    lines.append(f"{'kernel':<22} {'release':<28} {'backend':<9} {'exit':>4} {'time':>7}  counts")
    for r in runs:
        counts = ", ".join(f"{v} {k}" for k, v in r.counts().items()) or r.reason[:80]
        lines.append(f"{r.kernel:<22} {r.release or '?':<28} {r.backend or '?':<9} "
                     f"{r.code if r.code is not None else '?':>4} {r.seconds:>6.0f}s  {counts}")
    lines.append("")
    width = max([len(c) for c in cases] + [10])
    head = f"{'case':<{width}}  " + "  ".join(f"{r.kernel:<14}" for r in runs)
    lines.append(head)
    for case in cases:
        cells = [r.cells.get(case) for r in runs]
        if only_interesting and all(c is not None and c.outcome == "pass" for c in cells):
            continue
        lines.append(f"{case:<{width}}  " + "  ".join(f"{cell_text(c):<14}" for c in cells))
    bad = failing(runs)
    if bad:
        lines += ["", f"{len(bad)} failing cell(s):"]
        for case, kernel, c in bad:
            lines.append(f"  {kernel}: {case}: {c.detail[:200]}")
    return "\n".join(lines) + "\n"


def to_json(runs: list[KernelRun], command: list[str], date: str | None = None) -> str:
    return json.dumps({
        "date": date or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "kernels": [{"kernel": r.kernel, "release": r.release, "backend": r.backend, "code": r.code,
                     "outcome": r.outcome, "reason": r.reason, "seconds": round(r.seconds, 1),
                     "counts": r.counts()} for r in runs],
        "cells": {case: {r.kernel: r.cells[case].to_json() for r in runs if case in r.cells}
                  for case in cases_of(runs)},
    }, indent=1)


_CSS = """body{font:13px sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 6px}
td.pass{background:#dfd} td.fail,td.error,td.xpass{background:#f99} td.xfail{background:#fd9}
td.skip{background:#eee;color:#666} td.soft{background:#efe} pre{white-space:pre-wrap;background:#f6f6f6}"""


def to_html(runs: list[KernelRun], command: list[str]) -> str:
    e = html.escape
    cases = cases_of(runs)
    out = [f"<!doctype html><meta charset=utf-8><title>kvm-harness matrix</title><style>{_CSS}</style>",
           "<h1>kvm-harness matrix</h1>",
           f"<p>{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC &mdash; <code>{e(shlex.join(command))}</code>",
           "<table><tr><th>kernel<th>release<th>backend<th>exit<th>time<th>counts"]
    for r in runs:
        counts = ", ".join(f"{v} {k}" for k, v in r.counts().items()) or e(r.reason)
        out.append(f"<tr><td>{e(r.kernel)}<td>{e(r.release)}<td>{e(r.backend)}<td>{r.code}"
                   f"<td>{r.seconds:.0f} s<td>{e(counts)}")
    out.append("</table><h2>cases</h2><table><tr><th>case" + "".join(f"<th>{e(r.kernel)}" for r in runs))
    details = []
    for case in cases:
        row = [f"<tr><td><code>{e(case)}</code>"]
        for r in runs:
            c = r.cells.get(case)
            if c is None:
                row.append("<td>-")
                continue
            cls = "soft" if c.outcome == "xpass" and not c.strict else c.outcome
            label = e(cell_text(c))
            title = e(c.detail[:300])
            if c.bad or c.outcome == "xfail":
                anchor = f"d{len(details)}"
                details.append(f"<h3 id={anchor}>{e(r.kernel)}: <code>{e(case)}</code> ({e(c.outcome)})</h3>"
                               f"<pre>{e(c.text or c.detail)}</pre>")
                row.append(f'<td class={cls} title="{title}"><a href="#{anchor}">{label}</a>')
            else:
                row.append(f'<td class={cls} title="{title}">{label}')
        out.append("".join(row))
    out.append("</table><h2>failures and known issues</h2>")
    out += details or ["<p>none"]
    return "\n".join(out) + "\n"


def write(runs: list[KernelRun], out_root: Path, command: list[str], date: str | None = None) -> dict[str, Path]:
    out_root.mkdir(parents=True, exist_ok=True)
    paths = {"text": out_root / "matrix.txt", "json": out_root / "matrix.json", "html": out_root / "index.html"}
    paths["text"].write_text(text(runs, command))
    paths["json"].write_text(to_json(runs, command, date))
    paths["html"].write_text(to_html(runs, command))
    return paths


# ---- Markdown, for the repository's docs --------------------------------------------------------------
def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _function(case: str) -> str:
    return case.split("[", 1)[0]


def _summary(cells: list[Cell]) -> str:
    """'48 pass', '40 pass, 8 xfail', 'skip' ... for one test function's cells on one kernel."""
    if not cells:
        return "-"
    n: dict[str, int] = {}
    for c in cells:
        k = cell_text(c).split("(")[0]
        n[k] = n.get(k, 0) + 1
    if len(n) == 1 and len(cells) == 1:
        return next(iter(n))
    return ", ".join(f"{v} {k}" for k, v in n.items())


def markdown(runs: list[KernelRun], ran: str, date: str, rendered: str) -> str:
    """The whole matrix for docs/: kernels, every cell that is not a pass or skip, every test function's
    cells per kernel, and the skip reasons. Generated: `rendered` is the command that wrote it."""
    out = [f"# The suite on {len(runs)} kernels",
           "",
           f"Generated by `{rendered}` from the run of {date}:",
           "",
           f"    {ran}",
           "",
           "Do not edit by hand: rerun both commands. Cells: pass, FAIL, ERROR, xfail(known issue), "
           "XPASS(known issue: strict, so a failure of the run), xpass (non-strict known issue that did not "
           "reproduce), skip (reasons at the end), - (not collected there). Known issues: known-issues.toml; "
           "verdicts on every cross-kernel failure: docs/triage.md.",
           "",
           "## Kernels",
           "",
           "| kernel | release | KVM | paging | exit | time | " + " | ".join(OUTCOME_COLUMNS) + " |",
           "|" + "---|" * (6 + len(OUTCOME_COLUMNS))]
    for r in runs:
        cnt = r.counts()
        out.append(f"| {r.kernel} | {r.release or '?'} | {r.backend or '?'} | {r.paging or '?'} | "
                   f"{r.code if r.code is not None else '?'} | {r.seconds:.0f} s | "
                   + " | ".join(str(cnt.get(k, 0)) for k in OUTCOME_COLUMNS) + " |")
    notable = [(case, r.kernel, c) for case in cases_of(runs) for r in runs
               if (c := r.cells.get(case)) is not None and c.outcome in ("fail", "error", "xfail", "xpass")]
    out += ["", "## Cells that are not a pass or a skip", ""]
    if notable:
        out += ["| case | kernel | cell | detail |", "|---|---|---|---|"]
        for case, kernel, c in notable:
            out.append(f"| `{_md(case)}` | {kernel} | {cell_text(c)} | {_md(c.detail[:160])} |")
    else:
        out.append("none")
    out += ["", "## Every test function, per kernel", "",
            "| test function | " + " | ".join(r.kernel for r in runs) + " |",
            "|---|" + "---|" * len(runs)]
    funcs: dict[str, None] = {}
    for case in cases_of(runs):
        funcs.setdefault(_function(case), None)
    for f in funcs:
        row = []
        for r in runs:
            row.append(_summary([c for case, c in sorted(r.cells.items()) if _function(case) == f]))
        out.append(f"| `{_md(f)}` | " + " | ".join(row) + " |")
    reasons: dict[str, dict[str, int]] = {}
    for r in runs:
        for c in r.cells.values():
            if c.outcome == "skip":
                key = _md(c.detail.split(": ", 1)[-1][:140] or "?")
                reasons.setdefault(key, {}).setdefault(r.kernel, 0)
                reasons[key][r.kernel] += 1
    out += ["", "## Skip reasons", "", "| reason | " + " | ".join(r.kernel for r in runs) + " |",
            "|---|" + "---|" * len(runs)]
    for reason, per in sorted(reasons.items(), key=lambda kv: -sum(kv[1].values())):
        out.append(f"| {reason} | " + " | ".join(str(per.get(r.kernel, "")) for r in runs) + " |")
    return "\n".join(out) + "\n"


OUTCOME_COLUMNS = ("pass", "fail", "error", "xfail", "xpass", "skip")
