"""The benchmark record (`make bench` writes one per run) and the comparison of two records.

A record is JSON (schema SCHEMA; validate() says what a record must hold):

    {"schema": "kvm-harness-bench/1", "created": "2026-01-31T12:00:00Z",
     "commit": {"sha": "<40 hex>", "short": "<abbrev>", "dirty": false},      # sha None outside git
     "machine": {"kernel": "6.18.4", "kvm_backend": "kvm_intel", "cpu_model": "...", "cpus": 2,
                 "thp": "always [madvise] never"},
     "python": {"version": "3.11.7", "implementation": "CPython"},
     "rounds": 5,
     "benchmarks": {"pio_exits": {
         "label": "...", "unit": "exits/s", "count": 200000, "params": {}, "rounds": 5, "target": 0.85,
         "c":       {"samples": [...], "median": m, "min": lo, "max": hi},
         "harness": {"samples": [...], "median": m, "min": lo, "max": hi},
         "ratio":   {"median": harness median / C median, "min": lo, "max": hi,   # over rounds
                     "per_round": [harness_i / C_i, ...]},
         "meets_target": true,
         "secondary": {"sweeps_per_s": {"c": {...}, "harness": {...}, "ratio": h/c}}}},
     "skipped": {"dirty_ring_harvest": "why it could not run here"}}

Every rate is per second, so higher is better for the harness, the C baseline and their ratio.

compare(A, B) sets B against A per benchmark: the change of the harness median, the C median and
the ratio, in %, each with its noise band, the larger of the two records' spreads (max - min) /
median (for the ratio: of the per-round ratios). A change beyond its band is "better" or "worse";
inside it, "within noise". Benchmarks only in B are "new", only in A "missing"; one skipped on
either side is reported with the reason. With fail_above=PCT, a ratio that fell by more than PCT %
is a regression (exit 1 from `python -m bench compare --fail-above PCT`), noise band or not.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "kvm-harness-bench/1"
REPO = Path(__file__).resolve().parents[1]


# ---- building a record ---------------------------------------------------------------------------
def summary(samples: Sequence[float]) -> dict[str, Any]:
    xs = [float(x) for x in samples]
    return {"samples": xs, "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_entry(*, label: str, unit: str, count: int, target: float, c: Sequence[float],
                harness: Sequence[float], secondary: dict[str, tuple[Sequence[float], Sequence[float]]]
                | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One benchmark's entry from its per-round rates (C and harness, same length)."""
    if len(c) != len(harness) or not c:
        raise ValueError(f"{label}: {len(c)} C and {len(harness)} harness rounds")
    cs, hs = summary(c), summary(harness)
    per_round = [h / x for h, x in zip(hs["samples"], cs["samples"], strict=True)]
    ratio = hs["median"] / cs["median"]
    sec = {}
    for k, (sc, sh) in (secondary or {}).items():
        a, b = summary(sc), summary(sh)
        sec[k] = {"c": a, "harness": b, "ratio": b["median"] / a["median"] if a["median"] else None}
    return {
        "label": label, "unit": unit, "count": count, "params": dict(params or {}), "rounds": len(c),
        "target": target,
        "c": cs, "harness": hs,
        "ratio": {"median": ratio, "min": min(per_round), "max": max(per_round), "per_round": per_round},
        "meets_target": ratio >= target,
        "secondary": sec,
    }


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True,
                           check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def commit_info() -> dict[str, Any]:
    """HEAD and whether the work tree differs from it (tracked changes or untracked files)."""
    sha = _git("rev-parse", "HEAD")
    short = _git("rev-parse", "--short", "HEAD") if sha else None
    status = _git("status", "--porcelain") if sha else None
    return {"sha": sha, "short": short, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    try:
        from harness import backends  # read-only use: which KVM serves /dev/kvm

        backend = backends.name()
    except Exception as e:  # the record is still worth writing
        backend = f"unknown ({e})"
    return {"kernel": platform.release(), "kvm_backend": backend, "cpu_model": _cpu_model(),
            "cpus": os.cpu_count(), "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled")}


