"""Bisect mode answers in `git bisect run`'s exit codes: 0 good, 1 bad, 125 cannot test here, 128
abort (the command can never test anything: nothing collected, a collection or usage error).

Both entry points: `python -m harness bisect -- <pytest args>` and `pytest --bisect`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli.bisect import ABORT, BAD, GOOD, SKIP, verdict

CASES = '''
import pytest
from harness.kvm.caps import Cap

def test_good(kvm):
    assert kvm.api_version == 12

def test_bad(kvm):
    assert kvm.api_version == 11, "pretend the new kernel broke this"

@pytest.mark.requires_cap(Cap.XEN_HVM, 0x7FFFFFFF)
def test_needs_a_capability_no_kernel_has(kvm):
    pass

def test_needs_hugepages(hugepages_missing):
    pass

@pytest.fixture
def hugepages_missing():
    pytest.skip("cannot reserve 1 GiB hugepages: pool is 0 and nr_hugepages write gave 0")
'''


def _need_kvm() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs a usable /dev/kvm for the good/bad verdicts")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    env.update(extra)
    return env


def _target(tmp: Path, select: str) -> str:
    """test_b.py::select; a select with a "/" or ".py" is a path of its own (typos included)."""
    if "/" in select or ".py" in select:
        return str(tmp / select)
    return f"{tmp / 'test_b.py'}::{select}" if select else str(tmp / "test_b.py")


def _cli(tmp: Path, select: str, *more: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", "bisect", "--", "-p", "harness.pytest.plugin", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(tmp), *more, _target(tmp, select)],
        capture_output=True, text=True, timeout=300, cwd=tmp, env=_env(**env))


def _flag(tmp: Path, select: str, *more: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.pytest.plugin", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp), "--bisect", *more, _target(tmp, select)],
        capture_output=True, text=True, timeout=300, cwd=tmp, env=_env(**env))


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    (tmp_path / "test_b.py").write_text(CASES)
    return tmp_path


@pytest.mark.parametrize("run", [_cli, _flag], ids=["cli", "flag"])
def test_good_is_0(cases, run):
    _need_kvm()
    p = run(cases, "test_good")
    assert p.returncode == GOOD == 0, p.stdout + p.stderr
    assert "bisect: 1 passed, 0 failed" in p.stdout


@pytest.mark.parametrize("run", [_cli, _flag], ids=["cli", "flag"])
def test_bad_is_1(cases, run):
    _need_kvm()
    p = run(cases, "test_bad")
    assert p.returncode == BAD == 1, p.stdout + p.stderr
    assert "pretend the new kernel broke this" in p.stdout


@pytest.mark.parametrize("run", [_cli, _flag], ids=["cli", "flag"])
@pytest.mark.parametrize("select", ["test_needs_a_capability_no_kernel_has", "test_needs_hugepages"])
@pytest.mark.parametrize("outcome", [False, True], ids=["plain", "outcome-plugin"])
def test_cannot_test_is_125(cases, run, select, outcome):
    """Every selected case skipped: 125, also when harness.pytest.outcome (loaded by the repo's
    conftest) has turned the all-skipped run into exit 4."""
    p = run(cases, select, *(["-p", "harness.pytest.outcome"] if outcome else []))
    assert p.returncode == SKIP == 125, p.stdout + p.stderr
    assert "cannot test (skip), exit 125" in p.stdout + p.stderr


# A selection that can never test anything, on any kernel: answering 125 would make `git bisect run`
# skip every commit. Each must abort the bisect (128) and say why.
NOTHING = {
    "missing-file": ("cases/does_not_exist.py", (), "usage error"),
    "missing-test": ("test_does_not_exist", (), "usage error"),
    "k-matches-nothing": ("", ("-k", "no_such_case_anywhere"), "collected no cases"),
    "collection-error": ("test_broken.py", (), "collection error"),
}


@pytest.mark.parametrize("run", [_cli, _flag], ids=["cli", "flag"])
@pytest.mark.parametrize("what", sorted(NOTHING))
def test_a_selection_that_tests_nothing_aborts(cases, run, what):
    (cases / "test_broken.py").write_text("import no_such_module_anywhere\n")
    select, more, why = NOTHING[what]
    p = run(cases, select, *more)
    out = p.stdout + p.stderr
    assert p.returncode == ABORT == 128, out
    assert "ABORT the bisect: " in out and why in out, out


def test_an_option_pytest_refuses_aborts(cases):
    """A usage error before any session (--kvm-timeout must be > 0) is 128 from the CLI."""
    p = _cli(cases, "test_good", "--kvm-timeout=-5")
    assert p.returncode == ABORT, p.stdout + p.stderr
    assert "--kvm-timeout" in p.stderr and "usage error" in p.stdout, p.stdout + p.stderr


def test_git_bisect_run_stops_on_a_typo(tmp_path):
    """The end-to-end claim: under a real `git bisect run`, a selection naming no file stops the
    bisect at the first step instead of skipping through the range."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1")

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60)

    git("init", "-q")
    for i in range(4):
        (repo / "f").write_text(str(i))
        git("add", "f")
        git("commit", "-q", "-m", f"c{i}")
    assert git("bisect", "start", "HEAD", "HEAD~3").returncode == 0
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run(
        ["git", "bisect", "run", sys.executable, "-m", "harness", "bisect", "--", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(tmp_path), str(tmp_path / "cases" / "does_not_exist.py")],
        cwd=repo, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "bisect run failed" in out and "128" in out, out
    assert out.count("ABORT the bisect") == 1, out  # stopped at the first step
    assert "first bad commit" not in out and "only skipped commits" not in out, out


@pytest.mark.parametrize("run", [_cli, _flag], ids=["cli", "flag"])
def test_no_kvm_is_125(cases, run):
    p = run(cases, "test_good", KVM_HARNESS_DEV="/nonexistent/kvm")
    assert p.returncode == SKIP, p.stdout + p.stderr
    assert "/nonexistent/kvm" in p.stdout


def test_bad_wins_over_skips_and_parallel_runs_agree(cases):
    _need_kvm()
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.pytest.plugin", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(cases), "--bisect", "-n", "2", str(cases / "test_b.py")],
        capture_output=True, text=True, timeout=300, cwd=cases, env=_env())
    assert p.returncode == BAD, p.stdout + p.stderr


def test_verdict_table():
    assert verdict(0, passed=3, failed=0) == GOOD
    assert verdict(1, passed=3, failed=1) == BAD
    assert verdict(0, passed=0, failed=0, skipped=2) == SKIP  # all skipped
    assert verdict(4, passed=0, failed=0, skipped=2) == SKIP  # all skipped, as harness.pytest.outcome says it
    assert verdict(0, passed=2, failed=0, skipped=2) == GOOD  # some skipped, the rest passed
    assert verdict(5, passed=0, failed=0) == ABORT  # no tests collected
    assert verdict(4, passed=0, failed=0) == ABORT  # usage error
    assert verdict(2, passed=1, failed=0) == ABORT  # interrupted (collection error, Ctrl-C)
    assert verdict(3, passed=0, failed=0) == ABORT  # internal error
    assert verdict(2, passed=1, failed=1) == BAD  # a failure seen before the interrupt still counts
    assert (GOOD, BAD, SKIP) == (0, 1, 125)  # git: 0 good, 1-127 except 125 bad, 125 skip
    assert 128 <= ABORT <= 255  # anything outside 0-127 aborts `git bisect run`
