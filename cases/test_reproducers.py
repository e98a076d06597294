"""The standalone reproducers of the kernel bugs in known-issues.toml, run so they do not rot.

Each known issue may name a `reproducer`: one C file a KVM maintainer can build and run without this
project (`gcc -O2 -o x x.c && ./x`). Its exit code is the verdict: 0 the kernel behaves correctly,
1 the bug reproduced (its output is the evidence), 4 it cannot test here (it prints why); anything
else means the reproducer itself broke. Here each one is compiled with gcc into this session's
temporary folder (the QEMU runner's guest sees the repository read-only) and run with a timeout:
0 passes, 1 fails with the reproducer's output, 4 skips with its reason. Where the issue is in force
the known-issues machinery turns the case into a strict xfail, like the suite's own case for the bug.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness import known_issues

EXIT_OK, EXIT_BUG, EXIT_CANNOT_TEST = 0, 1, 4
BUILD_TIMEOUT = 120
RUN_TIMEOUT = 180  # the reproducers bound themselves (the dirty-ring one: alarm at 60 s); TCG is slow


def _with_reproducer() -> list[known_issues.KnownIssue]:
    return [ki for ki in known_issues.load() if ki.reproducer]


def _source(ki: known_issues.KnownIssue) -> Path:
    return known_issues.default_file().parent / ki.reproducer


@pytest.fixture(scope="session")
def build_reproducer(tmp_path_factory):
    """build_reproducer(src) -> the executable, compiled once per session (and xdist worker)."""
    gcc = shutil.which("gcc")
    out = tmp_path_factory.mktemp("reproducers")
    built: dict[Path, Path] = {}

    def build(src: Path) -> Path:
        if gcc is None:
            pytest.skip(f"no gcc on PATH to build {src.name}")
        if src not in built:
            exe = out / src.stem
            r = subprocess.run([gcc, "-O2", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True,
                               timeout=BUILD_TIMEOUT)
            if r.returncode != 0:
                pytest.fail(f"gcc could not build {src}:\n{r.stderr.strip()}", pytrace=False)
            built[src] = exe
        return built[src]

    return build


def _verdict(output: str, prefix: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(prefix)]
    return lines[-1][len(prefix):].strip() if lines else ""


@pytest.mark.parametrize("ki", [pytest.param(ki, id=ki.id) for ki in _with_reproducer()])
@pytest.mark.shard_weight(15)  # builds and runs a C program: 8-30 s each under TCG
def test_reproducer(ki, build_reproducer, case_property):
    """The reproducer named by the known issue reports the kernel correct (exit 0)."""
    src = _source(ki)
    exe = build_reproducer(src)
    try:
        r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=exe.parent)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{ki.reproducer} did not finish in {RUN_TIMEOUT} s (it bounds itself: a hang in the "
                    f"kernel or the reproducer):\n{out.strip()}", pytrace=False)
    output = (r.stdout + r.stderr).strip()
    case_property("reproducer_exit", r.returncode)
    case_property("reproducer_output", output)
    if r.returncode == EXIT_OK:
        print(output)  # shown with -rP / -rA: what the kernel answered
        return
    if r.returncode == EXIT_BUG:
        pytest.fail(f"kernel bug reproduced ({ki.id}, {ki.reproducer} exited 1): {_verdict(output, 'BUG:')}\n"
                    f"{output}", pytrace=False)
    if r.returncode == EXIT_CANNOT_TEST:
        pytest.skip(f"{ki.reproducer} cannot test here: {_verdict(output, 'SKIP:') or output}")
    how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
    pytest.fail(f"{ki.reproducer} itself failed: {how} (0 = correct, 1 = bug, 4 = cannot test):\n{output}",
                pytrace=False)
