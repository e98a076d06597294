"""Named benchmark pairs: a C baseline and the same work through the harness.

Each pair is measured in the same invocation, alternating, so the ratio harness/C is what the
harness's Python layer costs on this host. Add a pair by writing a C program (built by
bench/Makefile, printing one JSON line with a rate key) and a Python function, then register().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BUILD_DIR = Path(__file__).resolve().parent / "build"


@dataclass(frozen=True)
class Bench:
    name: str  # registry key and JSON key
    label: str  # human name, used in the ratio line
    c_cmd: Callable[[int], list[str]]  # argv of the C baseline for `count` operations
    c_rate_key: str  # key of the rate in the C program's JSON line (and in the harness side's dict)
    # runs `count` operations through the harness, returns the rate, or a dict with c_rate_key and
    # the secondary keys
    py: Callable[[int], float | dict[str, float]]
    count_option: str  # CLI option (without "--") giving the operation count, e.g. "exits"
    default_count: int
    target: float  # minimum acceptable harness/C ratio
    secondary: tuple[str, ...] = ()  # other rates both sides report (printed with their ratio)
    unit: str = "ops/s"  # what the rate counts, for tables and the record
    # why this pair cannot run here (None: it can); asked once per run, before any round
    unavailable: Callable[[], str | None] | None = None
    # fixed parameters of the work besides the count (slot size, pinning...), kept in the record so
    # that compare can tell when two records did not measure the same thing
    params: dict[str, object] = field(default_factory=dict)

    def skip_reason(self) -> str | None:
        return self.unavailable() if self.unavailable is not None else None


BENCHES: dict[str, Bench] = {}


def register(bench: Bench) -> Bench:
    if bench.name in BENCHES:
        raise ValueError(f"benchmark {bench.name!r} registered twice")
    BENCHES[bench.name] = bench
    return bench


def c_program(name: str) -> Callable[[int], list[str]]:
    """argv builder for bench/build/<name> taking the count as its only argument."""
    path = BUILD_DIR / name

    def argv(count: int) -> list[str]:
        return [str(path), str(count)]

    return argv