def make_record(benchmarks: dict[str, dict[str, Any]], skipped: dict[str, str], rounds: int, *,
                commit: dict[str, Any] | None = None, machine: dict[str, Any] | None = None,
                created: _dt.datetime | None = None) -> dict[str, Any]:
    created = created or _dt.datetime.now(_dt.UTC)
    return {
        "schema": SCHEMA,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": dict(commit) if commit is not None else commit_info(),
        "machine": dict(machine) if machine is not None else machine_info(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "rounds": rounds,
        "benchmarks": benchmarks,
        "skipped": skipped,
    }


def record_name(rec: dict[str, Any]) -> str:
    """<date>T<time>-<short commit>[-dirty].json, from the record's own fields."""
    stamp = rec["created"].replace(":", "").rstrip("Z")
    c = rec["commit"]
    short = c.get("short") or "nogit"
    return f"{stamp}-{short}{'-dirty' if c.get('dirty') else ''}.json"


def write_record(rec: dict[str, Any], directory: Path) -> Path:
    problems = validate(rec)
    if problems:
        raise ValueError("bench record does not follow its schema:\n  " + "\n  ".join(problems))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / record_name(rec)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return path


def load_record(path: Path) -> dict[str, Any]:
    rec = json.loads(Path(path).read_text())
    problems = validate(rec)
    if problems:
        raise ValueError(f"{path}: not a bench record:\n  " + "\n  ".join(problems))
    return rec


# ---- the schema ------------------------------------------------------------------------------------
def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_summary(where: str, s: Any, out: list[str]) -> None:
    if not isinstance(s, dict):
        out.append(f"{where}: not an object")
        return
    xs = s.get("samples")
    if not isinstance(xs, list) or not xs or not all(_num(x) for x in xs):
        out.append(f"{where}.samples: a non-empty list of numbers is needed")
        return
    for k in ("median", "min", "max"):
        if not _num(s.get(k)):
            out.append(f"{where}.{k}: a number is needed")
    if all(_num(s.get(k)) for k in ("median", "min", "max")) and not s["min"] <= s["median"] <= s["max"]:
        out.append(f"{where}: min <= median <= max does not hold")


def validate(rec: Any) -> list[str]:
    """What is wrong with rec as a bench record ([] when nothing)."""
    out: list[str] = []
    if not isinstance(rec, dict):
        return ["the record is not a JSON object"]
    if rec.get("schema") != SCHEMA:
        out.append(f"schema: {rec.get('schema')!r}, expected {SCHEMA!r}")
    if not isinstance(rec.get("created"), str):
        out.append("created: an ISO 8601 time string is needed")
    c = rec.get("commit")
    if not isinstance(c, dict) or not {"sha", "short", "dirty"} <= c.keys():
        out.append("commit: an object with sha, short and dirty is needed")
    m = rec.get("machine")
    if not isinstance(m, dict) or not {"kernel", "kvm_backend", "cpu_model", "cpus"} <= m.keys():
        out.append("machine: an object with kernel, kvm_backend, cpu_model and cpus is needed")
    p = rec.get("python")
    if not isinstance(p, dict) or not isinstance(p.get("version"), str):
        out.append("python.version: a string is needed")
    if not isinstance(rec.get("rounds"), int) or rec.get("rounds", 0) < 1:
        out.append("rounds: an int >= 1 is needed")
    benches = rec.get("benchmarks")
    if not isinstance(benches, dict):
        out.append("benchmarks: an object is needed")
        benches = {}
    for name, b in benches.items():
        w = f"benchmarks.{name}"
        if not isinstance(b, dict):
            out.append(f"{w}: not an object")
            continue
        for k in ("label", "unit"):
            if not isinstance(b.get(k), str):
                out.append(f"{w}.{k}: a string is needed")
        for k in ("count", "rounds"):
            if not isinstance(b.get(k), int):
                out.append(f"{w}.{k}: an int is needed")
        if not isinstance(b.get("params", {}), dict):
            out.append(f"{w}.params: an object is needed")
        if not _num(b.get("target")):
            out.append(f"{w}.target: a number is needed")
        _check_summary(f"{w}.c", b.get("c"), out)
        _check_summary(f"{w}.harness", b.get("harness"), out)
        r = b.get("ratio")
        if not isinstance(r, dict) or not all(_num(r.get(k)) for k in ("median", "min", "max")):
            out.append(f"{w}.ratio: median, min and max numbers are needed")
        elif not isinstance(r.get("per_round"), list):
            out.append(f"{w}.ratio.per_round: a list is needed")
        if not isinstance(b.get("meets_target"), bool):
            out.append(f"{w}.meets_target: a bool is needed")
        sec = b.get("secondary", {})
        if not isinstance(sec, dict):
            out.append(f"{w}.secondary: an object is needed")
        else:
            for k, s in sec.items():
                if not isinstance(s, dict):
                    out.append(f"{w}.secondary.{k}: not an object")
                    continue
                _check_summary(f"{w}.secondary.{k}.c", s.get("c"), out)
                _check_summary(f"{w}.secondary.{k}.harness", s.get("harness"), out)
    sk = rec.get("skipped")
    if not isinstance(sk, dict) or not all(isinstance(v, str) for v in sk.values()):
        out.append("skipped: an object of reasons (strings) is needed")
    return out


# ---- comparing two records -------------------------------------------------------------------------
def spread_pct(s: dict[str, Any]) -> float:
    """(max - min) / median of a summary, in %."""
    med = s["median"]
    return 100.0 * (s["max"] - s["min"]) / med if med else float("inf")


@dataclass(frozen=True)
class Change:
    metric: str  # "harness", "C" or "ratio"
    a: float  # median in record A
    b: float  # median in record B
    pct: float  # (b - a) / a, in %
    noise_pct: float  # the larger spread of the two records, in %

    @property
    def beyond_noise(self) -> bool:
        return abs(self.pct) > self.noise_pct

    @property
    def verdict(self) -> str:
        if not self.beyond_noise:
            return "within noise"
        return "better" if self.pct > 0 else "worse"


@dataclass
class BenchDiff:
    name: str
    status: str  # "compared", "new", "missing", "skipped"
    unit: str = ""
    changes: list[Change] = field(default_factory=list)
    note: str = ""

    def change(self, metric: str) -> Change | None:
        return next((c for c in self.changes if c.metric == metric), None)


def _change(metric: str, sa: dict[str, Any], sb: dict[str, Any]) -> Change:
    a, b = sa["median"], sb["median"]
    pct = 100.0 * (b - a) / a if a else float("inf")
    return Change(metric, a, b, pct, max(spread_pct(sa), spread_pct(sb)))


@dataclass
class Comparison:
    a: dict[str, Any]
    b: dict[str, Any]
    diffs: list[BenchDiff]
    fail_above: float | None = None

    def regressions(self) -> list[BenchDiff]:
        """Benchmarks whose ratio fell by more than fail_above % (none without fail_above)."""
        if self.fail_above is None:
            return []
        out = []
        for d in self.diffs:
            r = d.change("ratio")
            if r is not None and r.pct < -self.fail_above:
                out.append(d)
        return out

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions() else 0

    def render(self) -> str:
        lines = [f"A: {_describe(self.a)}", f"B: {_describe(self.b)}", ""]
        for k, what in (("kernel", "kernel"), ("kvm_backend", "KVM backend"), ("cpu_model", "CPU"),
                        ("cpus", "cpus")):
            va, vb = self.a.get("machine", {}).get(k), self.b.get("machine", {}).get(k)
            if va != vb:
                lines.append(f"note: {what} differs: {va} -> {vb}")
        va, vb = self.a.get("python", {}).get("version"), self.b.get("python", {}).get("version")
        if va != vb:
            lines.append(f"note: Python differs: {va} -> {vb}")
        if self.a.get("rounds") != self.b.get("rounds"):
            lines.append(f"note: rounds differ: {self.a.get('rounds')} -> {self.b.get('rounds')}")
        if lines[-1]:
            lines.append("")
        head = (f"{'benchmark':<20} {'metric':<8} {'A median':>14} {'B median':>14} {'change':>9} "
                f"{'noise':>8}  verdict")
        lines += [head, "-" * len(head)]
        for d in self.diffs:
            if d.status != "compared":
                lines.append(f"{d.name:<20} {d.status}: {d.note}")
                continue
            for c in d.changes:
                fmt = "{:>14.3f}" if c.metric == "ratio" else "{:>14,.0f}"
                flag = "" if not c.beyond_noise else ("  <-" if c.verdict == "worse" else "  ++")
                lines.append(f"{d.name:<20} {c.metric:<8} {fmt.format(c.a)} {fmt.format(c.b)} {c.pct:>+8.1f}% "
                             f"{'±' + format(c.noise_pct, '.1f') + '%':>8}  {c.verdict}{flag}")
            if d.note:
                lines.append(f"{'':<20} note: {d.note}")
        lines.append("")
        lines.append("(rates in each benchmark's unit, higher is better; noise = the larger (max-min)/median "
                     "of A and B; '<-' / '++' mark changes beyond it)")
        if self.fail_above is not None:
            regs = self.regressions()
            if regs:
                for d in regs:
                    r = d.change("ratio")
                    assert r is not None
                    lines.append(f"FAIL: {d.name}: harness/C ratio {r.a:.3f} -> {r.b:.3f} ({r.pct:+.1f}%), "
                                 f"worse by more than {self.fail_above:g}%")
            else:
                lines.append(f"ok: no harness/C ratio got worse by more than {self.fail_above:g}%")
        return "\n".join(lines)


def _describe(rec: dict[str, Any]) -> str:
    c = rec.get("commit", {})
    m = rec.get("machine", {})
    sha = c.get("short") or "no commit"
    return (f"{sha}{' (dirty tree)' if c.get('dirty') else ''}, {rec.get('created', '?')}, "
            f"{m.get('kernel', '?')} {m.get('kvm_backend', '?')}, {rec.get('rounds', '?')} rounds")


def _names(a: Iterable[str], b: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for n in [*a, *b]:
        seen.setdefault(n, None)
    return list(seen)


def compare(a: dict[str, Any], b: dict[str, Any], fail_above: float | None = None) -> Comparison:
    """Record b against record a (see the module docstring)."""
    ba, bb = a.get("benchmarks", {}), b.get("benchmarks", {})
    sa, sb = a.get("skipped", {}), b.get("skipped", {})
    diffs = []
    for name in _names([*ba, *sa], [*bb, *sb]):
        if name in ba and name in bb:
            x, y = ba[name], bb[name]
            d = BenchDiff(name, "compared", y.get("unit", ""))
            d.changes = [_change("harness", x["harness"], y["harness"]), _change("C", x["c"], y["c"]),
                         _change("ratio", x["ratio"], y["ratio"])]
            notes = []
            if x.get("count") != y.get("count"):
                notes.append(f"counts differ ({x.get('count')} -> {y.get('count')})")
            if x.get("params", {}) != y.get("params", {}):
                notes.append(f"parameters differ ({x.get('params', {})} -> {y.get('params', {})})")
            if notes:
                d.note = "; ".join(notes) + ": rates may not be comparable"
            diffs.append(d)
        elif name in sa or name in sb:
            why = "; ".join(f"skipped in {w}: {s[name]}" for w, s in (("A", sa), ("B", sb)) if name in s)
            if name in ba:
                why += " (ran in A)"
            elif name in bb:
                why += " (ran in B)"
            diffs.append(BenchDiff(name, "skipped", note=why))
        elif name in bb:
            diffs.append(BenchDiff(name, "new", bb[name].get("unit", ""), note="only in B (nothing to compare with)"))
        else:
            diffs.append(BenchDiff(name, "missing", ba[name].get("unit", ""), note="in A, not run in B"))
    return Comparison(a, b, diffs, fail_above)
