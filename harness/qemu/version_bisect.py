"""Bisect across packaged kernel versions: the step before `git bisect` in a kernel tree.

Between a good and a bad packaged kernel (in upstream version order, release candidates left out
unless asked for), binary-search with the runner's answers: 0 good, 1 bad, 125 cannot test (that
version is skipped and a neighbour tried, as `git bisect skip` does). Both ends are tested first:
a range whose ends do not hold says so at once instead of converging on nonsense.

The answer is the last good and the first bad version, and the upstream range to continue with
`git bisect` (stable tags v<good>..v<bad>; Debian's patches lie on top of those, so a commit found
upstream should be checked against the package's changelog too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from harness.qemu import debian, runner

FOUND, ENDS_WRONG, UNDECIDED = 0, 1, 125


def between(kernels: list[debian.Kernel], good: debian.Kernel, bad: debian.Kernel,
            include_rc: bool = False) -> list[debian.Kernel]:
    """The versions from good to bad inclusive, oldest first."""
    lo, hi = sorted((good.key, bad.key))
    return [k for k in kernels if lo <= k.key <= hi and (include_rc or not k.is_rc or k in (good, bad))]


def pick(lo: int, hi: int, skipped: set[int]) -> int | None:
    """The untested, unskipped index nearest the middle of (lo, hi)."""
    mid = (lo + hi) // 2
    for d in range(hi - lo):
        for i in (mid - d, mid + d):
            if lo < i < hi and i not in skipped:
                return i
    return None


def search(versions: list[debian.Kernel], test: Callable[[debian.Kernel], int],
           out: TextIO) -> tuple[int, int | None, int | None, list[int]]:
    """(code, index of last good, index of first bad, skipped indexes). versions[0] is the good end."""
    ends = {0: test(versions[0]), len(versions) - 1: test(versions[-1])}
    if ends[0] != runner.GOOD or ends[len(versions) - 1] != runner.BAD:
        say = {runner.GOOD: "passes", runner.BAD: "fails", runner.SKIP: "cannot be tested"}
        out.write(f"kernel bisect: the ends do not hold: {versions[0].name} {say.get(ends[0], ends[0])}, "
                  f"{versions[-1].name} {say.get(ends[len(versions) - 1], ends[len(versions) - 1])}\n")
        return ENDS_WRONG, None, None, []
    lo, hi = 0, len(versions) - 1
    skipped: set[int] = set()
    while hi - lo > 1:
        i = pick(lo, hi, skipped)
        if i is None:
            break
        code = test(versions[i])
        if code == runner.GOOD:
            lo = i
        elif code == runner.BAD:
            hi = i
        else:
            skipped.add(i)
    inside = sorted(s for s in skipped if lo < s < hi)
    return (FOUND if not inside else UNDECIDED), lo, hi, inside


def bisect(good: str, bad: str, pytest_args: list[str], make_config: Callable[[Path, Path | None], runner.RunConfig],
           *, include_rc: bool = False, out: TextIO, archive: debian.Archive | None = None,
           run: Callable[[runner.RunConfig, TextIO], runner.RunResult] = runner.run) -> int:
    a = archive or debian.Archive()
    g, b = a.resolve(good), a.resolve(bad)
    if g.key >= b.key:
        out.write(f"kernel bisect: --good {g.name} is not older than --bad {b.name}\n")
        return 2
    every = between(a.kernels(), g, b, include_rc)
    versions = [k for k in every if k.complete]
    gone = [k.upstream for k in every if not k.complete]
    out.write(f"kernel bisect: {len(versions)} packaged versions from {g.name} to {b.name}: "
              f"{' '.join(k.upstream for k in versions)}\n")
    if gone:
        out.write(f"kernel bisect: left out (the archive no longer has their modules): {' '.join(gone)}\n")
    steps: list[tuple[str, int, str, float]] = []

    def test(k: debian.Kernel) -> int:
        t0 = time.monotonic()
        try:
            f = a.fetch(k, log=lambda m: out.write(m + "\n"))
        except debian.KernelFetchError as e:
            out.write(f"kernel bisect: {e}: cannot test\n")
            steps.append((k.name, runner.SKIP, "fetch", time.monotonic() - t0))
            return runner.SKIP
        out.write(f"kernel bisect: testing {k.name} ({k.abi})\n")
        res = run(make_config(f.vmlinuz, f.modules), out)
        runner.report(res, out)
        steps.append((k.name, res.code, res.outcome, time.monotonic() - t0))
        return res.code

    code, lo, hi, skipped = search(versions, test, out)
    out.write("kernel bisect: steps:\n")
    for name, c, outcome, secs in steps:
        out.write(f"  {name:<20} exit {c:<3} ({outcome}, {secs:.0f} s)\n")
    if code == ENDS_WRONG:
        return code
    last_good, first_bad = versions[lo], versions[hi]  # type: ignore[index]
    if skipped:
        out.write(f"kernel bisect: undecided: {', '.join(versions[i].name for i in skipped)} could not be tested; "
                  f"the change is between {last_good.name} and {first_bad.name}\n")
    else:
        out.write(f"kernel bisect: last good {last_good.name} ({last_good.version}), "
                  f"first bad {first_bad.name} ({first_bad.version})\n")
    out.write(f"kernel bisect: continue upstream (linux-stable tags; Debian's patches lie on top):\n"
              f"  git bisect start v{first_bad.upstream} v{last_good.upstream}\n")
    return code
