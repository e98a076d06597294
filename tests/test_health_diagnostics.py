"""Hang diagnostics: the ptrace helper (a separate process) on a real stuck thread, and a guest that
spins forever failing within its bound with the diagnostic report, end to end through pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from harness.health import diagnostics
from harness.health.ptrace_helper import describe_syscall, symbolize
from harness.report.ktap_parser import parse_ktap

pytest_plugins = ["pytester"]


def _need_kvm() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs a usable /dev/kvm")


def test_symbolize_and_describe_syscall():
    maps = [(0x1000, 0x2000, "r--p", "/lib/libc.so.6"), (0x2000, 0x5000, "r-xp", "/lib/libc.so.6"),
            (0x9000, 0xA000, "rw-p", "")]
    assert symbolize(0x2345, maps) == "libc.so.6+0x1345"  # offset from the file's first mapping
    assert symbolize(0x9100, maps) is None  # not executable
    assert describe_syscall("running", 1) == "running"
    assert describe_syscall("-1 0x7ffd 0x4000", 1) == "not in a syscall"
    r, w = os.pipe()
    try:
        text = describe_syscall(f"16 {r:#x} 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x4000", os.getpid())
    finally:
        os.close(r)
        os.close(w)
    assert text.startswith(f"ioctl({r:#x}, 0xae80, 0x0, ...) fd {r} -> pipe:[") and text.endswith("[KVM_RUN]")


def test_thread_states_from_proc():
    r, w = os.pipe()
    started = threading.Event()

    def blocked() -> None:
        started.set()
        os.read(r, 1)

    t = threading.Thread(target=blocked, name="blocked-reader")
    t.start()
    started.wait()
    time.sleep(0.2)
    try:
        report, blind = diagnostics.threads_report(t.native_id)
    finally:
        os.write(w, b"x")
        t.join()
        os.close(r)
        os.close(w)
    assert f"thread {t.native_id} 'blocked-reader' <- stuck vCPU thread: state S" in report
    assert f"read({r:#x}" in report and "pipe:[" in report
    if os.geteuid() == 0:
        assert "ksys_read" in report and t.native_id not in blind  # the kernel stack says enough


def test_ptrace_helper_from_a_separate_process_on_a_blocked_thread():
    """Measured: the helper attaches (PTRACE_SEIZE) to a thread of this process, reads its
    registers and syscall, and detaches; the thread carries on afterwards."""
    r, w = os.pipe()
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(os.read(r, 1)), name="to-trace")
    t.start()
    time.sleep(0.2)
    try:
        t0 = time.monotonic()
        text = diagnostics.ptrace_report([t.native_id])
        took = time.monotonic() - t0
    finally:
        os.write(w, b"y")
        t.join(5)
        os.close(r)
        os.close(w)
    if "PTRACE_SEIZE failed" in text:
        pytest.skip(text)
    assert f"thread {t.native_id} (ptrace helper pid" in text
    assert f"syscall: read({r:#x}" in text and "rip=0x" in text and "libc" in text
    assert took < diagnostics.HELPER_TIMEOUT_S
    assert got == [b"y"] and not t.is_alive()  # detached cleanly: the read completed


def test_ptrace_helper_refuses_a_bad_pid():
    p = subprocess.run([sys.executable, "-m", "harness.health.ptrace_helper", "999999999", "999999999"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "PTRACE_SEIZE failed" in p.stdout


SPIN = '''
import time
import pytest

@pytest.mark.kvm_timeout(1.5)
@pytest.mark.guest("spin", mode="long64")
def test_spins_forever(vcpu):
    t0 = time.monotonic()
    try:
        vcpu.run_until_ucall(timeout=600)
    finally:
        print(f"ELAPSED {time.monotonic() - t0:.2f}")

def test_after_the_hang():
    pass
'''


@pytest.mark.parametrize("ptrace", ["auto", "always"])
def test_e2e_spinning_guest_fails_within_its_bound_with_a_report(pytester, monkeypatch, ptrace):
    _need_kvm()
    monkeypatch.setenv("KVM_HARNESS_PTRACE", ptrace)
    pytester.makepyfile(test_spin=SPIN)
    ktap = pytester.path / "k.txt"
    t0 = time.monotonic()
    res = pytester.runpytest_subprocess("-p", "harness.pytest.plugin", "-p", "no:cacheprovider", "-rA",
                                        f"--ktap={ktap}", timeout=120)
    wall = time.monotonic() - t0
    res.assert_outcomes(failed=1, passed=1)  # the suite goes on after the hang
    out = res.stdout.str()
    elapsed = float(out.split("ELAPSED ")[1].split()[0])
    assert 1.4 <= elapsed < 1.5 + 5.0, elapsed  # the bound, plus the diagnostics, not the 600 s
    assert wall < 90
    assert "vcpu 0 stopped by the watchdog: test exceeded its 1.5 s bound on KVM_RUN" in out
    assert "hang diagnostics (pid" in out and "<- stuck vCPU thread" in out
    assert "Python stack of the vCPU thread" in out and "run_until_ucall" in out
    assert "KVM binary stats:" in out
    assert "rip is guest_main" in out  # registers read after the kick, symbolized into the payload
    if ptrace == "always":
        assert "user-space state via ptrace" in out
        assert "[KVM_RUN]" in out and "rip=0x" in out  # the helper saw the thread inside ioctl(KVM_RUN)
    else:
        # Either the kernel stack shows KVM's run loop or (running on a CPU: no stack) the helper ran.
        assert "kvm_arch_vcpu_ioctl_run" in out or "[KVM_RUN]" in out
    tests = parse_ktap(ktap.read_text()).tests
    spin = tests[0]
    assert (spin.ok, spin.directive) == (False, "TIMEOUT")
    assert spin.reason.startswith("vcpu 0 stopped by the watchdog")
    assert any("hang diagnostics" in d for d in spin.diagnostics)
    assert tests[1].ok


class _FakeVcpu:
    """Enough of a Vcpu for Watchdog.expire: never in KVM_RUN, kick records itself."""

    def __init__(self) -> None:
        self.id = 7
        self.run_thread = 0
        self.expired: str | None = None
        self.closed = False
        self.kicked = 0

    def kick(self) -> None:
        self.kicked += 1


def test_a_blocking_collector_does_not_stop_the_kick(monkeypatch):
    """Diagnostics are bounded: a collector stuck on a lock still lets the watchdog kick."""
    from harness.kvm import watchdog
    monkeypatch.setattr(watchdog, "COLLECT_TIMEOUT_S", 0.5)
    wd = watchdog.Watchdog()
    gate = threading.Event()
    wd.collectors = [lambda v, r: "first section", lambda v, r: gate.wait(30) and ""]
    v = _FakeVcpu()
    wd._diag_thread = threading.Thread(target=wd._diag_loop, daemon=True, name="kvm-watchdog-diag")
    wd._diag_thread.start()
    t0 = time.monotonic()
    wd.expire(v, "bound exceeded")  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 5
    assert v.kicked == 1
    assert v.expired is not None and v.expired.startswith("bound exceeded\nfirst section\n")
    assert "did not finish within 0.5 s" in v.expired
    v2 = _FakeVcpu()
    wd.expire(v2, "again")  # type: ignore[arg-type]
    assert "previous collection has not finished" in (v2.expired or "") and v2.kicked == 1
    gate.set()


def test_a_closed_vcpu_is_not_kicked():
    from harness.kvm import watchdog
    wd = watchdog.Watchdog()
    v = _FakeVcpu()
    v.closed = True
    wd.expire(v, "late")  # type: ignore[arg-type]
    assert v.kicked == 0 and v.expired == "late"
