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


def to_json(runs: list[KernelRun], command: list[str]) -> str:
    return json.dumps({
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
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


def write(runs: list[KernelRun], out_root: Path, command: list[str]) -> dict[str, Path]:
    out_root.mkdir(parents=True, exist_ok=True)
    paths = {"text": out_root / "matrix.txt", "json": out_root / "matrix.json", "html": out_root / "index.html"}
    paths["text"].write_text(text(runs, command))
    paths["json"].write_text(to_json(runs, command))
    paths["html"].write_text(to_html(runs, command))
    return paths
