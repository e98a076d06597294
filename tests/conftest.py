"""The harness's own tests: the `real_boot` marker and the order a parallel run takes them in.

`@pytest.mark.real_boot(seconds=N)` marks a test that boots kernels under QEMU (TCG here: minutes,
about N seconds measured) or builds one. `-m "not real_boot"` leaves them out (`make unit-fast`);
`make unit` runs them all.

Under xdist they are what decides the run's wall time: 4 of the ~1000 tests took 600 of 1300 s of
test time, and the default scheduling could leave two of them in a row on one worker at the end.
`--dist worksteal` (the Makefile's) gives each worker one contiguous half of the collection and lets
an idle worker steal from the tail of the other's; so the real boots, longest first, are put at the
head of the two halves alternately: both workers start on one, and the short tests fill in around
them from both ends.
"""

from __future__ import annotations

import pytest

REAL_BOOT = "real_boot(seconds=60): real kernels: fetched, booted under QEMU or built (about `seconds` here); " \
            "`-m 'not real_boot'` leaves these out"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", REAL_BOOT)


def _seconds(item: pytest.Item) -> float:
    m = item.get_closest_marker("real_boot")
    return float(m.kwargs.get("seconds", 60)) if m else 0.0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # the order matters only to xdist's scheduler
        return
    slow = sorted((it for it in items if _seconds(it)), key=_seconds, reverse=True)
    if not slow:
        return
    rest = [it for it in items if not _seconds(it)]
    half = len(items) // 2
    first, second = slow[0::2], slow[1::2]
    n_first = max(0, half - len(first))
    items[:] = first + rest[:n_first] + second + rest[n_first:]
