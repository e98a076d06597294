"""pytest options and the `race` fixture for race cases (soak runs and exact reruns).

    def test_x(race):
        race("shmem", ("punch",), vcpus=2)        # runs, records properties, fails with the report

--race-seconds N sets each case's duration (default DEFAULT_SECONDS); --race-seed S fixes the seed
(default: random per process, printed in every report and in the rerun command).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from harness.kvm.watchdog import WATCHDOG
from harness.lib.failures import seconds_arg
from harness.memory import PAGE_4K
from harness.race.engine import ORACLES, Race, RaceReport, RaceSpec, RaceUnsupported

if TYPE_CHECKING:
    from harness.kvm.system import Kvm

DEFAULT_SECONDS = 1.0


def seed(text: str) -> int:
    """argparse type of --race-seed: a non-negative integer, as reports print it."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the seed must be >= 0")
    return v


def pytest_addoption(parser) -> None:
    g = parser.getgroup("kvm-harness races")
    g.addoption("--race-seconds", type=seconds_arg, default=None,
                help="duration of each race case, seconds > 0 (default ~1 s)")
    g.addoption("--race-seed", type=seed, default=None,
                help="seed for every race case, an integer >= 0 (default: random, printed)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "race_soak: a long race, collected only with --race-seconds")
    seed = config.getoption("--race-seed", None)
    config._race_seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak cases run only when asked for (--race-seconds): the default suite stays ~1 s a case."""
    if config.getoption("--race-seconds", None):
        return
    soak = [it for it in items if it.get_closest_marker("race_soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [it for it in items if not it.get_closest_marker("race_soak")]


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption("--race-seed", None) is not None or config.getoption("--race-seconds", None):
        return (f"race: seed {config._race_seed}, "  # type: ignore[attr-defined]
                f"{config.getoption('--race-seconds') or DEFAULT_SECONDS:g} s per case")
    return None


def race_seconds(config: pytest.Config, default: float = DEFAULT_SECONDS) -> float:
    """How long a race case runs: --race-seconds, else the case's short default."""
    return config.getoption("--race-seconds") or default


def race_seed(config: pytest.Config) -> int:
    """The session's race seed: --race-seed, else one drawn at start and shown in the header."""
    return config._race_seed  # type: ignore[attr-defined]


def rerun_command(request: pytest.FixtureRequest, seed: int) -> str:
    """The exact command line that reruns this case with this seed (from the repo root)."""
    cfg = request.config
    root = str(cfg.rootpath)
    exe = sys.executable
    rel = os.path.relpath(exe, root)
    py = rel if not rel.startswith("..") else exe
    argv = [py, "-m", "pytest", request.node.nodeid, "--race-seed", str(seed)]
    secs = cfg.getoption("--race-seconds")
    if secs:
        argv += ["--race-seconds", f"{secs:g}"]
    return f"cd {shlex.quote(root)} && " + " ".join(shlex.quote(a) for a in argv)


class RaceRunner:
    """The `race` fixture: run one race, record what it achieved, fail with the report."""

    def __init__(self, request: pytest.FixtureRequest, kvm: Kvm, backings: Callable[..., Any]) -> None:
        self.request = request
        self.kvm = kvm
        self.backings = backings
        self.seconds = race_seconds(request.config)
        self.seed: int = request.config._race_seed  # type: ignore[attr-defined]
        self.last: RaceReport | None = None

    def __call__(self, kind: str, disruptors: tuple[str, ...], *, vcpus: int = 1, page: int = PAGE_4K,
                 oracles: tuple[str, ...] = ORACLES, progress_bound: float = 5.0,
                 seconds: float | None = None, kvmclock: bool = False) -> RaceReport:
        req = self.request
        secs = self.seconds if seconds is None else seconds
        cs = getattr(req.node, "callspec", None)
        label = f"{req.node.originalname}[{cs.id}]" if cs is not None else req.node.name
        spec = RaceSpec(kind, tuple(disruptors), vcpus=vcpus, page=page, seconds=secs, seed=self.seed,
                        progress_bound=progress_bound, label=label, kvmclock=kvmclock)
        # soaks outlive the per-test KVM_RUN bound: give this case its own
        WATCHDOG.set_global_deadline(secs + 8 * progress_bound + 120,
                                     f"race case exceeded {secs:g} s + its stop bounds")
        req.node.user_properties.append(("race_seed", self.seed))
        req.node.user_properties.append(("oracles", ",".join(oracles)))

        def make(k: str, size: int, vm: Any) -> Any:
            return self.backings(k, size, vm=vm)

        try:
            race = Race(self.kvm, spec, make)
        except RaceUnsupported as e:
            pytest.skip(str(e))
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


@pytest.fixture
def race(request: pytest.FixtureRequest, kvm: Kvm, backings: Any) -> RaceRunner:
    """Run a race on a backing kind (hugepages reserved, skips with the reason); see RaceRunner."""
    return RaceRunner(request, kvm, backings)
