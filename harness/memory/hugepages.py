"""The hugetlb page pools (2 MiB, 1 GiB): reserve what a case needs, put the old size back after.

Several harness processes (pytest-xdist workers) may grow the same pool at once, so "remember the
old value, write it back" is not enough: worker A would shrink the pool under worker B. A ledger file
(flock'd) records the pool size before the first reservation and who holds how many pages; each
reservation adds to the pool, each release takes its pages back off, and when the last holder
releases, the recorded old size is written back exactly. Holders whose process is gone (killed run)
are dropped the next time anyone touches the ledger, and pool entries from an earlier boot are
ignored. The ledger is the harness's machine-wide one (harness.memory.ledger): a holder is named
"<pid>:<start time>:<tag>", so a recycled pid does not keep a dead run's pages. A reservation and its
bookkeeping are one critical section (harness.memory.cleanup): SIGTERM cannot fall between them.

Keeping pages for a run (`park`): a 1 GiB page first touched after the pool grew costs seconds more
than one touched again (measured here: ~10 s against ~0.7 s: the memory behind a freshly grown pool
is not populated below this kernel yet; 2 MiB pages alike, per byte), and growing the pool for each
case and shrinking it after made every hugetlb case pay that. A pool made with `park=<keeper key>`
(the xdist controller of a parallel run, harness.pytest.memory) does not shrink the pool on
release: its pages stay free in the pool under the pool's "parked" entry for the keeper, the next
reservation takes them first (the pool keeps its size), and `unpark(keeper)` (the controller at the
end of the run, or the next ledger access once the keeper died) takes them off. The pool is its
base plus every holder's pages plus every keeper's parked pages; a keeper with parked pages is also
listed among the holders with 0 pages, so whoever compares pool sizes knows another harness process
keeps pages of that size, while `holders()` lists only pages in use.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.memory import cleanup
from harness.memory.ledger import LEDGER, Book, Owner, boot_id, holder_alive, locked
from harness.memory.usage import HUGEPAGES_SYSFS, hugepage_dir
from harness.unsupported import Unsupported

PAGE_2M = 2 << 20
PAGE_1G = 1 << 30
GIGANTIC_RETRY = 2.0  # seconds a 1 GiB reservation keeps trying before it reports the shortfall
DEFAULT_LEDGER = LEDGER


class HugepagesUnavailable(Unsupported):
    """The pool cannot give the pages asked for; the message says why (cases skip on it)."""

    others: int = 0  # pages other holders had at the time (a retry may succeed once they release)


def size_name(page_size: int) -> str:
    return f"{page_size >> 30} GiB" if page_size >= PAGE_1G else f"{page_size >> 20} MiB"


def pages_for(size: int, page_size: int) -> int:
    return (size + page_size - 1) // page_size


_boot_id = boot_id  # the name the unit tests know


class HugepagePool:
    """Reservations of one owner (a process, a fixture); `release_all()` gives them back."""

    def __init__(self, sysfs: Path = HUGEPAGES_SYSFS, ledger: Path = DEFAULT_LEDGER, *, park: str | None = None,
                 park_sizes: tuple[int, ...] = (PAGE_2M, PAGE_1G)) -> None:
        self.sysfs = Path(sysfs)
        self.ledger = Path(ledger)
        self.key = f"{Owner.current().key}:{uuid.uuid4().hex[:8]}"
        self.held: dict[int, int] = {}
        self.borrowed: dict[int, dict[str, int]] = {}  # page size -> {keeper key: parked pages taken}
        self.park: str | None = park  # release into this keeper's parked pages (module docstring)
        self.park_sizes = frozenset(park_sizes)
        self.pruned: list[str] = []  # dead holders this pool's ledger accesses gave back (for reports)
        atexit.register(self.release_all)

    # ---- kernel interface (overridable in unit tests) ------------------------------------------
    def _nr_path(self, page_size: int) -> Path:
        return hugepage_dir(page_size, self.sysfs) / "nr_hugepages"

    def read_nr(self, page_size: int) -> int:
        return int(self._nr_path(page_size).read_text())

    def write_nr(self, page_size: int, value: int) -> None:
        self._nr_path(page_size).write_text(f"{max(0, value)}\n")

    def free(self, page_size: int) -> int:
        return int((hugepage_dir(page_size, self.sysfs) / "free_hugepages").read_text())

    # ---- reservations --------------------------------------------------------------------------
    def unavailable_reason(self, page_size: int) -> str | None:
        path = self._nr_path(page_size)
        if not path.exists():
            return f"this kernel has no {size_name(page_size)} hugepage pool ({path} is missing)"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable by uid {os.getuid()} (hugepage pools need root)"
        return None

    def reserve(self, page_size: int, count: int, wait: float = 0.0) -> None:
        """Grow the pool by `count` pages for this owner, or raise HugepagesUnavailable (no change).

        With wait > 0, a shortfall while other owners hold pages of this size is retried until they
        release or `wait` seconds pass (parallel workers queue for 1 GiB pages instead of skipping)."""
        if count <= 0:
            return
        why = self.unavailable_reason(page_size)
        if why:
            raise HugepagesUnavailable(why)
        now = time.monotonic()
        deadline = now + wait
        # A 1 GiB page comes from a contiguous range the kernel must empty first (the runner's guests
        # take it from a CMA area): a page the previous case freed a moment ago, or a page of the
        # range briefly pinned, fails one attempt and not the next.
        gigantic = now + (GIGANTIC_RETRY if page_size >= PAGE_1G else 0.0)
        while True:
            try:
                self._reserve_once(page_size, count)
                return
            except HugepagesUnavailable as e:
                # others held pages during the attempt: they may have released since, try again
                now = time.monotonic()
                if not (getattr(e, "others", 0) and now < deadline) and now >= gigantic:
                    raise
            time.sleep(0.05)

    def _borrow(self, entry: dict[str, Any], count: int) -> dict[str, int]:
        """Take up to `count` parked pages of live keepers (the pool keeps its size)."""
        taken: dict[str, int] = {}
        parked = entry.get("parked", {})
        for k in sorted(parked):
            n = min(count, parked[k])
            if n > 0 and holder_alive(k):
                parked[k] -= n
                taken[k] = n
                count -= n
        return taken

    def _park(self, entry: dict[str, Any], key: str, n: int) -> int:
        """Park n pages under a live keeper; how many were parked (0 when the keeper is gone)."""
        if n <= 0 or not holder_alive(key):
            return 0
        parked = entry.setdefault("parked", {})
        parked[key] = parked.get(key, 0) + n
        entry["holders"].setdefault(key, 0)  # "another process keeps pages of this size" (docstring)
        return n

    def _give_back(self, entry: dict[str, Any], taken: dict[str, int]) -> int:
        """Return taken parked pages to their keepers if still keeping; how many went back."""
        parked = entry.get("parked", {})
        return sum(self._park(entry, k, n) for k, n in taken.items() if k in parked)

    def _reserve_once(self, page_size: int, count: int) -> None:
        with cleanup.critical(), self._locked() as led:
            entry = led["pools"].setdefault(str(page_size), {"base": None, "holders": {}})
            cur = self.read_nr(page_size)
            if not entry["holders"] and not entry.get("parked"):
                entry["base"] = cur
            taken = self._borrow(entry, count)
            grow = count - sum(taken.values())
            # On file before the pool grows: a kill during the (slow) growth then leaves a dead
            # holder the next run settles, never pages nobody accounts for.
            entry["holders"][self.key] = entry["holders"].get(self.key, 0) + count
            led.save()
            try:
                if grow:
                    self.write_nr(page_size, cur + grow)
                got = self.read_nr(page_size) - cur
            except OSError as e:
                self.write_nr(page_size, cur)
                self._give_back(entry, taken)
                self._undo(led, page_size, entry, count)
                raise HugepagesUnavailable(f"cannot grow the {size_name(page_size)} pool: {e}") from e
            if got < grow:
                self.write_nr(page_size, cur)
                self._give_back(entry, taken)
                self._undo(led, page_size, entry, count)
                others = sum(n for k, n in entry["holders"].items() if k != self.key)
                err = HugepagesUnavailable(
                    f"asked the kernel for {grow} more {size_name(page_size)} hugepages, it found "
                    f"{max(got, 0)} (nr_hugepages {cur} -> {cur + max(got, 0)}, {others} held by other "
                    "harness processes): free memory is short or too fragmented")
                err.others = others
                raise err
            self.held[page_size] = self.held.get(page_size, 0) + count
            mine = self.borrowed.setdefault(page_size, {})
            for k, n in taken.items():
                mine[k] = mine.get(k, 0) + n
            cleanup.register(self.release_all)  # the last resort after SIGTERM gives them back too

    def _undo(self, led: dict[str, Any], page_size: int, entry: dict[str, Any], count: int) -> None:
        left = entry["holders"].get(self.key, 0) - count
        if left > 0:
            entry["holders"][self.key] = left
        else:
            entry["holders"].pop(self.key, None)
        if not entry["holders"] and not entry.get("parked"):
            del led["pools"][str(page_size)]

    def release(self, page_size: int) -> None:
        """Give back every page of this size this owner reserved."""
        with cleanup.critical():
            n = self.held.pop(page_size, 0)
            taken = self.borrowed.pop(page_size, {})
            if not self.held:
                cleanup.unregister(self.release_all)
            if not n:
                return
            with self._locked() as led:
                entry = led["pools"].get(str(page_size))
                if entry is None:  # ledger lost (reboot, deleted): take our own growth off anyway
                    self.write_nr(page_size, self.read_nr(page_size) - (n - sum(taken.values())))
                    return
                entry["holders"].pop(self.key, None)
                n -= self._give_back(entry, taken)
                if self.park and page_size in self.park_sizes:
                    n -= self._park(entry, self.park, n)
                self._settle(led, page_size, entry, n)

    def release_all(self) -> None:
        with cleanup.critical():
            for ps in list(self.held):
                self.release(ps)

    def _settle(self, led: dict[str, Any], page_size: int, entry: dict[str, Any], n: int) -> None:
        if entry["holders"] or entry.get("parked"):
            if n:
                self.write_nr(page_size, self.read_nr(page_size) - n)
        else:
            # last holder: the exact old size, whatever happened in between
            self.write_nr(page_size, entry["base"])
            del led["pools"][str(page_size)]

    # ---- ledger --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[Book]:
        with locked(self.ledger) as led:
            boot = boot_id()
            if led.get("boot_id") != boot or not isinstance(led.get("pools"), dict):
                # pool sizes of another boot mean nothing now; owner records stay (their folders may
                # have survived the reboot) and carry their own boot id
                led["boot_id"] = boot
                led["pools"] = {}
            self._prune(led)
            yield led

    def _prune(self, led: dict[str, Any]) -> None:
        """Drop holders whose process died without releasing (their pages come off the pool)."""
        for ps_key, entry in list(led["pools"].items()):
            dead = [k for k in entry["holders"] if not holder_alive(k)]
            n = sum(entry["holders"].pop(k) for k in dead)
            parked = entry.get("parked", {})
            dead_keepers = [k for k in parked if not holder_alive(k)]
            n += sum(parked.pop(k) for k in dead_keepers)
            if "parked" in entry and not parked:
                del entry["parked"]
            if dead:
                self.pruned += [f"{n} {size_name(int(ps_key))} hugepage(s) of {', '.join(dead)}"]
                self._settle(led, int(ps_key), entry, n)

    def holders(self, page_size: int) -> dict[str, int]:
        """Who holds pages of this pool right now, per the ledger (for diagnostics): pages in use,
        not a keeper's parked (free) ones."""
        with self._locked() as led:
            return {k: n for k, n in led["pools"].get(str(page_size), {}).get("holders", {}).items() if n}


