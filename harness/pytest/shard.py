"""`--shard I/N`: run one of N disjoint slices of the collected cases (1-based I).

The kernel runner's `--shards N` boots N guests side by side (one TCG vCPU each, so N host cores)
and gives guest I `--shard I/N` (harness/qemu/runner.py); any other N processes can split a run the
same way. Cases go, in the final collection order, each to the shard with the least weight so far
(ties: the lowest): with equal weights that is round-robin (case k to shard k mod N + 1), so every
file's cases spread over all shards; a case marked `@pytest.mark.shard_weight(n)` counts as n
ordinary cases (the few that take minutes under TCG: in the first 2-shard run of debian:7.3.4 all
four landed in one shard, 560 s against 435 s). The N slices are disjoint and together the whole
collection, as long as every shard collects the same list (same args, same tree).

The deselection wraps every other pytest_collection_modifyitems (core.py's deselection of soak cases
and backings, any conftest's reordering): it cuts the final order. Under xdist only the workers
collect, each the same list (xdist checks that), so each worker cuts it the same way and the
controller schedules the one slice; nothing runs in the controller, which collects nothing.

Each shard says what it got on one line, `shard I/N: runs K of M collected cases`; the runner reads
it to tell a shard that got no case (fewer cases than shards: pytest then answers "no tests", the
bisect code 128) from a selection that collects nothing at all.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, TypeVar

import pytest

from harness.pytest import options

pytest_plugins = ["harness.pytest.core"]  # declares the option (options.py)

T = TypeVar("T")


def split(items: Sequence[T], i: int, n: int, weights: Sequence[float] | None = None) -> tuple[list[T], list[T]]:
    """(shard i's items, the others), i counting from 1: each item in order to the shard with the
    least total weight so far, the lowest on a tie (equal weights: item k to shard k % n + 1)."""
    load = [0.0] * n
    keep, drop = [], []
    for k, it in enumerate(items):
        s = min(range(n), key=load.__getitem__)
        load[s] += 1.0 if weights is None else weights[k]
        (keep if s == i - 1 else drop).append(it)
    return keep, drop


def weight(item: pytest.Item) -> float:
    m = item.get_closest_marker("shard_weight")
    return float(m.args[0]) if m is not None and m.args else 1.0


def summary(i: int, n: int, kept: int, collected: int) -> str:
    """The line the kernel runner reads (harness/qemu/runner.py: _SHARD_LINE)."""
    return f"shard {i}/{n}: runs {kept} of {collected} collected cases (round-robin, balanced by shard_weight)"


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    options.shard(config)  # a bad --shard is a usage error before any collection


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Generator[None, Any, Any]:
    res = yield  # every other implementation first: the slice is cut from the final order
    spec = options.shard(config)
    if spec is None:
        return res
    i, n = spec
    keep, drop = split(items, i, n, [weight(it) for it in items])
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and not hasattr(config, "workerinput"):
        tr.write_line(summary(i, n, len(keep), len(keep) + len(drop)))
    return res
