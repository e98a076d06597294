"""A run started inside a shared holder of the kernel-log lock must not deadlock behind a writer.

Seen: a unit test ran pytest in a subprocess while its own case held the lock shared; `make check`
had a case waiting for it exclusively at the turnstile; the child waited at the turnstile for the
writer, the writer for the parent, the parent for the child: 20 minutes, until killed."""

import fcntl
import os
import subprocess
import sys
import time

from harness.health.exclusive import KmsgLock

CHILD = """
import sys, time
from pathlib import Path
from harness.health.exclusive import KmsgLock, ExclusiveTimeout
lk = KmsgLock(Path(sys.argv[1]), timeout=3.0)
t0 = time.monotonic()
try:
    lk.acquire(exclusive=False)
except ExclusiveTimeout:
    print("timeout"); sys.exit(1)
print(f"shared after {time.monotonic() - t0:.2f} s"); lk.close()
"""


def test_a_child_of_a_shared_holder_is_not_stuck_behind_a_waiting_writer(tmp_path):
    before = os.environ.get("KVM_HARNESS_KMSG_HOLDER")  # this case's own hold, under the plugin
    parent = KmsgLock(tmp_path)
    parent.acquire(exclusive=False)
    # a writer in another run: holds the turnstile while it waits for the parent's shared hold
    turnstile = os.open(tmp_path / "kmsg.turnstile", os.O_RDWR)
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, f"child: {r.stdout}{r.stderr}"
        assert time.monotonic() - t0 < 3.0
    finally:
        os.close(turnstile)
        parent.close()
    assert os.environ.get("KVM_HARNESS_KMSG_HOLDER") == before  # released: no stale claim for later children


def test_an_unrelated_reader_still_queues_behind_the_writer(tmp_path):
    """The bypass is for descendants only: another run's reader waits at the turnstile (no starvation)."""
    turnstile = os.open(tmp_path / "kmsg.turnstile", os.O_RDWR | os.O_CREAT)
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    env = {k: v for k, v in os.environ.items() if k != "KVM_HARNESS_KMSG_HOLDER"}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                           timeout=30, env=env)
        assert r.returncode == 1 and "timeout" in r.stdout
    finally:
        os.close(turnstile)
