"""Known issues checked against reality: each entry's kernel range against the matrix's cells.

Inside its range a known issue's case must xfail (it reproduces); an XPASS there says the range is
too wide (the kernel got fixed: narrow `kernel` to end before it). Outside its range the case runs
plain; a failure there says the range is too narrow (the bug is older, or not fixed yet).
"""

from __future__ import annotations

from pathlib import Path

from harness import known_issues
from harness.matrix.cells import KernelRun


def config_of(path: Path | None) -> frozenset[str]:
    if path is None or not path.exists():
        return frozenset()
    return frozenset(ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.startswith("CONFIG_"))


def disagreements(runs: list[KernelRun], issues: list[known_issues.KnownIssue],
                  configs: dict[str, frozenset[str]], environments: dict[str, str] | None = None) -> list[str]:
    """environments: kernel -> "tcg"/"kvm"/"" (how the run's CPU was provided), for emulator entries."""
    out = []
    for ki in issues:
        for r in runs:
            if not r.release or not r.cells:
                continue
            env = (environments or {}).get(r.kernel, "")
            if ki.environment and not env:
                continue  # an emulator's entry says nothing about a run that had none
            applies = ki.applies(release=r.release, backend_name=r.backend or "unknown",
                                 config=configs.get(r.kernel, frozenset()), environment=env,
                                 paging=r.paging or "unknown")
            for case, c in sorted(r.cells.items()):
                if not ki.matches(case):
                    continue
                if applies and c.outcome == "xpass" and c.strict:
                    out.append(f"{ki.id}: {r.kernel} ({r.release}) is inside kernel = {ki.kernel!r} but "
                               f"{case} XPASSes: the bug is fixed there; end the range before {r.release}")
                elif not applies and c.outcome == "fail" and _backend_ok(ki, r):
                    out.append(f"{ki.id}: {r.kernel} ({r.release}) is outside kernel = {ki.kernel!r} but "
                               f"{case} fails: {c.detail[:160]}")
    return out


def _backend_ok(ki: known_issues.KnownIssue, r: KernelRun) -> bool:
    """A backend-specific entry says nothing about other backends' failures."""
    return not ki.backend or ki.backend == r.backend
