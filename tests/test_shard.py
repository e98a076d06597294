"""`--shard I/N` (harness/pytest/shard.py) and the merge of the shards' result files
(harness/report/merge.py), which the kernel runner's --shards uses."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.matrix.cells import from_junit, ktap_header
from harness.pytest import durations
from harness.pytest.shard import split
from harness.report import merge
from harness.report.ktap import KtapResult, KtapWriter
from harness.report.ktap_parser import parse_ktap

pytest_plugins = ["pytester"]

CASES = {
    "test_a": '''
import pytest

@pytest.mark.parametrize("x", range(5))
def test_p(x):
    pass

def test_one():
    pass

@pytest.mark.race_soak
def test_soak():
    pass
''',
    "test_b": '''
def test_b1():
    pass

def test_b2():
    pass
''',
}


def _collect(pytester: pytest.Pytester, *args: str) -> tuple[list[str], pytest.RunResult]:
    res = pytester.runpytest_subprocess("-p", "harness.pytest.shard", "-p", "no:cacheprovider",
                                        "--collect-only", "-q", *args)
    return [ln for ln in res.stdout.lines if "::" in ln], res


# ---- the option ------------------------------------------------------------------------------------

@pytest.mark.parametrize("i,n", [(i, n) for n in range(1, 6) for i in range(1, n + 1)])
def test_split_is_round_robin(i, n):
    items = list(range(13))
    keep, drop = split(items, i, n)
    assert keep == items[i - 1::n] and sorted(keep + drop) == items


def test_heavy_cases_are_balanced_across_shards():
    """Weights (shard_weight) steer the split: four heavy cases no longer land in one shard (the
    first 2-shard run of debian:7.3.4 put all four in shard 1: 560 s against 435 s)."""
    items = list(range(40))
    heavy = {0: 120.0, 4: 45.0, 10: 45.0, 20: 15.0}
    weights = [heavy.get(k, 1.0) for k in items]
    one, two = (split(items, i, 2, weights)[0] for i in (1, 2))
    assert sorted(one + two) == items and not set(one) & set(two)
    loads = [sum(weights[k] for k in s) for s in (one, two)]
    assert abs(loads[0] - loads[1]) <= 120.0 - (45 + 45 + 15) + 2, loads
    assert 0 in one and {4, 10}.issubset(two), (one, two)  # the biggest alone, the next two on the other
    assert split(items, 1, 2, [1.0] * 40)[0] == split(items, 1, 2)[0] == items[0::2]


def test_heaviest_first_evens_out_what_order_alone_cannot():
    """In collection order a late heavy case lands on whichever shard is lighter by then; dealt
    heaviest first the loads differ by at most the lightest case."""
    weights = [1.0] * 30 + [40.0, 40.0, 30.0, 30.0, 20.0]
    items = list(range(len(weights)))
    one, two = (split(items, i, 2, weights)[0] for i in (1, 2))
    assert one == sorted(one) and two == sorted(two)  # each shard keeps the collection order
    loads = sorted(sum(weights[k] for k in s) for s in (one, two))
    assert loads == [95.0, 95.0], (one, two)
    assert {30, 32, 34} <= set(one) and {31, 33} <= set(two)  # 40+30+20 and 40+30+20 ones
    # (dealt in collection order the ones split 15/15 first, and the 20 s case tips it: 105 s vs 85 s)


def _record(tmp_path: Path, cases: str) -> durations.Durations:
    (tmp_path / "j.xml").write_text(_junit(cases, 0, 0, 0, 0.0))
    out = tmp_path / "d.json"
    assert durations.main([str(tmp_path / "j.xml"), "-o", str(out), "--source", "debian:7.3.4 tcg"]) == 0
    d = durations.load(out)
    assert d is not None
    return d


def test_durations_recorded_from_junit(tmp_path):
    cases = "".join(f'<testcase classname="cases.test_a" name="test_p[{k}]" time="{t}" />'
                    for k, t in enumerate([0.2, 0.4, 0.3, 137.12, 2.5]))
    d = _record(tmp_path, cases)
    assert d.default == 0.3 and d.source == "debian:7.3.4 tcg"  # the mean of the three below 0.5 s
    assert dict(d.seconds) == {"cases/test_a.py::test_p[3]": 137.12, "cases/test_a.py::test_p[4]": 2.5}
    assert d.of("cases/test_a.py::test_p[0]") is None and durations.load(tmp_path / "none.json") is None


def test_durations_of_several_runs_are_each_cases_median(tmp_path):
    def run(name: str, times: list[float]) -> str:
        cases = "".join(f'<testcase classname="cases.test_a" name="test_p[{k}]" time="{t}" />'
                        for k, t in enumerate(times))
        (tmp_path / name).write_text(_junit(cases, 0, 0, 0, 0.0))
        return str(tmp_path / name)

    files = [run("a.xml", [0.8, 3.0, 0.1]), run("b.xml", [26.0, 3.2, 0.1]), run("c.xml", [0.9, 2.8, 0.1])]
    skipped = ('<testcase classname="cases.test_a" name="test_p[3]" time="0.01"><skipped message="no 1 GiB page"/>'
               '</testcase>')
    for name in ("a.xml", "b.xml"):  # skipped twice (no 1 GiB page), then ran once: 9.5 s is its time
        (tmp_path / name).write_text((tmp_path / name).read_text().replace("</testsuite>", skipped + "</testsuite>"))
    (tmp_path / "c.xml").write_text((tmp_path / "c.xml").read_text().replace(
        "</testsuite>", '<testcase classname="cases.test_a" name="test_p[3]" time="9.5" /></testsuite>'))
    (tmp_path / "shard.xml").write_text(_junit('<testcase classname="cases.test_b" name="test_q" time="7.0" />',
                                              0, 0, 0, 0.0))
    out = tmp_path / "d.json"
    assert durations.main([*files, str(tmp_path / "shard.xml"), "-o", str(out)]) == 0
    d = durations.load(out)
    assert d is not None
    # the 26 s outlier of one run does not count; the shard's own case is kept as it is
    assert dict(d.seconds) == {"cases/test_a.py::test_p[0]": 0.9, "cases/test_a.py::test_p[1]": 3.0,
                               "cases/test_a.py::test_p[3]": 9.5, "cases/test_b.py::test_q": 7.0}


def test_malformed_durations_file_is_named(tmp_path):
    (tmp_path / "d.json").write_text('{"seconds": []}')
    with pytest.raises(ValueError, match=r"d\.json: not a durations file .*re-record it"):
        durations.load(tmp_path / "d.json")


SLOW = {"test_a": """
import pytest

