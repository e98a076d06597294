"""`python -m bench`: run each registered C/harness pair alternately and compare their rates.

    python -m bench [--rounds R] [--only NAME ...] [--<count option> N ...] [--record-dir DIR] [--json PATH]
    python -m bench compare A.json B.json [--fail-above PCT]

Run from the repo root after `make -C bench` (the top-level `make bench` does both and writes the
record into results/bench/). See docs/bench.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import record
from bench.registry import BENCHES, Bench

# Each module registers its pairs on import; this order is the order they run and print in.
MODULES = ("pio", "race", "vmcreate", "demand", "dirty")
for _m in MODULES:
    importlib.import_module(f"bench.{_m}")


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
        b = self.bench
        return record.bench_entry(
            label=b.label, unit=b.unit, count=self.count, target=b.target, c=self.c, harness=self.harness,
            secondary={k: (self.extra_c[k], self.extra_harness[k]) for k in b.secondary}, params=b.params)


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
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # one count option per distinct name in the registry (--exits for pio_exits, ...)
    seen: set[str] = set()
    for b in BENCHES.values():
        if b.count_option not in seen:
            seen.add(b.count_option)
            users = ", ".join(x.name for x in BENCHES.values() if x.count_option == b.count_option)
            ap.add_argument(f"--{b.count_option}", type=int, default=b.default_count, metavar="N",
                            help=f"per round, for {users} (default {b.default_count})")
    ap.add_argument("--rounds", type=int, default=5, metavar="R", help="alternating rounds (default 5)")
    ap.add_argument("--only", action="append", choices=sorted(BENCHES), help="run just this benchmark")
    ap.add_argument("--record-dir", type=Path, metavar="DIR",
                    help="write the record as DIR/<date>-<commit>[-dirty].json (make bench: results/bench)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write the record to PATH")
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
        print(f"  {bench.name} round {i + 1}/{rounds}: C {res.c[-1]:,.0f}, harness {res.harness[-1]:,.0f} "
              f"{bench.unit}{extra}", file=sys.stderr, flush=True)
    return res


def print_table(results: list[Result], skipped: dict[str, str]) -> None:
    head = (f"{'benchmark':<20} {'side':<8} {'median':>14} {'min':>14} {'max':>14}  unit")
    print(head)
    print("-" * len(head))
    for r in results:
        for side, xs in (("C", r.c), ("harness", r.harness)):
            print(f"{r.bench.name:<20} {side:<8} {statistics.median(xs):>14,.0f} "
                  f"{min(xs):>14,.0f} {max(xs):>14,.0f}  {r.bench.unit}")
        per_round = [h / c for h, c in zip(r.harness, r.c, strict=True)]
        # median row is median(harness)/median(C); min/max are over the per-round ratios
        print(f"{r.bench.name:<20} {'ratio':<8} {r.ratio:>14.3f} {min(per_round):>14.3f} "
              f"{max(per_round):>14.3f}")
        for k in r.bench.secondary:
            for side, xs in (("C", r.extra_c[k]), ("harness", r.extra_harness[k])):
                print(f"{'  ' + k:<20} {side:<8} {statistics.median(xs):>14,.0f} "
                      f"{min(xs):>14,.0f} {max(xs):>14,.0f}")
    for name, why in skipped.items():
        print(f"{name:<20} skipped: {why}")
    print()
    for r in results:
        print(f"ratio harness/C ({r.bench.label}): {r.ratio:.3f} (target >= {r.bench.target:.2f})")
        for k in r.bench.secondary:
            c, h = statistics.median(r.extra_c[k]), statistics.median(r.extra_harness[k])
            print(f"  {k}: harness/C {h / c if c else float('nan'):.3f} (informational)")


def run_main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: /dev/kvm is missing or not read-writable by this user: every pair needs a real KVM",
              file=sys.stderr)
        return 4
    names = args.only or list(BENCHES)
    results: list[Result] = []
    skipped: dict[str, str] = {}
    for n in names:
        b = BENCHES[n]
        why = b.skip_reason()
        if why:
            skipped[n] = why
            print(f"  {n}: skipped: {why}", file=sys.stderr, flush=True)
            continue
        results.append(measure(b, getattr(args, b.count_option), args.rounds))
    print_table(results, skipped)
    if args.json is not None or args.record_dir is not None:
        rec = record.make_record({r.bench.name: r.as_dict() for r in results}, skipped, args.rounds)
        if args.record_dir is not None:
            path = record.write_record(rec, args.record_dir)
            print(f"\nrecord: {path}")
        if args.json is not None:
            problems = record.validate(rec)
            if problems:
                raise ValueError("bench record does not follow its schema: " + "; ".join(problems))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rec, indent=2) + "\n")
            print(f"record: {args.json}")
    if args.check and any(r.ratio < r.bench.target for r in results):
        return 1
    return 0


def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compare",
                                 description="Compare two bench records (B against A); exit 0 unless "
                                             "--fail-above finds a ratio that got worse.")
    ap.add_argument("a", type=Path, metavar="A.json", help="the older record (the baseline)")
    ap.add_argument("b", type=Path, metavar="B.json", help="the newer record")
    ap.add_argument("--fail-above", type=float, metavar="PCT",
                    help="exit 1 when a harness/C ratio fell by more than PCT %% from A to B")
    args = ap.parse_args(argv)
    if args.fail_above is not None and args.fail_above < 0:
        ap.error("--fail-above must be >= 0")
    try:
        a, b = record.load_record(args.a), record.load_record(args.b)
    except (OSError, ValueError) as e:
        print(f"bench compare: {e}", file=sys.stderr)
        return 2
    cmp = record.compare(a, b, args.fail_above)
    print(cmp.render())
    return cmp.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
