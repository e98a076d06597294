"""Leak checks: the test process after a case must look like it did before the case.

Compared per case (from /proc/self):
* file descriptors: every (fd, target) present after but not before, with its /proc/self/fd target;
* threads: tids alive after but not before (after a short grace for threads that are ending);
* mappings: named mappings (anon_inode:kvm-vcpu, memfd, hugetlbfs files...) that are new, and growth
  of anonymous memory and of RSS beyond a bound;
* hugetlb pools: this process holds no reservation in the pool ledger any more, and, when no other
  process holds one, every pool is back to its size at the start;
* mounts: no new mount under this process's private mount directory or pytest's tmp dir.

Known process-lifetime state is allowed: threads named in ALLOWED_THREADS (the watchdog starts with
the first vCPU), shared libraries mapped by a first import (cffi modules), and the mounts the
session-wide `harness.memory.mounts.default_mounts()` makes on first use.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.health.procfs import read_text
from harness.memory.hugepages import DEFAULT_LEDGER as HUGEPAGE_LEDGER
from harness.memory.mounts import PREFIX as MOUNT_PREFIX
from harness.memory.usage import HUGEPAGES_SYSFS

ALLOWED_THREADS = ("kvm-watchdog", "kvm-watchdog-diag")
# KVM's own kernel workers in our thread group (vhost tasks, e.g. "kvm-nx-lpage-recovery", comm
# truncated): they go when their VM is destroyed, which can lag the fd close; a leaked VM shows as
# its fd anyway.
ALLOWED_THREAD_PREFIXES = ("kvm-nx-lpage-re",)
THREAD_GRACE_S = 1.0
DEFAULT_RSS_MB = 128
DEFAULT_ANON_MB = 512
_LIB_RE = re.compile(r"\.so(\.[0-9.]+)?$|/python[0-9.]*$|\.pyc$")


def open_fds() -> dict[int, str]:
    """This process's open fds and what each points at."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd listdir itself used, already closed
    return out


def _threads() -> dict[int, str]:
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out = {}
    for name in os.listdir("/proc/self/task"):  # (psutil's threads() also reads every task's stat)
        tid = int(name)
        if tid in names:
            out[tid] = names[tid]
            continue
        try:
            out[tid] = read_text(f"/proc/self/task/{tid}/comm").strip()
        except OSError:
            continue  # gone
    return out


# Memoised per line: the snapshot runs twice per case (~1600 cases) and most lines (libraries, the
# interpreter's arenas) come back unchanged; parsing every line every time was its largest cost
# (2 ms of a pytest process's snapshot here, ~10x that under TCG).
_line_memo: dict[str, tuple[str | None, int]] = {}


def _classify(line: str) -> tuple[str | None, int]:
    """(named path, 0) for a mapping the check follows, (None, KiB) for anonymous memory, (None, 0)
    for [stack], [vdso], shared libraries, the interpreter and PROT_NONE reservations."""
    parts = line.split(None, 5)
    path = parts[5].strip() if len(parts) > 5 else ""
    if not path or path == "[heap]":
        if parts[1] == "---p":  # PROT_NONE reservations (malloc arenas, guard pages) hold nothing
            return None, 0
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        return None, (hi - lo) >> 10
    if path.startswith("[") or _LIB_RE.search(path.removesuffix(" (deleted)")):
        return None, 0  # process lifetime
    return path, 0


def _maps() -> tuple[Counter[str], int]:
    """Named non-library mappings (path -> count) and the KiB of anonymous mappings."""
    named: Counter[str] = Counter()
    anon_kb = 0
    memo = _line_memo
    if len(memo) > 8192:  # new VMAs every case: keep the memo bounded
        memo.clear()
    for line in read_text("/proc/self/maps").splitlines():
        c = memo.get(line)
        if c is None:
            c = memo[line] = _classify(line)
        if c[0] is not None:
            named[c[0]] += 1
        else:
            anon_kb += c[1]
    return named, anon_kb


_POOL_DIRS: list[Path] | None = None


def _pool_dirs() -> list[Path]:
    global _POOL_DIRS
    if _POOL_DIRS is None:  # the hugepage sizes a kernel offers do not change while it runs
        _POOL_DIRS = sorted(HUGEPAGES_SYSFS.glob("hugepages-*"))
    return _POOL_DIRS


