"""Measured case durations, the weights `--shard` balances on (harness/pytest/shard.py).

The file (cases/durations.json) holds what one full run under TCG measured: the cases that took at
least `THRESHOLD` seconds each by name, and one `default` for all the others (their mean, so their
sum comes out right), so it stays short and a new case needs no entry. Under TCG a case's time
ranges from 0.01 s (a skip) to minutes (the every-slot case), and dealing cases by count put 604 s
of cases in one guest against 564 s in the other; by measured seconds the slices come out even.

Recording: run the suite in the kernel runner with --junitxml and write the file from it:

    python -m harness kernel --kernel debian:7.3.4 --shards auto -- cases/ --junitxml=/tmp/j.xml
    python -m harness.pytest.durations /tmp/j.xml -o cases/durations.json

The numbers only steer the split: a stale or missing file makes the slices uneven, never wrong.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

THRESHOLD = 0.5  # seconds: cases at or above it are named in the file (~10 % of them under TCG)
DEFAULT_FILE = "cases/durations.json"  # under the rootdir


@dataclass(frozen=True)
class Durations:
    """Seconds per case id (`cases/test_x.py::test_y[p]`), `default` for the unnamed ones."""

    default: float = 1.0
    seconds: Mapping[str, float] = field(default_factory=dict)
    source: str = ""  # what was measured: kernel, accel, shards, date

    def of(self, case: str) -> float | None:
        return self.seconds.get(case)


def load(path: Path) -> Durations | None:
    """The file's durations, None when there is none; a malformed file is an error that names it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        secs = {str(k): float(v) for k, v in data["seconds"].items()}
        return Durations(float(data["default"]), secs, str(data.get("source", "")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a durations file ({type(e).__name__}: {e}); "
                         f"re-record it: python -m harness.pytest.durations JUNIT -o {path}") from e


def from_seconds(measured: Mapping[str, float], source: str) -> Durations:
    """What the file keeps of a run's times: the slow cases by name, the others' mean as default."""
    if not measured:
        raise ValueError("no case times to record")
    named = {k: round(v, 2) for k, v in sorted(measured.items()) if v >= THRESHOLD}
    rest = [v for k, v in measured.items() if k not in named]
    default = round(statistics.fmean(rest), 3) if rest else THRESHOLD
    return Durations(default, named, source)


def dumps(d: Durations) -> str:
    return json.dumps({"source": d.source, "threshold": THRESHOLD, "default": d.default,
                       "seconds": dict(sorted(d.seconds.items()))}, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.pytest.durations",
                                 description="Record case durations from JUnit XML (the shards' weights).")
    ap.add_argument("junit", nargs="+", type=Path,
                    help="JUnit XML of full runs (the kernel runner's, merged, or its shards'); "
                         "a case in several files gets its median")
    ap.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_FILE))
    ap.add_argument("--source", default="", help="what was measured (kernel, accel, shards, date)")
    args = ap.parse_args(argv)
    from harness.matrix.cells import from_junit  # the same case ids as the matrix

    # Several runs of the same cases: each case's median, so one run's outlier (a TCG guest's
    # khugepaged stall made a 0.8 s race take 26 s once) does not steer the split; a skip's time is
    # not the case's, so where a case ran in some runs only those count. Shards' files hold disjoint
    # cases and just add up.
    runs: dict[str, list[float]] = {}
    skips: dict[str, list[float]] = {}
    for p in args.junit:
        try:
            for k, c in from_junit(p).items():
                (skips if c.outcome == "skip" else runs).setdefault(k, []).append(c.seconds)
        except (OSError, ValueError) as e:  # ET.ParseError is a ValueError
            print(f"durations: {p}: {e}", file=sys.stderr)
            return 2
    measured = {k: statistics.median(runs.get(k) or v) for k, v in (skips | runs).items()}
    d = from_seconds(measured, args.source or ", ".join(map(str, args.junit)))
    args.output.write_text(dumps(d))
    print(f"durations: {len(measured)} cases, {sum(measured.values()):.0f} s; {len(d.seconds)} at or above "
          f"{THRESHOLD:g} s named, the others {d.default:g} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
