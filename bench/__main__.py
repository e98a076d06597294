"""`python -m bench`: run each registered C/harness pair alternately and compare ops/s.

Run from the repo root after `make -C bench` (the top-level `make bench` does both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import bench.pio  # registers its pair
import bench.race  # noqa: F401  (registers its pairs)
from bench.registry import BENCHES, Bench


@dataclass
class Result:
    bench: Bench
    count: int
    c: list[float] = field(default_factory=list)
    harness: list[float] = field(default_factory=list)
    extra_c: dict[str, list[float]] = field(default_factory=dict)  # secondary rates
    extra_harness: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return statistics.median(self.harness) / statistics.median(self.c)

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "c_ops_per_s": self.c,
            "harness_ops_per_s": self.harness,
            "c_median": statistics.median(self.c),
            "harness_median": statistics.median(self.harness),
            "ratio": self.ratio,
            "target": self.bench.target,
            "meets_target": self.ratio >= self.bench.target,
            **{f"{k}_c": v for k, v in self.extra_c.items()},
            **{f"{k}_harness": v for k, v in self.extra_harness.items()},
        }


def run_c(bench: Bench, count: int) -> dict[str, float]:
    argv = bench.c_cmd(count)
    if not Path(argv[0]).exists():
        sys.exit(f"bench: {argv[0]} is missing; run `make -C bench` first")
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: float(doc[k]) for k in (bench.c_rate_key, *bench.secondary)}


def run_py(bench: Bench, count: int) -> dict[str, float]:
    r = bench.py(count)
    if isinstance(r, dict):
        return {k: float(r[k]) for k in (bench.c_rate_key, *bench.secondary)}
    return {bench.c_rate_key: float(r)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    # one count option per distinct name in the registry (--exits for pio_exits, ...)
    seen: set[str] = set()
    for b in BENCHES.values():
        if b.count_option not in seen:
            seen.add(b.count_option)
            ap.add_argument(f"--{b.count_option}", type=int, default=b.default_count, metavar="N",
                            help=f"operations per round (default {b.default_count})")
    ap.add_argument("--rounds", type=int, default=5, metavar="R", help="alternating rounds (default 5)")
    ap.add_argument("--only", action="append", choices=sorted(BENCHES), help="run just this benchmark")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its target")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    for opt in seen:
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be >= 1")
    return args


def measure(bench: Bench, count: int, rounds: int) -> Result:
    res = Result(bench, count)
    for i in range(rounds):
        # alternate, so drift (frequency, other load) hits both sides alike
        c = run_c(bench, count)
        h = run_py(bench, count)
        res.c.append(c[bench.c_rate_key])
        res.harness.append(h[bench.c_rate_key])
        for k in bench.secondary:
            res.extra_c.setdefault(k, []).append(c[k])
            res.extra_harness.setdefault(k, []).append(h[k])
        extra = "".join(f"; {k}: C {c[k]:,.0f}, harness {h[k]:,.0f}" for k in bench.secondary)
        print(f"  {bench.name} round {i + 1}/{rounds}: C {res.c[-1]:,.0f}/s, "
              f"harness {res.harness[-1]:,.0f}/s{extra}", file=sys.stderr, flush=True)
    return res


def print_table(results: list[Result]) -> None:
    head = f"{'benchmark':<18} {'side':<8} {'median/s':>12} {'min/s':>12} {'max/s':>12}"
    print(head)
    print("-" * len(head))
    for r in results:
        for side, xs in (("C", r.c), ("harness", r.harness)):
            print(f"{r.bench.name:<18} {side:<8} {statistics.median(xs):>12,.0f} "
                  f"{min(xs):>12,.0f} {max(xs):>12,.0f}")
        per_round = [h / c for h, c in zip(r.harness, r.c, strict=True)]
        # median row is median(harness)/median(C); min/max are over the per-round ratios
        print(f"{r.bench.name:<18} {'ratio':<8} {r.ratio:>12.3f} {min(per_round):>12.3f} "
              f"{max(per_round):>12.3f}")
        for k in r.bench.secondary:
            for side, xs in (("C", r.extra_c[k]), ("harness", r.extra_harness[k])):
                print(f"{'  ' + k:<18} {side:<8} {statistics.median(xs):>12,.0f} "
                      f"{min(xs):>12,.0f} {max(xs):>12,.0f}")
    print()
    for r in results:
        print(f"ratio harness/C ({r.bench.label}): {r.ratio:.2f} (target >= {r.bench.target:.2f})")
        for k in r.bench.secondary:
            c, h = statistics.median(r.extra_c[k]), statistics.median(r.extra_harness[k])
            print(f"  {k}: harness/C {h / c if c else float('nan'):.2f} (informational)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(BENCHES)
    results = [measure(BENCHES[n], getattr(args, BENCHES[n].count_option), args.rounds) for n in names]
    print_table(results)
    if args.json is not None:
        doc = {
            "rounds": args.rounds,
            "host": {"kernel": platform.release(), "python": platform.python_version(),
                     "cpus": os.cpu_count()},
            "benchmarks": {r.bench.name: r.as_dict() for r in results},
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.check and any(r.ratio < r.bench.target for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
