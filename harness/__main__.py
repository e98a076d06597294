"""Command line: `python -m harness info | bisect -- <pytest args>`."""

from __future__ import annotations

import argparse
import sys

from harness.cli import bisect, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="kernel, KVM capabilities, MAXPHYADDR, pools, and what will skip")
    b = sub.add_parser("bisect", help="run pytest, exit 0 good / 1 bad / 125 cannot test (git bisect run)")
    b.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "info":
        return info.main()
    if args.cmd == "bisect":
        rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
        return bisect.main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
