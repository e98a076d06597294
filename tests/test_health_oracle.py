"""The kernel-log oracle: unit checks on recorded splats, and end to end through pytest on the real
/dev/kmsg (a pytester subprocess loading harness.pytest.plugin).

The end-to-end cases write user-space records into the real kernel log. Each one says
"kvm-harness test injection" and carries a random token, and the kernel tags it facility 1 (user),
so no default oracle (kernel records only) and no reader of dmesg can mistake it for a splat.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from harness.health.kmsg import KmsgRecord, parse_kmsg_dump, parse_kmsg_record
from harness.health.oracle import KmsgOracle, Window
from harness.report.ktap_parser import parse_ktap

pytest_plugins = ["pytester"]

DATA = Path(__file__).parent / "data" / "kmsg"
INJECTION = "kvm-harness test injection: not a kernel warning"


def _need_kmsg_rw() -> None:
    try:
        fd = os.open("/dev/kmsg", os.O_RDWR)
    except OSError as e:
        pytest.skip(f"/dev/kmsg not readable and writable here: {e.strerror}")
    os.close(fd)


class FakeReader:
    """Stands in for KmsgReader: hands out queued records on drain()."""

    def __init__(self) -> None:
        self.queue: list[KmsgRecord] = []
        self.lost = 0
        self.available = True

    def drain(self) -> list[KmsgRecord]:
        out, self.queue = self.queue, []
        return out

    def close(self) -> None:
        pass


def _oracle(tmp_path: Path, taint: int = 0, workers: int = 1) -> tuple[KmsgOracle, FakeReader, Path]:
    tp = tmp_path / "tainted"
    tp.write_text(f"{taint}\n")
    o = KmsgOracle("off", tainted_path=str(tp), workers=workers)
    r = FakeReader()
    o.reader = r  # type: ignore[assignment]
    return o, r, tp


# --- unit: windows over recorded splats --------------------------------------------------------


@pytest.mark.parametrize(("name", "kind", "quoted"), [
    ("warn.kmsg", "WARNING", "Call Trace:"),
    ("kasan.kmsg", "KASAN", "BUG: KASAN:"),
    ("lockdep_circular.kmsg", "lockdep", "possible circular locking dependency"),
    ("rcu_stall.kmsg", "RCU stall", "rcu: INFO: rcu_"),
    ("null_deref.kmsg", "BUG", "BUG: kernel NULL pointer dereference"),
])
def test_window_quotes_the_splat_with_its_context(tmp_path, name, kind, quoted):
    o, r, _ = _oracle(tmp_path)
    w = o.begin("cases/test_x.py::test_y")
    r.queue = parse_kmsg_dump((DATA / name).read_text())
    f = o.check(w)
    assert f and [k for k, _ in f.splats] == [kind]
    msg = f.message("the test body")
    assert msg.startswith(f"kernel health: 1 kernel log splat ({kind}) during the test body of "
                          "cases/test_x.py::test_y")
    assert quoted in msg
    # The header is quoted first, then the records after it (stack, registers).
    (_, recs), = f.splats
    assert len(recs) > 1 and kind == o.matcher.match(recs[0])


def test_noise_and_records_before_the_window_do_not_count(tmp_path):
    o, r, _ = _oracle(tmp_path)
    r.queue = parse_kmsg_dump((DATA / "warn.kmsg").read_text())  # logged before the case started
    w = o.begin("t")
    assert [k for k, _ in o.outside] == ["WARNING"]  # kept as "between cases", not blamed on t
    r.queue = parse_kmsg_dump((DATA / "noise.kmsg").read_text())
    f = o.check(w)
    assert f is not None and not f


def test_each_splat_is_reported_once_per_window(tmp_path):
    o, r, _ = _oracle(tmp_path)
    w = o.begin("t")
    r.queue = parse_kmsg_dump((DATA / "warn.kmsg").read_text())
    assert o.check(w)
    assert not o.check(w)  # the teardown check does not repeat what the call check reported


def test_user_records_count_only_when_accepted(tmp_path):
    o, r, _ = _oracle(tmp_path)
    rec = parse_kmsg_record(f"12,5,1,-;WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1 [{INJECTION}]")
    w = o.begin("t")
    r.queue = [rec]
    assert not o.check(w)
    w2 = o.begin("t2", accept_user=True)
    r.queue = [rec]
    f = o.check(w2)
    assert f and "(user-space record, facility 1)" in f.message("x")


def test_taint_change_fails_and_names_the_flag(tmp_path):
    o, _, tp = _oracle(tmp_path, taint=0)
    w = o.begin("t")
    tp.write_text(f"{1 << 9}\n")
    f = o.check(w)
    assert f and f.taint == (0, 512)
    assert "kernel taint changed 0 -> 512 (new flags: W)" in f.message("x")
    assert not o.check(w)  # reported once


def test_parallel_runs_say_the_record_cannot_be_pinned(tmp_path):
    o, r, _ = _oracle(tmp_path, workers=2)
    w = o.begin("t")
    r.queue = parse_kmsg_dump((DATA / "warn.kmsg").read_text())
    msg = o.check(w).message("x")  # type: ignore[union-attr]
    assert "2 pytest-xdist workers" in msg and "cannot be pinned" in msg
    o1, r1, _ = _oracle(tmp_path, workers=1)
    w1 = o1.begin("t")
    r1.queue = parse_kmsg_dump((DATA / "warn.kmsg").read_text())
    assert "cannot be pinned" not in o1.check(w1).message("x")  # type: ignore[union-attr]


def test_unreadable_log_turns_the_oracle_off():
    o = KmsgOracle("fail", path="/nonexistent/kmsg")
    assert not o.active and "/nonexistent/kmsg" in o.reason
    assert o.begin("t") is None and o.check(None) is None


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="--kmsg"):
        KmsgOracle("loud")


def test_window_type_is_exported():
    assert Window("t", False, 0).taint_seen == 0


# --- end to end: pytest + harness plugin + the real /dev/kmsg -------------------------------------


def _inject_module(token: str) -> str:
    return f'''
import pytest

def inject():
    # The header must start the message for the matcher; the tag says what it is.
    with open("/dev/kmsg", "w") as f:
        f.write("<4>WARNING: CPU: 0 PID: 1 at kvm_harness_injection.c:1 kvm_harness_injection+0x0/0x1 "
                "[{INJECTION} {token}]\\n")

@pytest.mark.kmsg_accept_user
def test_injects_and_accepts_user_records():
    inject()

def test_injects_but_default_counts_kernel_records_only():
    inject()

def test_clean():
    pass
'''


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "harness.pytest.plugin", "-p", "no:cacheprovider", *args)


def test_e2e_injected_record_fails_the_case_and_is_quoted(pytester):
    _need_kmsg_rw()
    token = uuid.uuid4().hex
    pytester.makepyfile(test_inject=_inject_module(token))
    ktap = pytester.path / "out.ktap"
    res = _run(pytester, "-rA", f"--ktap={ktap}")
    res.assert_outcomes(passed=2, failed=1)
    out = res.stdout.str()
    assert "FAILED test_inject.py::test_injects_and_accepts_user_records" in out
    assert "kernel health: 1 kernel log splat (WARNING) during the test body of " \
           "test_inject.py::test_injects_and_accepts_user_records" in out
    assert f"{INJECTION} {token}] (user-space record, facility 1)" in out
    tests = {t.description: t for t in parse_ktap(ktap.read_text()).tests}
    bad = tests["test_inject.py::test_injects_and_accepts_user_records"]
    assert not bad.ok and any(token in d for d in bad.diagnostics)
    assert tests["test_inject.py::test_injects_but_default_counts_kernel_records_only"].ok


def test_e2e_warn_mode_and_off_mode_do_not_fail(pytester):
    _need_kmsg_rw()
    token = uuid.uuid4().hex
    pytester.makepyfile(test_inject=_inject_module(token))
    res = _run(pytester, "--kmsg=warn", "-W", "always")
    res.assert_outcomes(passed=3)
    assert "KernelHealthWarning" in res.stdout.str() and token in res.stdout.str()
    res = _run(pytester, "--kmsg=off")
    res.assert_outcomes(passed=3)
    assert token not in res.stdout.str()


def test_e2e_without_access_says_so_once_and_does_not_fail(pytester):
    token = uuid.uuid4().hex
    pytester.makepyfile(test_inject=_inject_module(token))
    res = _run(pytester, "--kmsg-dev=/nonexistent/kmsg")
    res.assert_outcomes(passed=3)
    text = res.stdout.str() + res.stderr.str()
    assert text.count("cannot open /nonexistent/kmsg") == 1


def test_e2e_parallel_fails_every_case_whose_window_holds_the_record(pytester):
    _need_kmsg_rw()
    token = uuid.uuid4().hex
    d = pytester.path
    # A handshake through files makes the two windows overlap whatever the workers' start-up skew.
    pytester.makepyfile(test_par=f'''
import pathlib, time
import pytest

D = pathlib.Path({str(d)!r})

def wait_for(name):
    end = time.monotonic() + 60
    while not (D / name).exists():
        assert time.monotonic() < end, f"{{name}} never appeared: the cases did not run in parallel"
        time.sleep(0.05)

@pytest.mark.kmsg_accept_user
def test_a_injects():
    wait_for("b_started")
    with open("/dev/kmsg", "w") as f:
        f.write("<4>WARNING: CPU: 0 PID: 1 at kvm_harness_injection.c:1 f+0x0/0x1 [{INJECTION} {token}]\\n")
    (D / "a_done").touch()

@pytest.mark.kmsg_accept_user
def test_b_only_runs_at_the_same_time():
    (D / "b_started").touch()
    wait_for("a_done")
    time.sleep(0.2)
''')
    res = _run(pytester, "-n", "2", "-rA")
    res.assert_outcomes(failed=2)
    out = res.stdout.str()
    assert out.count(f"{INJECTION} {token}") >= 2
    assert "2 pytest-xdist workers ran cases at the same time" in out and "cannot be pinned" in out


# --- known kernel issues with a `kmsg` pattern -----------------------------------------------------

KNOWN_TOML = '''
[[issue]]
id = "demo-warn"
cases = ["cases/test_d.py::test_triggers[*]"]
reason = "demo"
kmsg = "WARNING: .* at kernel/sched/core\\\\.c:\\\\d+"
'''


def _known(tmp_path: Path) -> list:
    from harness.health.oracle import known_splats

    p = tmp_path / "known.toml"
    p.write_text(KNOWN_TOML)
    assert known_splats(set(), p) == []  # not in force: nothing
    (ks,) = known_splats({"demo-warn"}, p)
    return [ks]


def _warn(seq: int) -> list[KmsgRecord]:
    return [parse_kmsg_record(f"4,{seq},1,-;WARNING: CPU: 1 PID: 9 at kernel/sched/core.c:1234 f+0x0/0x1")]


def test_known_splat_in_a_case_the_issue_does_not_name_fails_it(tmp_path):
    # The issue's own cases run alone (exclusive.py), so the splat in another window is that window's.
    o, r, _ = _oracle(tmp_path, workers=2)
    o.known = _known(tmp_path)
    w = o.begin("cases/test_other.py::test_x")
    r.queue = _warn(7)
    f = o.check(w)
    assert f and "matches known kernel issue demo-warn, whose cases do not name this one" in f.message("x")


def test_exclusive_window_says_the_record_is_pinned(tmp_path):
    o, r, _ = _oracle(tmp_path, workers=2)
    w = o.begin("cases/test_x.py::test_y", exclusive=True)
    r.queue = parse_kmsg_dump((DATA / "warn.kmsg").read_text())
    msg = o.check(w).message("x")  # type: ignore[union-attr]
    assert "cannot be pinned" not in msg


def test_known_splat_fails_the_cases_it_names_and_unpinned_serial_cases(tmp_path):
    o, r, _ = _oracle(tmp_path, workers=2)
    o.known = _known(tmp_path)
    w = o.begin("cases/test_d.py::test_triggers[long64]")  # the issue's own (strict xfail) case
    r.queue = _warn(8)
    f = o.check(w)
    assert f and "this case is its xfail" in f.message("x")
    o1, r1, _ = _oracle(tmp_path, workers=1)  # serial: the record is pinned to this case
    o1.known = _known(tmp_path)
    w1 = o1.begin("cases/test_other.py::test_x")
    r1.queue = _warn(9)
    f1 = o1.check(w1)
    assert f1 and "triggers it too" in f1.message("x")


def test_other_splats_still_fail_next_to_a_known_one(tmp_path):
    o, r, _ = _oracle(tmp_path, workers=2)
    o.known = _known(tmp_path)
    w = o.begin("cases/test_other.py::test_x")
    r.queue = _warn(10) + parse_kmsg_dump((DATA / "kasan.kmsg").read_text())
    f = o.check(w)
    assert f and [k for k, _ in f.splats] == ["WARNING", "KASAN"]
