"""pytest fixtures for guest memory: hugepage pool reservations, private mounts, backings, memtouch.

Registered as a plugin (conftest.py `pytest_plugins`). A case says what memory it wants:

    @pytest.mark.parametrize("kind", memory.names())
    def test_x(kvm, backings, memtouch, kind):
        b = backings(kind, 2 << 20, vm=memtouch.vm)    # hugepages reserved, or a skip with the reason
        slot = memtouch.vm.add_memslot(1 << 40, 2 << 20, backing=b)

`--memory-backings=anon,shmem` keeps only the cases whose `kind` parameter is listed (the option and
its deselection live in harness.pytest.options and harness.pytest.core). What this machine cannot
give (a backing kind, hugepages) raises Unsupported, which harness.pytest.core makes a skip.

Whatever ends the run, nothing is left behind: SIGTERM and SIGHUP end every pytest process (the
xdist controller and each worker) like Ctrl-C does, so fixtures are torn down and the exit status is
2 (harness.memory.cleanup); what a SIGKILL leaves, the next session start gives back from the
machine-wide ledger (`recover_stale`, harness.memory.ledger).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness import memory
from harness.memory import cleanup
from harness.memory.backings import Backing, BackingUnavailable
from harness.memory.hugepages import HugepagePool, prune_stale, unpark
from harness.memory.ledger import LEDGER, Owner
from harness.memory.memtouch import MemTouch
from harness.memory.mounts import Mounts, cleanup_stale, close_default, default_mounts
from harness.pytest import options

if TYPE_CHECKING:
    from harness.kvm.system import Kvm
    from harness.kvm.vm import Vm

pytest_plugins = ["harness.pytest.core"]

DEFAULT_WAIT = 30.0  # seconds a case queues for hugepages another worker holds


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # As early as a plugin can: from here on SIGTERM/SIGHUP tear down like Ctrl-C (main thread only:
    # xdist runs its workers' sessions there too).
    cleanup.install(cleanup.WORKER_GRACE_S if hasattr(config, "workerinput") else cleanup.GRACE_S)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    """Around everything else at session end (fixture teardown, xdist waiting for its workers,
    reports): a SIGTERM now must not cut that short, only make the exit status non-zero."""
    with cleanup.holding():
        res = yield
    if cleanup.terminating() is not None and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.INTERRUPTED
    return res


_KEEPER = pytest.StashKey[str]()
_PARK_INPUT = "kvm_harness_park"  # workerinput key: the controller's keeper key


def pytest_unconfigure(config: pytest.Config) -> None:
    keeper = config.stash.get(_KEEPER, None)
    if keeper is not None:  # the workers are gone: the pool goes back to its size before the run
        unpark(keeper)
    cleanup.uninstall()


def _keeper(config: pytest.Config) -> str | None:
    """The controller of a parallel run keeps the hugetlb pages (2 MiB, 1 GiB) its workers' cases
    release, parked in the pool (harness.memory.hugepages), so a later case gets pages already
    populated (a 1 GiB page: ~0.7 s to fault in here, ~10 s when the pool just grew by it). The pool
    grows only when a case needs it, as before, and is back to its old size when the run ends."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None) \
            or not options.keep_hugepages(config) or os.geteuid() != 0:
        return None
    if _KEEPER not in config.stash:
        key = f"{Owner.current().key}:keeper"
        config.stash[_KEEPER] = key
        cleanup.register(lambda: unpark(key))  # SIGTERM's last resort gives them back too
    return config.stash[_KEEPER]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist (controller): tell each worker where to park the hugetlb pages it releases."""
    key = _keeper(node.config)
    if key:
        node.workerinput[_PARK_INPUT] = key


def _park_key(config: pytest.Config) -> str | None:
    wi = getattr(config, "workerinput", None)
    return wi.get(_PARK_INPUT) if wi else None


def recover_stale(ledger: Path = LEDGER, roots: list[str] | None = None) -> list[str]:
    """Give back what dead harness processes left (a SIGKILLed run, a crash): their hugepages, then
    the mounts, loop devices and folders the ledger records for them, wherever they are, then (runs
    from before the ledger) dead runs' folders in the default temp folders. Never touches what a
    live process holds. Returns what it gave back. This is what every session start runs."""
    try:
        cleaned = [f"hugepages: {p}" for p in prune_stale(ledger=ledger)]
    except OSError as e:
        warnings.warn(f"hugepage ledger {ledger}: {e}", stacklevel=1)
        cleaned = []
    return cleaned + cleanup_stale(roots, ledger_path=ledger)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Undo what a killed earlier run left: its mounts, loop devices and hugepage reservations."""
    if os.geteuid() != 0:
        return
    stale = recover_stale()
    if stale:
        warnings.warn(f"cleaned up what dead harness runs left mounted/attached/reserved: {stale}",
                      stacklevel=1)


