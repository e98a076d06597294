"""pytest options for race cases (soak runs and exact reruns)."""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    g = parser.getgroup("kvm-harness races")
    g.addoption("--race-seconds", type=float, default=None, help="duration of each race case (default ~1 s)")
    g.addoption("--race-seed", type=int, default=None, help="seed for every race case (default: random, printed)")