def unpark(keeper: str, sysfs: Path = HUGEPAGES_SYSFS, ledger: Path = DEFAULT_LEDGER) -> int:
    """Take a keeper's parked pages off their pools (the pool goes back to its old size when nobody
    else holds pages); returns how many pages came off."""
    if not ledger.exists():
        return 0
    pool = HugepagePool(sysfs, ledger)
    atexit.unregister(pool.release_all)
    total = 0
    with cleanup.critical(), pool._locked() as led:
        for ps_key, entry in list(led["pools"].items()):
            parked = entry.get("parked", {})
            if keeper not in parked and keeper not in entry["holders"]:
                continue
            n = parked.pop(keeper, 0)
            if not parked:
                entry.pop("parked", None)
            if entry["holders"].get(keeper) == 0:
                del entry["holders"][keeper]
            total += n
            pool._settle(led, int(ps_key), entry, n)
    return total


def prune_stale(sysfs: Path = HUGEPAGES_SYSFS, ledger: Path = DEFAULT_LEDGER) -> list[str]:
    """Give back the pages of harness processes that died holding them (a run killed with SIGKILL);
    returns what was given back."""
    if not ledger.exists():
        return []
    pool = HugepagePool(sysfs, ledger)
    atexit.unregister(pool.release_all)
    with pool._locked():
        pass  # _locked prunes dead holders and restores the old size when none is left
    return pool.pruned

