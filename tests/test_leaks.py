"""Leak checks (harness.health.leaks): unit checks on snapshots, and end to end through pytest."""

from __future__ import annotations

import mmap
import os
import threading
from collections import Counter

import pytest

from harness.health import leaks
from harness.health.leaks import Limits, Snapshot, compare, snapshot
from harness.report.ktap_parser import parse_ktap

pytest_plugins = ["pytester"]

ME = str(os.getpid())


def _snap(**kw: object) -> Snapshot:
    base: dict[str, object] = dict(fds={0: "/dev/null"}, threads={1: "MainThread"}, maps=Counter(), anon_kb=0,
                                   rss=0, pools={"hugepages-2048kB": 0}, holders={}, mounts=set())
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_clean_process_has_no_findings():
    before = snapshot()
    assert leaks.check(before) == []


def test_real_fd_leak_is_named_with_its_target():
    before = snapshot()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        found = leaks.check(before)
    finally:
        os.close(fd)
    assert found == [f"fd {fd} -> /dev/null (opened by the case and still open)"]
    assert leaks.check(before) == []


def test_real_thread_and_mapping_leaks():
    before = snapshot()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="leaky-thread")
    t.start()
    mfd = os.memfd_create("kh-leak-test")
    os.ftruncate(mfd, 4096)
    m = mmap.mmap(mfd, 4096)
    os.close(mfd)
    try:
        found = leaks.check(before)
    finally:
        stop.set()
        t.join()
        m.close()
    assert any(f"thread {t.native_id} 'leaky-thread'" in f for f in found), found
    assert any(f.startswith("mapping /memfd:kh-leak-test (deleted) (x1)") for f in found), found
    assert leaks.check(before) == []


def test_a_thread_that_is_ending_gets_a_grace_period():
    before = snapshot()
    t = threading.Thread(target=lambda: threading.Event().wait(0.3), name="ending")
    t.start()
    assert leaks.check(before) == []
    t.join()


def test_allowed_threads_and_reused_fd_numbers():
    before = _snap(fds={3: "anon_inode:kvm-vm"})
    after = _snap(fds={3: "/dev/null"}, threads={1: "MainThread", 7: "kvm-watchdog"})
    assert compare(before, after) == ["fd 3 -> /dev/null (opened by the case and still open)"]


def test_growth_bounds():
    before = _snap(rss=100 << 20, anon_kb=0)
    after = _snap(rss=(100 + 200) << 20, anon_kb=600 << 10)
    found = compare(before, after, Limits(rss_mb=128, anon_mb=512))
    assert found == ["anonymous mappings grew by 600 MiB (bound 512 MiB)", "RSS grew by 200 MiB (bound 128 MiB)"]
    assert compare(before, after, Limits(rss_mb=256, anon_mb=1024)) == []


def test_hugepage_pool_and_ledger():
    # A reservation this process still holds is a leak whatever the others do.
    held = _snap(holders={"2097152": {f"{ME}:abcd1234": 2}})
    (msg,) = compare(_snap(), held)
    assert msg.startswith("hugepages 2097152 kB: this process still holds 2 page(s)")
    # The pool size must come back when nobody else holds pages ...
    grown = _snap(pools={"hugepages-2048kB": 4})
    assert compare(_snap(), grown) == [
        f"{leaks.HUGEPAGES_SYSFS}/hugepages-2048kB/nr_hugepages is 4, was 0 before the case"]
    # ... but another process's reservation makes the size not ours to judge.
    other = _snap(pools={"hugepages-2048kB": 4}, holders={"2097152": {"1:ffff0000": 4}})
    assert compare(_snap(), other) == []


def test_mounts_of_the_case_but_not_the_session():
    mp = f"/tmp/{leaks.MOUNT_PREFIX}{ME}.x/tmpfs-extra"
    assert compare(_snap(), _snap(mounts={mp})) == [f"mount {mp} made by the case is still mounted"]


# --- end to end ----------------------------------------------------------------------------------

LEAKY = '''
import mmap, os, threading

KEEP = []

def test_leaks_an_fd():
    KEEP.append(os.open("/dev/null", os.O_RDONLY))

def test_leaks_a_thread():
    ev = threading.Event()
    KEEP.append(ev)
    threading.Thread(target=ev.wait, args=(30,), name="kh-leaky", daemon=True).start()

def test_leaks_a_mapping():
    fd = os.memfd_create("kh-e2e-leak")
    os.ftruncate(fd, 4096)
    KEEP.append(mmap.mmap(fd, 4096))
    os.close(fd)

def test_clean():
    with open("/dev/null") as f:
        f.read()

def test_fails_and_leaks():
    KEEP.append(os.open("/dev/zero", os.O_RDONLY))
    assert 1 == 2
'''


def test_e2e_leaking_cases_fail_with_evidence(pytester):
    pytester.makepyfile(test_leaky=LEAKY)
    ktap = pytester.path / "k.txt"
    res = pytester.runpytest_subprocess("-p", "harness.pytest.plugin", "-p", "no:cacheprovider", "-rA",
                                        f"--ktap={ktap}")
    out = res.stdout.str()
    # The leaks fail their own case (at teardown); the failing case gets the evidence as a section.
    res.assert_outcomes(passed=4, failed=1, errors=3)
    assert "leak check: test_leaky.py::test_leaks_an_fd left behind 1 thing(s):" in out
    assert "-> /dev/null (opened by the case and still open)" in out
    assert "'kh-leaky' started by the case is still alive" in out
    assert "mapping /memfd:kh-e2e-leak (deleted) (x1)" in out
    assert "kvm-harness leaks" in out and "-> /dev/zero" in out
    tests = {t.description.split("::")[1]: t for t in parse_ktap(ktap.read_text()).tests}
    for name in ("test_leaks_an_fd", "test_leaks_a_thread", "test_leaks_a_mapping", "test_fails_and_leaks"):
        assert not tests[name].ok and tests[name].directive is None, name  # "not ok", a failure, not ERROR
    assert tests["test_clean"].ok


def test_e2e_leak_check_off(pytester):
    pytester.makepyfile(test_leaky=LEAKY)
    res = pytester.runpytest_subprocess("-p", "harness.pytest.plugin", "-p", "no:cacheprovider", "--leaks=off")
    res.assert_outcomes(passed=4, failed=1)


@pytest.mark.parametrize("mode", ["warn"])
def test_e2e_leak_check_warn(pytester, mode):
    pytester.makepyfile(test_leaky=LEAKY)
    res = pytester.runpytest_subprocess("-p", "harness.pytest.plugin", "-p", "no:cacheprovider", f"--leaks={mode}")
    res.assert_outcomes(passed=4, failed=1)
    assert "KernelHealthWarning: leak check: test_leaky.py::test_leaks_an_fd" in res.stdout.str()


def test_kvm_kernel_workers_are_not_thread_leaks():
    after = _snap(threads={1: "MainThread", 9: "kvm-nx-lpage-re"})
    assert compare(_snap(), after) == []
