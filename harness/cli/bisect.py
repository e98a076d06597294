"""Bisect mode: run the selected cases and answer in `git bisect run`'s exit codes.

0 good (every selected case that ran passed, xfails included), 1 bad (a case failed or XPASSed
strictly), 125 cannot test this commit (no usable /dev/kvm, or every selected case skipped here),
128 abort the bisect: the command itself is wrong, whatever the kernel, so every step would answer
the same and a skip would walk through the whole range (a selection that collects nothing, a
collection error, a usage error, pytest's internal error, an interrupt). git bisect run aborts on
any code other than 0-127.
"""

from __future__ import annotations

import os

import pytest

GOOD, BAD, SKIP, ABORT = 0, 1, 125, 128
KSELFTEST_SKIP = 4  # what harness.pytest.outcome makes of a run whose every case skipped


class _Tally:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.skip_reasons: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.failed:
            self.failed += 1
        elif report.skipped:
            if hasattr(report, "wasxfail"):
                self.passed += 1  # an expected failure of a known issue: this kernel is as known
            else:
                self.skipped += 1
                if isinstance(report.longrepr, tuple):
                    self.skip_reasons.append(str(report.longrepr[2]))


class BisectVerdict(_Tally):
    """`pytest --bisect`: the session's exit status becomes the bisect verdict. An option pytest
    cannot parse stops it before any plugin runs: it exits 4 then, which git bisect run takes for
    "bad"; `python -m harness bisect` answers 128 for that too (docs/bisect.md)."""

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        v = verdict(int(exitstatus), self.passed, self.failed, self.skipped)
        tr = session.config.pluginmanager.getplugin("terminalreporter")
        if tr is not None:
            for line in summary(v, int(exitstatus), self):
                tr.write_line(line)
        session.exitstatus = v
        if exitstatus == pytest.ExitCode.USAGE_ERROR:
            # a UsageError raised in the session (a path that does not exist) is re-raised after
            # this hook and pytest.main returns 4, which git bisect run would take for "bad":
            # replace it with the exit that aborts the bisect
            raise SystemExit(v)


def verdict(exit_code: int, passed: int, failed: int, skipped: int = 0) -> int:
    """The bisect answer from pytest's exit code and what the cases reported."""
    if failed or exit_code == pytest.ExitCode.TESTS_FAILED:
        return BAD
    if exit_code == pytest.ExitCode.OK and passed:
        return GOOD
    if skipped and not passed and exit_code in (pytest.ExitCode.OK, KSELFTEST_SKIP):
        return SKIP  # cases ran and skipped here: this commit cannot be tested (4: pytest_outcome's code)
    # nothing collected, collection/usage/internal error, interrupted: the command is wrong, not the
    # kernel; a skip would make git bisect run skip every commit
    return ABORT


def _why(v: int, exit_code: int) -> str:
    if v != ABORT:
        return {GOOD: "good", BAD: "bad", SKIP: "cannot test (skip)"}[v]
    what = {pytest.ExitCode.NO_TESTS_COLLECTED: "the selection collected no cases",
            pytest.ExitCode.INTERRUPTED: "interrupted (a collection error, or Ctrl-C)",
            pytest.ExitCode.USAGE_ERROR: "pytest usage error (a bad option, or a path or node id that does not exist)",
            pytest.ExitCode.INTERNAL_ERROR: "pytest internal error"}.get(exit_code, "no verdict from pytest")
    return f"ABORT the bisect: {what}; fix the command, this says nothing about the kernel"


def summary(v: int, exit_code: int, tally: _Tally) -> list[str]:
    lines = [f"bisect: {tally.passed} passed, {tally.failed} failed, {tally.skipped} skipped "
             f"(pytest exit {exit_code}) -> {_why(v, exit_code)}, exit {v}"]
    if v == SKIP:
        lines += [f"bisect:   skipped because: {r}" for r in sorted(set(tally.skip_reasons))[:10]]
    return lines


def main(pytest_args: list[str]) -> int:
    dev = os.environ.get("KVM_HARNESS_DEV", "/dev/kvm")
    if not os.path.exists(dev):
        print(f"bisect: {dev} does not exist: cannot test this kernel (exit 125)")
        return SKIP
    tally = _Tally()
    code = pytest.main(pytest_args, plugins=[tally])
    v = verdict(int(code), tally.passed, tally.failed, tally.skipped)
    for line in summary(v, int(code), tally):
        print(line)
    return v


def register(sub) -> None:
    p = sub.add_parser("bisect", help="run pytest, exit 0 good / 1 bad / 125 cannot test / 128 abort "
                       "(git bisect run)")
    p.add_argument("pytest_args", nargs="...")


def run(args) -> int:
    rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    return main(rest)