@pytest.mark.parametrize("x", range(6))
def test_p(x):
    pass

@pytest.mark.shard_weight(3)
def test_marked():
    pass
"""}


def test_measured_durations_steer_the_split(pytester):
    """test_p[0] measured at 10 s takes a shard alone; the mark counts n x the file's default."""
    pytester.makepyfile(**SLOW)
    whole, _ = _collect(pytester)
    assert len(whole) == 7
    one, _ = _collect(pytester, "--shard", "1/2")
    # no file: weight 1 each, the mark's 3 first (shard 1); shard 2 catches up with three
    assert one == ["test_a.py::test_p[3]", "test_a.py::test_p[5]", "test_a.py::test_marked"]
    (pytester.path / "cases").mkdir()
    (pytester.path / "cases" / "durations.json").write_text(
        '{"default": 0.5, "seconds": {"test_a.py::test_p[0]": 10.0}}')
    one, res = _collect(pytester, "--shard", "1/2")
    two, _ = _collect(pytester, "--shard", "2/2")
    assert one == ["test_a.py::test_p[0]"], res.stdout.str()
    assert two == whole[1:] and "balanced by measured durations" in res.stdout.str()
    (pytester.path / "cases" / "durations.json").write_text("{}")
    _, res = _collect(pytester, "--shard", "1/2")
    assert res.ret == pytest.ExitCode.USAGE_ERROR and "durations.json: not a durations file" in res.stderr.str()


def test_two_shards_partition_the_collection(pytester):
    pytester.makepyfile(**CASES)
    whole, _ = _collect(pytester)
    assert len(whole) == 8 and not any("test_soak" in n for n in whole)  # core's deselection comes first
    one, res1 = _collect(pytester, "--shard", "1/2")
    two, res2 = _collect(pytester, "--shard=2/2")
    assert set(one) | set(two) == set(whole) and not set(one) & set(two)
    assert one == whole[0::2] and two == whole[1::2]  # round-robin over the final order
    assert "shard 1/2: runs 4 of 8 collected cases" in res1.stdout.str()
    assert "4 deselected" in res2.stdout.str() or "5 deselected" in res2.stdout.str()
    again, _ = _collect(pytester, "--shard", "1/2")
    assert again == one  # deterministic
    three = [_collect(pytester, "--shard", f"{i}/3")[0] for i in (1, 2, 3)]
    assert sorted(n for s in three for n in s) == sorted(whole) and [len(s) for s in three] == [3, 3, 2]


def test_a_shard_with_no_case_says_so(pytester):
    pytester.makepyfile(test_c="def test_x():\n    pass\n")
    res = pytester.runpytest_subprocess("-p", "harness.pytest.shard", "-p", "no:cacheprovider", "--shard", "2/2")
    assert res.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert "shard 2/2: runs 0 of 1 collected cases" in res.stdout.str()  # what the runner reads


