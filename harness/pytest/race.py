"""The `race` fixture for race cases (soak runs and exact reruns).

    def test_x(race):
        race("shmem", ("punch",), vcpus=2)        # runs, records properties, fails with the report

--race-seconds N sets each case's duration (default options.DEFAULT_RACE_SECONDS); --race-seed S fixes
the seed (default: random per process, printed in every report and in the rerun command). Both are
declared in harness.pytest.options; soak cases are deselected without --race-seconds by
harness.pytest.core.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from harness import memory
from harness.kvm.watchdog import WATCHDOG
from harness.memory import PAGE_4K
from harness.memory.hugepages import HugepagesUnavailable
from harness.pytest import options
from harness.race import ORACLES, Race, RaceGoal, RaceReport, RaceSpec

if TYPE_CHECKING:
    from harness.kvm.system import Kvm

pytest_plugins = ["harness.pytest.core"]


def pytest_report_header(config: pytest.Config) -> str | None:
    if options.seed_given(config) or options.race_seconds_given(config):
        return f"race: seed {options.seed(config)}, {options.race_seconds(config):g} s per case"
    return None


def rerun_command(request: pytest.FixtureRequest, seed: int) -> str:
    """The exact command line that reruns this case with this seed (from the repo root)."""
    cfg = request.config
    root = str(cfg.rootpath)
    exe = sys.executable
    rel = os.path.relpath(exe, root)
    py = rel if not rel.startswith("..") else exe
    argv = [py, "-m", "pytest", request.node.nodeid, "--race-seed", str(seed)]
    secs = options.race_seconds_given(cfg)
    if secs:
        argv += ["--race-seconds", f"{secs:g}"]
    return f"cd {shlex.quote(root)} && " + " ".join(shlex.quote(a) for a in argv)


class RaceRunner:
    """The `race` fixture: run one race, record what it achieved, fail with the report."""

    def __init__(self, request: pytest.FixtureRequest, kvm: Kvm, backings: Callable[..., Any]) -> None:
        self.request = request
        self.kvm = kvm
        self.backings = backings
        self.seconds = options.race_seconds(request.config)
        # without --race-seconds a case races to its goal (at most the default duration); a soak runs it all
        self.goal = None if options.race_seconds_given(request.config) else RaceGoal()
        self.seed = options.seed(request.config)
        self.last: RaceReport | None = None

    def __call__(self, kind: str, disruptors: tuple[str, ...], *, vcpus: int = 1, page: int = PAGE_4K,
                 oracles: tuple[str, ...] = ORACLES, progress_bound: float = 5.0,
                 seconds: float | None = None, kvmclock: bool = False) -> RaceReport:
        req = self.request
        secs = self.seconds if seconds is None else seconds
        cs = getattr(req.node, "callspec", None)
        label = f"{req.node.originalname}[{cs.id}]" if cs is not None else req.node.name
        spec = RaceSpec(kind, tuple(disruptors), vcpus=vcpus, page=page, seconds=secs, seed=self.seed,
                        progress_bound=progress_bound, label=label, kvmclock=kvmclock,
                        goal=self.goal if seconds is None else None)
        # soaks outlive the per-test KVM_RUN bound: give this case its own
        WATCHDOG.set_global_deadline(secs + 8 * progress_bound + 120,
                                     f"race case exceeded {secs:g} s + its stop bounds")
        req.node.user_properties.append(("race_seed", self.seed))
        req.node.user_properties.append(("oracles", ",".join(oracles)))

        def make(k: str, size: int, vm: Any) -> Any:
            self._spare_hugepages(k, vcpus + int(kvmclock))
            return self.backings(k, size, vm=vm)

        race = Race(self.kvm, spec, make)  # RaceUnsupported is an Unsupported: a skip with its reason
        try:
            report = race.run()
        finally:
            race.close()
        self.last = report
        for k, v in report.properties():
            if k != "race_seed":
                req.node.user_properties.append((k, v))
        print(report.summary())
        print(f"seed {self.seed}: {rerun_command(req, self.seed)}")
        fails = report.failures(oracles)
        if fails:
            pytest.fail(report.failure_message(fails, rerun_command(req, self.seed)), pytrace=False)
        return report

    def _spare_hugepages(self, kind: str, n: int) -> None:
        """A race on hugetlb keeps n free pages in the pool beyond the region's (one per vCPU, one
        for the kvmclock page), best effort. A punched page goes back to the pool only when its last
        reference drops, and a vCPU's fault in flight (or a pfn cache refresh) holds one: the host's
        tag write that faults the range back in then needs another page, and with the pool exactly
        the region's size the fault is SIGBUS, which kills the harness (debian:7.3.4 under TCG, punch
        on hugetlb-2m with kvmclock). Under xdist parked pages gave this slack by chance."""
        need = memory.kind(kind).hugepages(1)
        if need is None or n <= 0:
            return
        try:
            self.backings.hugepages.pool.reserve(need[0], n)
        except HugepagesUnavailable as e:
            self.request.node.user_properties.append(("spare_hugepages", f"0 ({e})"))
        else:
            self.request.node.user_properties.append(("spare_hugepages", str(n)))


@pytest.fixture
def race(request: pytest.FixtureRequest, kvm: Kvm, backings: Any) -> RaceRunner:
    """Run a race on a backing kind (hugepages reserved, skips with the reason); see RaceRunner."""
    return RaceRunner(request, kvm, backings)
