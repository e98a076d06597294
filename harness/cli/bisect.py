"""Bisect mode: run the selected cases and answer in `git bisect run`'s exit codes.

0 good (every selected case that ran passed, xfails included), 1 bad (a case failed or XPASSed
strictly), 125 cannot test (no usable /dev/kvm, nothing ran because everything skipped, or pytest
itself could not run). Anything else would abort the bisect, so nothing else is returned.
"""

from __future__ import annotations

import os

import pytest

GOOD, BAD, SKIP = 0, 1, 125


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
    """`pytest --bisect`: the session's exit status becomes the bisect verdict."""

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        v = verdict(int(exitstatus), self.passed, self.failed)
        tr = session.config.pluginmanager.getplugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"bisect: {self.passed} passed, {self.failed} failed, {self.skipped} skipped "
                          f"(pytest exit {int(exitstatus)}) -> exit {v}")
            if v == SKIP:
                for r in sorted(set(self.skip_reasons))[:10]:
                    tr.write_line(f"bisect:   skipped because: {r}")
        session.exitstatus = v


def verdict(exit_code: int, passed: int, failed: int) -> int:
    if failed or exit_code == pytest.ExitCode.TESTS_FAILED:
        return BAD
    if exit_code == pytest.ExitCode.OK and passed:
        return GOOD
    return SKIP  # no tests, all skipped, usage/internal error, interrupted


def main(pytest_args: list[str]) -> int:
    dev = os.environ.get("KVM_HARNESS_DEV", "/dev/kvm")
    if not os.path.exists(dev):
        print(f"bisect: {dev} does not exist: cannot test this kernel (exit 125)")
        return SKIP
    tally = _Tally()
    code = pytest.main(pytest_args, plugins=[tally])
    v = verdict(int(code), tally.passed, tally.failed)
    word = {GOOD: "good", BAD: "bad", SKIP: "cannot test (skip)"}[v]
    print(f"bisect: {tally.passed} passed, {tally.failed} failed, {tally.skipped} skipped "
          f"(pytest exit {int(code)}) -> {word}, exit {v}")
    if v == SKIP and tally.skip_reasons:
        for r in sorted(set(tally.skip_reasons))[:10]:
            print(f"bisect:   skipped because: {r}")
    return v


def register(sub) -> None:
    p = sub.add_parser("bisect", help="run pytest, exit 0 good / 1 bad / 125 cannot test (git bisect run)")
    p.add_argument("pytest_args", nargs="...")


def run(args) -> int:
    rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    return main(rest)