class Hugepages:
    """The `hugepages` fixture: reserve(page_size, count), or HugepagesUnavailable (the case skips)."""

    def __init__(self, pool: HugepagePool, wait: float = DEFAULT_WAIT) -> None:
        self.pool = pool
        self.wait = wait

    def reserve(self, page_size: int, count: int) -> None:
        """Grow the pool by count pages; waits (bounded) while another worker holds pages of this
        size, then raises HugepagesUnavailable with the kernel's answer."""
        self.pool.reserve(page_size, count, wait=self.wait)

    def reserve_for(self, kind: str, size: int) -> None:
        """Reserve what a backing of this kind and size takes from a pool (nothing for most kinds)."""
        need = memory.kind(kind).hugepages(size)
        if need:
            self.reserve(*need)


class Backings:
    """The `backings` fixture: backings(kind, size, vm=None) -> a Backing closed after the case."""

    def __init__(self, hugepages: Hugepages, mounts: Mounts) -> None:
        self.hugepages = hugepages
        self.mounts = mounts
        self.made: list[Backing] = []

    def __call__(self, kind: str, size: int, *, vm: Vm | None = None) -> Backing:
        k = memory.kind(kind)
        self.hugepages.reserve_for(kind, k.min_size(size))
        # A hugetlb mmap can still find the pool short for a moment under -n N (another worker's
        # pages on their way out: measured once in CI as ENOMEM with 4 free): retry, bounded.
        deadline = time.monotonic() + (self.hugepages.wait if k.hugepages(k.min_size(size)) else 0)
        while True:
            try:
                b = memory.create(kind, size, vm=vm, mounts=self.mounts)
                break
            except BackingUnavailable as e:
                if "ENOMEM" not in str(e) or time.monotonic() >= deadline:
                    raise BackingUnavailable(f"backing {kind}: {e}") from e
                time.sleep(0.05)
        self.made.append(b)
        return b

    def close_all(self) -> None:
        errors = []
        for b in reversed(self.made):
            try:
                b.close()
            except Exception as e:
                errors.append(e)
        self.made.clear()
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def host_mounts() -> Iterator[Mounts]:
    """This process's private tmpfs / hugetlbfs / ext4-on-loop mounts; all gone at session end."""
    m = default_mounts()
    yield m
    left = close_default()
    if left:
        warnings.warn(f"mounts were still busy at session end (lazily unmounted): {left}", stacklevel=1)


@pytest.fixture
def hugepages(request: pytest.FixtureRequest) -> Iterator[Hugepages]:
    """Reserve hugetlb pages for this case; the pools go back to their old size afterwards (in a
    parallel run the pages stay parked in the pool for the next cases until the run ends)."""
    pool = HugepagePool(park=_park_key(request.config))
    try:
        yield Hugepages(pool)
    finally:
        pool.release_all()


@pytest.fixture
def backings(hugepages: Hugepages, host_mounts: Mounts) -> Iterator[Backings]:
    f = Backings(hugepages, host_mounts)
    try:
        yield f
    finally:
        f.close_all()


@pytest.fixture
def memtouch(kvm: Kvm, backings: Backings) -> Iterator[MemTouch]:
    """A GuestVm running guests/payloads/memtouch.c (long mode); closed before the backings."""
    mt = MemTouch.open(kvm)
    try:
        yield mt
    finally:
        mt.close()


def kinds_param(names: list[str] | None = None) -> Any:
    """`@kinds_param()`: parametrize `kind` over backing kinds (every one by default)."""
    return pytest.mark.parametrize("kind", names if names is not None else memory.names())
