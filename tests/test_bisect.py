"""Bisect mode answers in `git bisect run`'s exit codes: 0 good, 1 bad, 125 cannot test here.

Both entry points: `python -m harness bisect -- <pytest args>` and `pytest --bisect`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli.bisect import BAD, GOOD, SKIP, verdict

CASES = '''
import pytest
from harness.caps import Cap

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


def _cli(tmp: Path, select: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", "bisect", "--", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(tmp), f"{tmp / 'test_b.py'}::{select}" if select else str(tmp / "test_b.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp, env=_env(**env))


def _flag(tmp: Path, select: str, *more: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp), "--bisect", *more, f"{tmp / 'test_b.py'}::{select}"],
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
def test_cannot_test_is_125(cases, run, select):
    p = run(cases, select)
    assert p.returncode == SKIP == 125, p.stdout + p.stderr


@pytest.mark.parametrize("run", [_cli, _flag], ids=["cli", "flag"])
def test_no_kvm_is_125(cases, run):
    p = run(cases, "test_good", KVM_HARNESS_DEV="/nonexistent/kvm")
    assert p.returncode == SKIP, p.stdout + p.stderr
    assert "/nonexistent/kvm" in p.stdout


def test_bad_wins_over_skips_and_parallel_runs_agree(cases):
    _need_kvm()
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(cases), "--bisect", "-n", "2", str(cases / "test_b.py")],
        capture_output=True, text=True, timeout=300, cwd=cases, env=_env())
    assert p.returncode == BAD, p.stdout + p.stderr


def test_verdict_table():
    assert verdict(0, passed=3, failed=0) == GOOD
    assert verdict(1, passed=3, failed=1) == BAD
    assert verdict(0, passed=0, failed=0) == SKIP  # all skipped
    assert verdict(5, passed=0, failed=0) == SKIP  # no tests collected
    assert verdict(4, passed=0, failed=0) == SKIP  # usage error
    assert verdict(2, passed=1, failed=0) == SKIP  # interrupted
    for v in (GOOD, BAD, SKIP):
        assert 0 <= v < 128  # anything >= 128 would abort `git bisect run`
