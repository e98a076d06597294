"""Whatever ends a run, leave nothing behind: SIGTERM and SIGHUP end a harness process like Ctrl-C.

pytest turns KeyboardInterrupt into an orderly end: the running case's fixtures are torn down (mounts
unmounted, loop devices detached, hugepage pools written back, temp folders removed), the session
finishes (reports are written) and the exit status is 2 (interrupted). SIGTERM (CI cancellation,
systemd) and SIGHUP (the terminal went away) kill a Python process outright by default, skipping
all of that and the atexit hooks too. `install()` (pytest_configure of harness.pytest.memory, in
the controller and in every xdist worker) makes them raise `Terminated`, a KeyboardInterrupt, in the
main thread instead:

* Only the first SIGTERM/SIGHUP interrupts; repeats are ignored so they cannot cut the cleanup short,
  and so is one that comes while the session is already finishing (`holding()`; the exit status is
  then made non-zero by harness.pytest.memory).
  If the process is still alive GRACE_S seconds later (WORKER_GRACE_S in an xdist worker; a
  teardown stuck in the kernel), a helper thread runs the registered cleanups itself and exits with
  128 + signal number.
* `critical()` marks state transitions that must not be cut in half (a ledger write, a reservation
  and its bookkeeping, Mounts.close): a signal arriving inside one is raised when it ends. SIGINT
  gets the same deferral (otherwise unchanged: every Ctrl-C raises KeyboardInterrupt).
* A vCPU inside KVM_RUN in the main thread leaves it with EINTR when the signal lands (the kernel
  delivers a process-directed signal to the main thread first), and Python raises right after.
  vCPUs in other threads stay bounded by the watchdog, which this module leaves alone.

SIGKILL cannot be caught: what a killed run leaves, the ledger (harness.memory.ledger) records and
the next run's session start gives back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

GRACE_S = 20.0  # after the first SIGTERM/SIGHUP: bound on the orderly cleanup before the last resort
# An xdist worker's must end sooner: its controller waits 10 s for workers (NodeManager.EXIT_TIMEOUT)
# and then SIGKILLs them, while the controller itself must outlast that wait to write its reports.
WORKER_GRACE_S = 8.0
SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: the run ends as after Ctrl-C (pytest tears down, exit status 2)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received: stopping the run and cleaning up "
                         "as on Ctrl-C")


_lock = threading.Lock()
_depth = 0  # nesting of critical() in the main thread (the only thread Python runs handlers in)
_pending: int | None = None  # a signal that arrived inside a critical section
_terminating: int | None = None  # the first SIGTERM/SIGHUP, once one came
_previous: dict[int, Any] = {}
_installs = 0  # nested install/uninstall pairs (pytest run in-process inside a pytest run)
_holding = 0  # inside holding(): the process is ending in order already, TERM/HUP only noted
_cleanups: list[Callable[[], object]] = []
_grace = GRACE_S


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending, _terminating
    if signum != signal.SIGINT:
        if _terminating is not None:
            return  # already ending: a second TERM must not abort the teardown the first started
        _terminating = signum
        _start_last_resort(signum)
        if _holding:
            return  # the session is finishing anyway: raising would cut its teardown and reports short
    if _depth:
        _pending = signum
        return
    raise _interrupt(signum)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Defer SIGTERM/SIGHUP/SIGINT (as installed here) to the end of the block, so that a state
    change and its bookkeeping happen both or neither. No effect outside the main thread."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise _interrupt(signum)


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """While the session finishes (fixture teardown, reports), SIGTERM/SIGHUP are only noted
    (`terminating()` says so; the last resort still bounds the time): the process is already doing
    what the signal asks. SIGINT still interrupts, as a way out of a stuck teardown."""
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1


def install(grace: float = GRACE_S) -> bool:
    """Route SIGTERM and SIGHUP to `Terminated` (and SIGINT through critical sections). Leaves alone a
    signal someone else handles or ignores (nohup). Returns False outside the main thread."""
    global _grace, _installs
    if threading.current_thread() is not threading.main_thread():
        return False
    _installs += 1
    if _installs > 1:
        return True  # the outer install stays in force, with its grace
    _grace = grace
    for sig in (*SIGNALS, signal.SIGINT):
        cur = signal.getsignal(sig)
        if cur is _handler:
            continue
        ours = cur is signal.default_int_handler if sig == signal.SIGINT else cur in (signal.SIG_DFL, None)
        if ours:
            _previous[sig] = cur
            signal.signal(sig, _handler)
    return True


def uninstall() -> None:
    """Put the previous handlers back (pytest_unconfigure of the outermost install), unless a
    termination is under way."""
    global _installs
    if threading.current_thread() is not threading.main_thread() or _installs == 0:
        return
    _installs -= 1
    if _installs or _terminating is not None:
        return
    for sig, prev in list(_previous.items()):
        if signal.getsignal(sig) is _handler:
            signal.signal(sig, prev)
        del _previous[sig]


def terminating() -> int | None:
    """The SIGTERM/SIGHUP this process is ending on, if any."""
    return _terminating


def register(fn: Callable[[], object]) -> None:
    """A cleanup the last resort runs (Mounts.close, HugepagePool.release_all); idempotent."""
    with _lock:
        if fn not in _cleanups:
            _cleanups.append(fn)


def unregister(fn: Callable[[], object]) -> None:
    with _lock:
        if fn in _cleanups:
            _cleanups.remove(fn)


def run_cleanups() -> None:
    """Run every registered cleanup, newest first, each one's failure contained."""
    with _lock:
        fns = list(reversed(_cleanups))
    for fn in fns:
        try:
            fn()
        except Exception as e:  # the rest must still run
            print(f"kvm-harness: cleanup {fn!r} failed: {e!r}", file=sys.stderr)


def _start_last_resort(signum: int) -> None:
    # Made on the first signal (not up front): a process that is never told to stop has no extra thread.
    t = threading.Thread(target=_last_resort, args=(signum, _grace), name="kvm-harness-term", daemon=True)
    t.start()


def _last_resort(signum: int, grace: float) -> None:
    time.sleep(grace)
    print(f"kvm-harness: pid {os.getpid()} still running {grace:g} s after {signal.Signals(signum).name}; "
          f"cleaning up from a helper thread and exiting with {128 + signum}", file=sys.stderr)
    run_cleanups()
    sys.stderr.flush()
    os._exit(128 + signum)