def test_shards_run_their_slice_under_xdist(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(**CASES)
    for spec, n in (("1/2", 4), ("2/2", 4), ("3/3", 2)):
        res = pytester.runpytest_subprocess("-p", "harness.pytest.shard", "-p", "no:cacheprovider",
                                            "-n", "2", "--shard", spec)
        res.assert_outcomes(passed=n)


@pytest.mark.parametrize("bad,why", [("0/2", "I must be 1..N"), ("3/2", "I must be 1..N"), ("x", "expected I/N"),
                                     ("1/0", "I must be 1..N"), ("2", "expected I/N"), ("1/x", "expected I/N")])
def test_bad_shard_is_a_usage_error(pytester, bad, why):
    pytester.makepyfile(test_c="def test_x():\n    pass\n")
    res = pytester.runpytest_subprocess("-p", "harness.pytest.shard", "-p", "no:cacheprovider", f"--shard={bad}")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--shard {bad!r}: {why}" in res.stderr.str()


# ---- KTAP merge ------------------------------------------------------------------------------------

HEADER = ["kernel 7.3.4+deb13-amd64 (x86_64)", "backend kvm_amd", "paging tdp", "kernel-log oracle: fail"]


def _ktap(results: list[KtapResult], header: list[str] = HEADER, close: bool = True) -> str:
    """What harness/pytest/ktap.py's reporter writes."""
    buf = io.StringIO()
    w = KtapWriter(buf, len(results), suite="kvm")
    for h in header:
        w.diagnostic(h)
    for r in results:
        w.add(r)
    if close:
        w.close()
    return buf.getvalue()


SHARD1 = [KtapResult("cases/test_a.py::test_p[0]", "pass"),
          KtapResult("cases/test_a.py::test_p[2]", "fail", "assert 1 == 2\n\nE   and more", ["kvm-harness kmsg:\nok"]),
          KtapResult("cases/test_b.py::test_b1", "skip", "no guest_memfd here")]
SHARD2 = [KtapResult("cases/test_a.py::test_p[1]", "xfail", "known kernel issue x: evidence\nsecond line"),
          KtapResult("cases/test_a.py::test_p[3]", "timeout", "vcpu 0 did not exit\ndetails"),
          KtapResult("cases/test_b.py::test_b2", "pass", "", ["XPASS (non-strict): y"])]


def test_ktap_merge_is_one_valid_document_renumbered_in_shard_order(tmp_path):
    text = merge.merge_ktap([merge.Part("shard 1/2", _ktap(SHARD1)), merge.Part("shard 2/2", _ktap(SHARD2))])
    doc = parse_ktap(text)  # the project's strict parser
    assert doc.plan == 6 and [t.number for t in doc.tests] == [1, 2, 3, 4, 5, 6]
    assert [t.description for t in doc.tests] == [r.name for r in SHARD1 + SHARD2]
    assert [t.directive for t in doc.tests] == [None, None, "SKIP", "XFAIL", "TIMEOUT", None]
    assert [t.ok for t in doc.tests] == [True, False, True, True, False, True]
    assert doc.header_diagnostics == ["selftests: kvm-harness: kvm"]
    assert text.count("# kernel 7.3.4") == 1 and text.count("# backend kvm_amd") == 1  # the header once
    assert doc.tests[0].diagnostics[1:] == HEADER  # after the "merged from" line, before the results
    assert "merged from 2 shards" in doc.tests[0].diagnostics[0]
    assert doc.trailing_diagnostics == ["Totals: pass:2 fail:1 xfail:1 xpass:0 skip:1 error:0 timeout:1"]
    assert doc.tests[1].diagnostics == ["kvm-harness kmsg:", "ok", "assert 1 == 2", "", "E   and more"]
    assert doc.tests[3].diagnostics == ["known kernel issue x: evidence", "second line"]
    f = tmp_path / "k.txt"
    f.write_text(text)
    assert ktap_header(f) == {"release": "7.3.4+deb13-amd64", "backend": "kvm_amd", "paging": "tdp"}


def test_ktap_merge_keeps_every_line_of_a_shard():
    """Results, their diagnostics, reasons: a shard's document comes through line for line."""
    one = _ktap(SHARD1 + SHARD2)
    merged = merge.merge_ktap([merge.Part("shard 1/2", one), merge.Part("shard 2/2", _ktap([]))])
    assert [ln for ln in merged.splitlines() if not ln.startswith("# merged from")] == one.splitlines()


def test_ktap_merge_of_missing_empty_and_cut_short_shards():
    cut = _ktap(SHARD2, close=False)
    cut = cut[: cut.index("not ok 2")]  # the guest died while its second case ran
    text = merge.merge_ktap([merge.Part("shard 1/4", _ktap(SHARD1)), merge.Part("shard 2/4", cut, "crash: panic"),
                             merge.Part("shard 3/4", None, "timeout: the overall timeout expired"),
                             merge.Part("shard 4/4", _ktap([]))])
    doc = parse_ktap(text)
    names = [t.description for t in doc.tests]
    assert doc.plan == len(doc.tests) == 3 + 3 + 1
    assert names[3] == SHARD2[0].name and names[4:6] == ["shard 2/4 unreported_2", "shard 2/4 unreported_3"]
    assert [t.directive for t in doc.tests[4:]] == ["ERROR"] * 3 and names[6] == "kvm-harness shard 3/4"
    assert "timeout: the overall timeout expired" in doc.tests[6].reason
    assert any("cut short" in d and "crash: panic" in d for d in doc.tests[3].diagnostics)
    assert text.count("# backend kvm_amd") == 1


# ---- JUnit merge -----------------------------------------------------------------------------------

def _junit(cases: str, tests: int, failures: int, skipped: int, time: float) -> str:
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" '
            f'errors="0" failures="{failures}" skipped="{skipped}" tests="{tests}" time="{time}" '
            'timestamp="2025-01-01T00:00:00" hostname="guest">' + cases + "</testsuite></testsuites>")


