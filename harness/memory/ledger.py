"""The machine-wide ledger of what harness processes hold, so whatever ends a run the next one can
give it back, wherever that run's TMPDIR was.

One JSON file at a fixed path, LEDGER = /run/kvm-harness/hugepages.json (the hugepage pool ledger's
file: one lock for all of it, and harness processes of an older checkout still running keep sharing
the pool accounting with new ones). Every read-modify-write holds flock(LOCK_EX) on it:

    {"boot_id": "<boot the pool entries belong to>",
     "pools":  {"2097152": {"base": 0, "holders": {"<pid>:<start>:<tag>": 1}}},
     "owners": {"<pid>:<start>": {"pid": 1234, "start": 56789, "boot_id": "...", "pidns": "pid:[...]",
                                  "cmd": "python -m pytest ...", "tmpdir": "/var/tmp/x",
                                  "dirs": [...], "mounts": [...], "images": [...], "loops": [...]}}}

An owner is one process: its pid, its start time (field 22 of /proc/<pid>/stat, so a recycled pid is
not mistaken for it), its boot and its pid namespace. Hugepage holders (harness.memory.hugepages)
are named "<owner key>:<tag>", one per HugepagePool. Resources are recorded *before* they are made
(the mount point before mount(2), the image before losetup, the folder before mkdir) and forgotten
after they are gone, so a kill at any point leaves a record of at most something that is not there,
never something that is there without a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.memory.cleanup import critical

LEDGER = Path("/run/kvm-harness/hugepages.json")
KINDS = ("dirs", "mounts", "images", "loops")
MAX_BYTES = 4 << 20


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; the command name may hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie, killed but not yet reaped, counts as dead)."""
    fields = _stat_fields(pid)
    return fields is not None and len(fields) > 0 and fields[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (stat field 22), None when it is gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def pid_ns(pid: int | str = "self") -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Owner:
    """A harness process as the ledger names it."""

    pid: int
    start: int | None
    boot: str
    pidns: str = ""

    @property
    def key(self) -> str:
        return f"{self.pid}:{self.start}"

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, start_time(pid), boot_id(), pid_ns())

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Owner:
        return cls(int(rec["pid"]), rec.get("start"), str(rec.get("boot_id", "")), str(rec.get("pidns", "")))

    def alive(self) -> bool:
        """False only when sure: another boot, or no process with this pid and start time. An owner in
        another pid namespace cannot be judged from here and counts as alive (never cleaned)."""
        if self.boot and self.boot != boot_id():
            return False
        if self.pidns and self.pidns != pid_ns():
            return True
        if not pid_alive(self.pid):
            return False
        return self.start is None or start_time(self.pid) == self.start


def holder_alive(key: str) -> bool:
    """Whether the owner of a hugepage holder key is alive: "<pid>:<start>:<tag>", or "<pid>:<tag>"
    as written before owners had start times (the pid alone decides)."""
    parts = key.split(":")
    try:
        pid = int(parts[0])
    except ValueError:
        return False
    if len(parts) >= 3 and parts[1].isdigit():
        return Owner(pid, int(parts[1]), boot_id()).alive()
    return pid_alive(pid)


class Book(dict):  # type: ignore[type-arg]
    """The ledger's content while locked; `save()` writes it now (a record that must be on file
    before the next step, e.g. a hugepage holder before the pool grows)."""

    def __init__(self, fd: int, content: dict[str, Any], old_len: int) -> None:
        super().__init__(content)
        self._fd = fd
        self._len = old_len
        self._saved = json.dumps(self, sort_keys=True)

    def save(self) -> None:
        now = json.dumps(self, sort_keys=True)
        if now == self._saved:
            return
        # one pwrite padded with blanks to the old length (JSON allows trailing blanks), then the
        # file is shortened: a SIGKILL between the two still leaves a readable ledger
        data = json.dumps(self, indent=1).encode()
        os.pwrite(self._fd, data.ljust(self._len), 0)
        os.ftruncate(self._fd, len(data))
        self._len = len(data)
        self._saved = now


@contextlib.contextmanager
def locked(path: Path = LEDGER) -> Iterator[Book]:
    """The ledger, flock'd, as a dict to change in place; written back when the block ends (also when
    it raised: what it changed in the dict mirrors what it already did to the machine, e.g. a pool
    written back for a dead holder). Signals are deferred meanwhile (critical)."""
    with critical():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, MAX_BYTES, 0)
            try:
                content = json.loads(raw) if raw.strip() else {}
            except ValueError:
                content = {}
            book = Book(fd, content if isinstance(content, dict) else {}, len(raw))
            try:
                yield book
            finally:
                book.save()
        finally:
            os.close(fd)


def owners(path: Path = LEDGER) -> dict[str, dict[str, Any]]:
    """A copy of the owner records (for diagnostics and tests); {} when there is no ledger."""
    if not path.exists():
        return {}
    with locked(path) as led:
        return json.loads(json.dumps(led.get("owners", {})))


def _new_record(me: Owner) -> dict[str, Any]:
    # cmd, ppid, worker and tmpdir are for people reading the file; recovery needs only the rest
    return {"pid": me.pid, "start": me.start, "boot_id": me.boot, "pidns": me.pidns,
            "ppid": os.getppid(), "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
            "cmd": " ".join(sys.argv)[:300], "tmpdir": tempfile.gettempdir(),
            **{k: [] for k in KINDS}}


def record(kind: str, value: str | Path, path: Path = LEDGER) -> bool:
    """Note that this process is about to hold `value` (a folder, mount point, image file or loop
    device). Best effort: False when the ledger cannot be written (not root), and the caller goes on
    (session-start recovery then falls back to scanning the default temp folders)."""
    if kind not in KINDS:
        raise ValueError(f"unknown ledger kind {kind!r} (known: {', '.join(KINDS)})")
    me = Owner.current()
    try:
        with locked(path) as led:
            rec = led.setdefault("owners", {}).setdefault(me.key, _new_record(me))
            items = rec.setdefault(kind, [])
            if str(value) not in items:
                items.append(str(value))
    except OSError:
        return False
    return True


def forget(items: Iterable[tuple[str, str | Path]], path: Path = LEDGER) -> None:
    """Drop (kind, value) records of this process once the things are gone; the owner's entry goes
    with its last record."""
    items = list(items)
    if not items or not path.exists():
        return
    me = Owner.current()
    try:
        with locked(path) as led:
            rec = led.get("owners", {}).get(me.key)
            if rec is None:
                return
            for kind, value in items:
                with contextlib.suppress(ValueError):
                    rec.get(kind, []).remove(str(value))
            if not any(rec.get(k) for k in KINDS):
                del led["owners"][me.key]
    except OSError:
        pass