def _hugepages() -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Pool sizes and ledger holders, read under the ledger lock so they agree with each other."""
    fd = None
    try:
        try:
            fd = os.open(HUGEPAGE_LEDGER, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except FileNotFoundError:
            fd = None
        pools = {}
        for d in _pool_dirs():
            try:
                pools[d.name] = int(read_text(d / "nr_hugepages"))
            except (OSError, ValueError):
                continue
        holders: dict[str, dict[str, int]] = {}
        if fd is not None:
            raw = os.pread(fd, 1 << 20, 0)
            try:
                led = json.loads(raw) if raw.strip() else {}
            except ValueError:
                led = {}
            for size, entry in led.get("pools", {}).items():
                holders[size] = dict(entry.get("holders", {}))
        return pools, holders
    finally:
        if fd is not None:
            os.close(fd)


def _our_mount_dirs(extra: list[str]) -> list[str]:
    return [f"/{MOUNT_PREFIX}{os.getpid()}.", *extra]


def _mounts(extra: list[str]) -> set[str]:
    mine = _our_mount_dirs(extra)
    out = set()
    for line in read_text("/proc/self/mountinfo").splitlines():
        if not any(m in line for m in mine) and "\\" not in line:
            continue  # (the mount point is field 5, octal-escaped: decode only lines that may match)
        fields = line.split()
        if len(fields) > 4:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if any(m in mp for m in mine):
                out.add(mp)
    return out


def _session_mounts() -> set[str]:
    """Mounts of the session-wide default Mounts: made on first use, kept until the session ends."""
    from harness.memory import mounts

    d = getattr(mounts, "_default", None)
    return {str(p) for p in getattr(d, "_mounted", {}).values()} if d is not None else set()


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    return int(read_text("/proc/self/statm").split()[1]) * _PAGE


@dataclass
class Snapshot:
    fds: dict[int, str]
    threads: dict[int, str]
    maps: Counter[str]
    anon_kb: int
    rss: int
    pools: dict[str, int]
    holders: dict[str, dict[str, int]]
    mounts: set[str] = field(default_factory=set)


def snapshot(mount_dirs: list[str] | None = None) -> Snapshot:
    maps, anon = _maps()
    pools, holders = _hugepages()
    return Snapshot(open_fds(), _threads(), maps, anon, _rss(), pools, holders,
                    _mounts(mount_dirs or []))


@dataclass
class Limits:
    rss_mb: int = DEFAULT_RSS_MB
    anon_mb: int = DEFAULT_ANON_MB
    allowed_threads: tuple[str, ...] = ALLOWED_THREADS


def _mine(key: str) -> bool:
    return key.split(":", 1)[0] == str(os.getpid())


def compare(before: Snapshot, after: Snapshot, limits: Limits | None = None) -> list[str]:
    """Evidence lines for everything `after` holds that `before` did not; [] when clean."""
    lim = limits or Limits()
    out: list[str] = []
    new_fds = sorted((fd, t) for fd, t in after.fds.items() if before.fds.get(fd) != t)
    for fd, target in new_fds:
        out.append(f"fd {fd} -> {target} (opened by the case and still open)")
    for tid, name in sorted(after.threads.items()):
        if tid not in before.threads and name not in lim.allowed_threads \
                and not name.startswith(ALLOWED_THREAD_PREFIXES):
            out.append(f"thread {tid} {name!r} started by the case is still alive")
    for path, n in sorted((after.maps - before.maps).items()):
        out.append(f"mapping {path} (x{n}) created by the case is still mapped")
    grow_anon = (after.anon_kb - before.anon_kb) >> 10
    if grow_anon > lim.anon_mb:
        out.append(f"anonymous mappings grew by {grow_anon} MiB (bound {lim.anon_mb} MiB)")
    grow_rss = (after.rss - before.rss) >> 20
    if grow_rss > lim.rss_mb:
        out.append(f"RSS grew by {grow_rss} MiB (bound {lim.rss_mb} MiB)")
    for size, hs in sorted(after.holders.items()):
        held = {k: v for k, v in hs.items() if _mine(k) and v}
        if held:
            out.append(f"hugepages {size} kB: this process still holds {sum(held.values())} page(s) "
                       f"in {HUGEPAGE_LEDGER} ({', '.join(held)})")
    foreign = any(not _mine(k) for snap in (before, after) for hs in snap.holders.values() for k in hs)
    if not foreign:
        for name, nr in sorted(after.pools.items()):
            if name in before.pools and nr != before.pools[name]:
                out.append(f"{HUGEPAGES_SYSFS}/{name}/nr_hugepages is {nr}, was {before.pools[name]} "
                           "before the case")
    allowed_mounts = _session_mounts()
    for mp in sorted(after.mounts - before.mounts - allowed_mounts):
        out.append(f"mount {mp} made by the case is still mounted")
    return out


def log_growth(path: str, nodeid: str, before: Snapshot) -> None:
    """Append one tab-separated line: pid, case, RSS and anonymous growth (KiB), fd and thread counts
    before/after. For measuring what the suite's cases normally do before tightening the bounds."""
    after = snapshot()
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\t{nodeid}\t{(after.rss - before.rss) >> 10}\t{after.anon_kb - before.anon_kb}\t"
                f"{len(before.fds)}\t{len(after.fds)}\t{len(before.threads)}\t{len(after.threads)}\n")


def check(before: Snapshot, limits: Limits | None = None, mount_dirs: list[str] | None = None) -> list[str]:
    """Snapshot now and compare; threads get a grace period to finish and a GC pass may close fds
    of objects only a reference cycle kept alive."""
    after = snapshot(mount_dirs)
    found = compare(before, after, limits)
    if not found:
        return []
    gc.collect()
    end = time.monotonic() + THREAD_GRACE_S
    while True:
        after = snapshot(mount_dirs)
        found = compare(before, after, limits)
        if not any(f.startswith("thread ") for f in found) or time.monotonic() >= end:
            return found
        time.sleep(0.05)