J1 = ('<testcase classname="cases.test_a" name="test_p[0]" time="0.1" />'
      '<testcase classname="cases.test_a" name="test_p[2]" time="0.2"><failure message="assert 1 == 2">E</failure>'
      '</testcase>')
J2 = ('<testcase classname="cases.test_a" name="test_p[1]" time="0.1"><properties><property name="known_issue" '
      'value="x" /></properties><skipped type="pytest.xfail" message="known kernel issue x: e" /></testcase>'
      '<testcase classname="cases.test_b" name="test_b1" time="0.1"><skipped type="pytest.skip" message="no" />'
      '</testcase>')


def test_junit_merge_sums_the_counters_and_keeps_every_case(tmp_path):
    text = merge.merge_junit([merge.Part("shard 1/2", _junit(J1, 2, 1, 0, 3.5)),
                              merge.Part("shard 2/2", _junit(J2, 2, 0, 2, 4.25))])
    root = ET.fromstring(text)
    (suite,) = root.findall("testsuite")
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == \
        {"tests": "4", "failures": "1", "errors": "0", "skipped": "2"}
    assert float(suite.get("time")) == 4.25 and suite.get("hostname") == "guest"  # side by side: the longest
    assert [c.get("name") for c in suite.iter("testcase")] == ["test_p[0]", "test_p[2]", "test_p[1]", "test_b1"]
    f = tmp_path / "j.xml"
    f.write_text(text)
    cells = from_junit(f)  # what the matrix makes of it
    assert {k: c.outcome for k, c in cells.items()} == {
        "cases/test_a.py::test_p[0]": "pass", "cases/test_a.py::test_p[2]": "fail",
        "cases/test_a.py::test_p[1]": "xfail", "cases/test_b.py::test_b1": "skip"}
    assert cells["cases/test_a.py::test_p[1]"].issue == "x"


def test_junit_merge_names_a_shard_without_a_file():
    text = merge.merge_junit([merge.Part("shard 1/2", _junit(J1, 2, 1, 0, 3.5)),
                              merge.Part("shard 2/2", None, "crash: the guest died")])
    suite = ET.fromstring(text).find("testsuite")
    assert (suite.get("tests"), suite.get("errors")) == ("3", "1")
    last = list(suite.iter("testcase"))[-1]
    assert last.get("name") == "shard 2/2" and "crash: the guest died" in last.find("error").get("message")


def test_read_parts(tmp_path):
    (tmp_path / "a").write_text("x")
    parts = merge.read_parts([tmp_path / "a", tmp_path / "b"], ["s1", "s2"], ["", "why"])
    assert [(p.label, p.text, p.why) for p in parts] == [("s1", "x", ""), ("s2", None, "why")]
    merge.write_atomically(Path(tmp_path / "c"), "data")
    assert (tmp_path / "c").read_text() == "data" and not list(tmp_path.glob("*.merging"))


def test_the_committed_durations_file_loads_and_names_real_cases():
    """cases/durations.json is what --shard balances on: it loads, and what it names are case ids of
    the suite's files (a renamed file leaves entries that weigh nothing: re-record then)."""
    root = Path(__file__).resolve().parents[1]
    d = durations.load(root / durations.DEFAULT_FILE)
    assert d is not None and 0 < d.default < durations.THRESHOLD
    assert d.seconds and all(v >= durations.THRESHOLD for v in d.seconds.values())
    files = {case.split("::")[0] for case in d.seconds}
    assert all((root / f).is_file() for f in files), files
