"""Pin kernel-log records to the case that caused them: a machine-wide reader-writer lock.

The kernel log is machine-wide, so under pytest-xdist (or two test runs on one machine) a WARN
logged while two cases run cannot be pinned to either. Cases that are expected to splat (a known
issue in force names them with a `kmsg` pattern, or they carry `@pytest.mark.kmsg_exclusive`) hold
the lock exclusively from the opening of their kernel-log window to its last check; every other
case holds it shared. So an expected splat lands in exactly one window, and a splat in a window
that was shared still fails every case whose window holds it (see oracle.py).

flock(2) has no writer preference: a writer waiting for LOCK_EX would starve while readers hand
LOCK_SH to each other. A second lock, the turnstile, fixes that: a writer holds it while it waits,
and a reader passes through it (takes and drops it) before taking its shared lock.

A run started by a case that holds the lock shared (a harness test running pytest in a subprocess)
must not pass through the turnstile: a writer waiting there waits for the parent's shared hold, the
parent waits for its child, the child waits for the writer. The holder names itself in the
environment (HOLDER_ENV) and a descendant of a shared holder takes its shared lock directly, which
flock grants beside the parent's (seen: a unit-test run and `make check` stuck for 20 minutes).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from pathlib import Path

from harness.kvm.errors import HarnessError

LOCK_DIR = Path("/run/kvm-harness")
ENV_DIR = "KVM_HARNESS_LOCK_DIR"  # another folder: a run that must not wait for this machine's others
POLL = 0.005  # seconds between non-blocking attempts (a blocking flock cannot time out)
HOLDER_ENV = "KVM_HARNESS_KMSG_HOLDER"  # "<pid>:<shared|exclusive>:<dir>" of the process holding it
DEFAULT_TIMEOUT = 900.0  # longer than any case's own bound: waiting is normal, a dead wait is not


class ExclusiveTimeout(HarnessError):
    """The kernel-log lock could not be had in time (another case held it that long)."""


def default_dir() -> Path:
    """$KVM_HARNESS_LOCK_DIR, or /run/kvm-harness where it can be written (root), else a per-user
    folder in the temp dir."""
    if os.environ.get(ENV_DIR):
        d = Path(os.environ[ENV_DIR])
        d.mkdir(parents=True, exist_ok=True)
        return d
    try:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        if os.access(LOCK_DIR, os.W_OK):
            return LOCK_DIR
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / f"kvm-harness-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


class KmsgLock:
    """Shared or exclusive hold of the machine's kernel log, across processes."""

    def __init__(self, directory: Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        d = directory or default_dir()
        self.dir = str(Path(d).resolve())
        self.timeout = timeout
        self._data = os.open(d / "kmsg.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._turnstile = os.open(d / "kmsg.turnstile", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self.held: str | None = None  # "shared" / "exclusive"
        self._outer: str | None = None  # HOLDER_ENV before this hold
        self.waited = 0.0  # seconds the last acquire waited

    def _take(self, fd: int, op: int, what: str, t0: float) -> None:
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                    raise
            if time.monotonic() - t0 > self.timeout:
                raise ExclusiveTimeout(
                    f"waited {self.timeout:g} s for the kernel-log lock ({what}): another case held it "
                    "that long; cases that splat run alone so their records are pinned to them")
            time.sleep(POLL)

    def acquire(self, exclusive: bool) -> None:
        if self.held:
            raise HarnessError(f"kernel-log lock already held ({self.held})")
        t0 = time.monotonic()
        if not exclusive and self._ancestor_holds_shared():
            self._take(self._data, fcntl.LOCK_SH, "shared, inside a shared holder's run", t0)
        else:
            self._take(self._turnstile, fcntl.LOCK_EX, "turnstile", t0)
            try:
                if exclusive:
                    self._take(self._data, fcntl.LOCK_EX, "exclusive", t0)
                else:
                    self._take(self._data, fcntl.LOCK_SH, "shared", t0)
            finally:
                fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        self.held = "exclusive" if exclusive else "shared"
        self.waited = time.monotonic() - t0
        self._outer = os.environ.get(HOLDER_ENV)
        os.environ[HOLDER_ENV] = f"{os.getpid()}:{self.held}:{self.dir}"

    def _ancestor_holds_shared(self) -> bool:
        """Whether the environment names a live ancestor of this process holding this lock shared."""
        pid, _, rest = os.environ.get(HOLDER_ENV, "").partition(":")
        mode, _, d = rest.partition(":")
        if mode != "shared" or d != self.dir or not pid.isdigit() or int(pid) == os.getpid():
            return False
        p = os.getppid()
        while p > 1:
            if p == int(pid):
                return True
            try:
                with open(f"/proc/{p}/stat") as f:
                    p = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return False
        return False

    def release(self) -> None:
        if self.held:
            fcntl.flock(self._data, fcntl.LOCK_UN)
            self.held = None
            if os.environ.get(HOLDER_ENV, "").startswith(f"{os.getpid()}:"):
                if self._outer is None:
                    os.environ.pop(HOLDER_ENV, None)
                else:
                    os.environ[HOLDER_ENV] = self._outer

    def close(self) -> None:
        self.release()
        for fd in (self._data, self._turnstile):
            try:
                os.close(fd)
            except OSError:
                pass
