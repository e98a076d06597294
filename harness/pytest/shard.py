"""`--shard I/N`: run one of N disjoint slices of the collected cases (1-based I).

The kernel runner's `--shards N` boots N guests side by side (one TCG vCPU each, so N host cores)
and gives guest I `--shard I/N` (harness/qemu/runner.py); any other N processes can split a run the
same way. Each case has a weight, its measured seconds under TCG (cases/durations.json, see
harness/pytest/durations.py; a case the file does not name weighs its `default`, times n with
`@pytest.mark.shard_weight(n)`). The cases are dealt heaviest first, each to the shard with the
least weight so far (ties: the lowest shard, then the earlier case), and each shard runs its cases
in the collection order. With equal weights that is round-robin (case k to shard k mod N + 1). By
count alone the first sharded runs of debian:7.3.4 were uneven: all four minute-scale cases in one
guest (560 s against 435 s), then 604 s against 564 s. The N slices are disjoint and together the
whole collection, as long as every shard collects the same list (same args, same tree, same file).

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
from harness.pytest.durations import DEFAULT_FILE, Durations, load

pytest_plugins = ["harness.pytest.core"]  # declares the option (options.py)

T = TypeVar("T")


def split(items: Sequence[T], i: int, n: int, weights: Sequence[float] | None = None) -> tuple[list[T], list[T]]:
    """(shard i's items, the others), i counting from 1, both in the items' order: heaviest first,
    each item to the shard with the least total weight so far, the lowest on a tie (equal weights:
    item k to shard k % n + 1)."""
    w = [1.0] * len(items) if weights is None else list(weights)
    load = [0.0] * n
    shard_of = [0] * len(items)
    for k in sorted(range(len(items)), key=lambda k: (-w[k], k)):
        s = min(range(n), key=load.__getitem__)
        load[s] += w[k]
        shard_of[k] = s
    keep = [it for k, it in enumerate(items) if shard_of[k] == i - 1]
    drop = [it for k, it in enumerate(items) if shard_of[k] != i - 1]
    return keep, drop


def weight(item: pytest.Item, durations: Durations | None = None) -> float:
    """The case's measured seconds; else the file's default (1 without a file) times its
    shard_weight mark's n."""
    if durations is not None:
        secs = durations.of(item.nodeid)
        if secs is not None:
            return max(secs, 0.001)
    m = item.get_closest_marker("shard_weight")
    n = float(m.args[0]) if m is not None and m.args else 1.0
    return n * (durations.default if durations is not None else 1.0)


def _durations(config: pytest.Config) -> Durations | None:
    try:
        return load(config.rootpath / DEFAULT_FILE)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from e


def summary(i: int, n: int, kept: int, collected: int, measured: bool = True) -> str:
    """The line the kernel runner reads (harness/qemu/runner.py: _SHARD_LINE)."""
    how = "measured durations" if measured else f"count and shard_weight: no {DEFAULT_FILE}"
    return f"shard {i}/{n}: runs {kept} of {collected} collected cases (balanced by {how})"


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
    durations = _durations(config)
    keep, drop = split(items, i, n, [weight(it, durations) for it in items])
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and not hasattr(config, "workerinput"):
        tr.write_line(summary(i, n, len(keep), len(keep) + len(drop), durations is not None))
    return res
