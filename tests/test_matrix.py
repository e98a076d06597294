"""The kernel matrix and the packaged-version bisect: pure logic (cells from JUnit, the table, the
known-issue range check, the binary search, Debian name resolution). Real boots are in
tests/test_kernel_runner.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from harness import known_issues
from harness.matrix import known, report
from harness.matrix.cells import Cell, KernelRun, from_junit, ktap_header
from harness.qemu import debian, runner
from harness.qemu import version_bisect as vb

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="cases.test_memslots" name="test_bad_input[gpa-wraps]" time="0.1" />
<testcase classname="cases.test_memslots" name="test_bad_input[gmem-binding-overlap]" time="0.2">
 <properties><property name="known_issue" value="gmem-binding-overlap-einval" /></properties>
 <failure message="[XPASS(strict)] known kernel issue gmem-binding-overlap-einval: EINVAL">x</failure></testcase>
<testcase classname="cases.test_dirty_log" name="test_dirty_ring_never_overflows" time="1">
 <properties><property name="known_issue" value="pvm-dirty-ring-overflow" /></properties>
 <skipped type="pytest.xfail" message="known kernel issue pvm-dirty-ring-overflow: ring" /></testcase>
<testcase classname="cases.test_dirty_log" name="test_dirty_concurrent_no_loss[ring-anon]" time="1">
 <properties><property name="known_issue" value="pvm-dirty-ring-overflow-concurrent" /></properties></testcase>
<testcase classname="cases.test_backings" name="test_guest_memfd_source" time="0">
 <skipped type="pytest.skip" message="KVM_CAP_GUEST_MEMFD is 0 on this kernel" /></testcase>
<testcase classname="cases.test_races" name="test_race[slot-readd-anon-2vcpu-4k]" time="1">
 <failure message="kernel health: 1 kernel log splat (WARNING)&#10;more">WARNING: at tdp_mmu.c:1137</failure></testcase>
<testcase classname="cases.test_system" name="test_x" time="0"><error message="fixture failed">tb</error></testcase>
</testsuite></testsuites>"""


@pytest.fixture
def cells(tmp_path: Path) -> dict[str, Cell]:
    p = tmp_path / "junit.xml"
    p.write_text(JUNIT)
    return from_junit(p)


def test_cells_from_junit(cells):
    c = cells
    assert c["cases/test_memslots.py::test_bad_input[gpa-wraps]"].outcome == "pass"
    xp = c["cases/test_memslots.py::test_bad_input[gmem-binding-overlap]"]
    assert (xp.outcome, xp.issue, xp.strict, xp.bad) == ("xpass", "gmem-binding-overlap-einval", True, True)
    xf = c["cases/test_dirty_log.py::test_dirty_ring_never_overflows"]
    assert (xf.outcome, xf.issue, xf.bad) == ("xfail", "pvm-dirty-ring-overflow", False)
    soft = c["cases/test_dirty_log.py::test_dirty_concurrent_no_loss[ring-anon]"]
    assert (soft.outcome, soft.strict, soft.bad) == ("xpass", False, False)
    sk = c["cases/test_backings.py::test_guest_memfd_source"]
    assert (sk.outcome, sk.detail) == ("skip", "KVM_CAP_GUEST_MEMFD is 0 on this kernel")
    f = c["cases/test_races.py::test_race[slot-readd-anon-2vcpu-4k]"]
    assert f.outcome == "fail" and f.detail == "kernel health: 1 kernel log splat (WARNING)" and "1137" in f.text
    assert c["cases/test_system.py::test_x"].outcome == "error"


def test_ktap_header(tmp_path):
    p = tmp_path / "k.txt"
    p.write_text("KTAP version 1\n1..3\n# kernel 7.3.4+deb13-amd64 (x86_64)\n# backend kvm_amd\n# paging tdp\nok 1 a\n")
    assert ktap_header(p) == {"release": "7.3.4+deb13-amd64", "backend": "kvm_amd", "paging": "tdp"}


def test_table_text_json_html_and_verdict(cells, tmp_path):
    host = KernelRun("host", "6.18.44", "kvm_pvm", 0, "verdict", "", 10.0,
                     {"cases/test_memslots.py::test_bad_input[gpa-wraps]": Cell("pass")})
    deb = KernelRun("debian:7.3.4", "7.3.4+deb13-amd64", "kvm_amd", 1, "verdict", "", 80.0, cells)
    runs = [host, deb]
    txt = report.text(runs, ["python", "-m", "harness", "matrix"])
    assert "XPASS(gmem-binding-overlap-einval)" in txt and "xfail(pvm-dirty-ring-overflow)" in txt
    assert "3 failing cell(s)" in txt  # strict xpass, fail, error; not the non-strict xpass
    data = json.loads(report.to_json(runs, ["x"]))
    assert data["cells"]["cases/test_memslots.py::test_bad_input[gpa-wraps]"]["host"]["outcome"] == "pass"
    page = report.to_html(runs, ["x"])
    assert page.count('<a href="#d') == 4  # 3 failing cells and 1 xfail link to their text
    assert "WARNING: at tdp_mmu.c:1137" in page
    assert report.verdict(runs) == 1 and report.verdict([host]) == 0
    assert report.verdict([KernelRun("debian:6.1", outcome="boot-failure")]) == 1  # no verdict, no pass


def _issue(**kw) -> known_issues.KnownIssue:
    case = "cases/test_memslots.py::test_bad_input[gmem-binding-overlap]"
    base = {"id": "gmem-binding-overlap-einval", "cases": (case,), "reason": "r", "kernel": ">=6.8"}
    base.update(kw)
    return known_issues.KnownIssue(**base)


def test_known_issue_ranges_against_cells(cells):
    deb = KernelRun("debian:7.3.4", "7.3.4+deb13-amd64", "kvm_amd", 1, "verdict", cells=cells)
    found = known.disagreements([deb], [_issue()], {})
    assert len(found) == 1 and "XPASSes: the bug is fixed there" in found[0]
    assert known.disagreements([deb], [_issue(kernel=">=6.8, <7.3")], {}) == []
    old = KernelRun("debian:6.1", "6.1.0-50-amd64", "kvm_amd", 1, "verdict",
                    cells={"cases/test_memslots.py::test_bad_input[gmem-binding-overlap]": Cell("fail", "EINVAL")})
    (line,) = known.disagreements([old], [_issue(kernel=">=6.8")], {})
    assert "outside kernel = '>=6.8'" in line and "fails" in line
    # a backend-specific entry says nothing about another backend's failure
    assert known.disagreements([old], [_issue(kernel=">=6.8", backend="kvm_pvm")], {}) == []


def _k(up: str) -> debian.Kernel:
    return debian.Kernel(up + "-amd64", f"linux-image-{up}-amd64", up + "-1", up, ("x",))


def test_version_search_finds_the_first_bad_and_skips_untestable():
    vs = [_k(v) for v in ("6.12.1", "6.12.2", "6.13.1", "6.14.1", "7.0.1", "7.1.1", "7.2.1")]
    first_bad = 4
    tested = []

    def test(k: debian.Kernel) -> int:
        tested.append(k.upstream)
        i = vs.index(k)
        if k.upstream == "6.14.1":
            return runner.SKIP
        return runner.BAD if i >= first_bad else runner.GOOD

    code, lo, hi, skipped = vb.search(vs, test, io.StringIO())
    assert (code, vs[hi].upstream, vs[lo].upstream) == (vb.UNDECIDED, "7.0.1", "6.13.1")
    assert skipped == [3] and tested[:2] == ["6.12.1", "7.2.1"]  # both ends first
    code, lo, hi, _ = vb.search(vs, lambda k: runner.BAD if vs.index(k) >= 5 else runner.GOOD, io.StringIO())
    assert (code, vs[lo].upstream, vs[hi].upstream) == (vb.FOUND, "7.0.1", "7.1.1")
    out = io.StringIO()
    assert vb.search(vs, lambda k: runner.GOOD, out)[0] == vb.ENDS_WRONG
    assert "the ends do not hold" in out.getvalue()


def test_between_leaves_out_release_candidates_unless_asked():
    ks = [_k("7.2.13"), debian.Kernel("7.3-amd64", "linux-image-7.3-amd64", "7.3~rc7-1", "7.3-rc7", ("x",)),
          _k("7.3.4")]
    assert [k.upstream for k in vb.between(ks, ks[0], ks[2])] == ["7.2.13", "7.3.4"]
    assert [k.upstream for k in vb.between(ks, ks[0], ks[2], include_rc=True)] == ["7.2.13", "7.3-rc7", "7.3.4"]
    assert ks[1].key < ks[2].key  # an rc sorts before its release


def test_debian_names_resolve(monkeypatch, tmp_path):
    ks = [_k("6.1.176"), _k("6.12.95"), _k("6.12.117"), _k("7.2.6+deb13"), _k("7.3.4"),
          debian.Kernel("7.3-amd64", "linux-image-7.3-amd64", "7.3~rc7-1", "7.3-rc7", ("x",))]
    ks = [debian.Kernel(k.abi, k.package, k.version, debian.upstream_of(k.version), k.parts) for k in ks]
    a = debian.Archive(tmp_path)
    monkeypatch.setattr(a, "kernels", lambda: sorted(ks, key=lambda k: k.key))
    assert a.resolve("debian:6.12").upstream == "6.12.117"
    assert a.resolve("debian:latest").upstream == "7.3.4"
    assert a.resolve("debian:7.3-rc7").abi == "7.3-amd64"
    assert a.resolve("debian:7.3").upstream == "7.3.4"  # a release, not the rc whose ABI is "7.3"
    assert a.resolve("debian:7.2.6+deb13").abi == "7.2.6+deb13-amd64"
    assert a.resolve("debian:6.1").upstream == "6.1.176"
    with pytest.raises(debian.KernelFetchError, match="no such kernel"):
        a.resolve("debian:6.13")
    with pytest.raises(debian.KernelFetchError, match="not a packaged kernel name"):
        a.resolve("7.3.4")
    assert debian.upstream_of("7.3.4-1~bpo13+1") == "7.3.4" and debian.upstream_of("7.3~rc7-1~exp1") == "7.3-rc7"


def test_unreliable_settings_are_named():
    assert runner.unreliable("tcg", 2) and "int3" in runner.unreliable("tcg", 2)  # type: ignore[operator]
    assert runner.unreliable("tcg", 1) is None and runner.unreliable("kvm", 4) is None


def test_known_issue_check_follows_each_runs_paging():
    """A TDP-only entry: an XPASS on a shadow-paging run is no disagreement, on a TDP run it is."""
    from harness.known_issues import KnownIssue
    from harness.matrix.known import disagreements

    ki = KnownIssue(id="t", cases=("c.py::t",), reason="r", environment="tcg", paging="tdp")
    cell = Cell("xpass", strict=True)
    runs = [KernelRun("debian:7.3.4", "7.3.4+deb13-amd64", "kvm_amd", 1, "verdict", cells={"c.py::t": cell},
                      paging=p) for p in ("tdp", "shadow")]
    runs[1].kernel = "debian:7.3.4+npt0"
    out = disagreements(runs, [ki], {}, {"debian:7.3.4": "tcg", "debian:7.3.4+npt0": "tcg"})
    assert len(out) == 1 and "debian:7.3.4 (" in out[0]


def test_markdown_for_docs(cells):
    """The docs table: the run's command and date, each kernel's counts, every non-pass cell, one row
    per test function, skip reasons counted per kernel."""
    host = KernelRun("host", "6.18.44", "kvm_pvm", 0, "verdict", "", 10.0,
                     {"cases/test_memslots.py::test_bad_input[gpa-wraps]": Cell("pass"),
                      "cases/test_memslots.py::test_bad_input[slot-big]": Cell("skip", "no such thing"),
                      "cases/test_memslots.py::test_gmem[x]": Cell("skip", "KVM_CAP_GUEST_MEMFD is 0")},
                     paging="shadow")
    deb = KernelRun("debian:7.3.4", "7.3.4+deb13-amd64", "kvm_amd", 1, "verdict", "", 80.0, cells)
    md = report.markdown([host, deb], "python -m harness matrix -- cases/", "2026-12-04T19:00:00+00:00",
                         "python -m harness matrix --no-run --markdown docs/x.md")
    assert "from the run of 2026-12-04T19:00:00+00:00" in md and "    python -m harness matrix -- cases/" in md
    assert "| host | 6.18.44 | kvm_pvm | shadow | 0 | 10 s | 1 | 0 | 0 | 0 | 0 | 2 |" in md
    assert "| `cases/test_memslots.py::test_bad_input` | 1 pass, 1 skip |" in md
    assert "XPASS(gmem-binding-overlap-einval)" in md and "xfail(pvm-dirty-ring-overflow)" in md
    assert "| KVM_CAP_GUEST_MEMFD is 0 | 1 |" in md


def test_rebuild_config_matches_whole_version_components(monkeypatch, tmp_path):
    """--no-run finds a cached KVM rebuild's config by version prefix: debian:6.1 is not 6.12."""
    from harness.cli import matrix as mcli

    d = tmp_path / "b" / "modules"
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(b"")
    (d / "config").write_text("CONFIG_KVM=m\nCONFIG_KVM_SW_PROTECTED_VM=y\n")
    meta = {"kernel": {"name": "debian:6.12.117"}, "options": {"KVM_SW_PROTECTED_VM": "y"},
            "dir": str(tmp_path / "b"), "built": "2026-12-05"}
    monkeypatch.setattr(mcli.kvmbuild, "cached", lambda: [meta])
    monkeypatch.setattr(mcli.runner, "kernel_config", lambda image: {"CONFIG_KVM_SW_PROTECTED_VM": "y"})
    assert mcli._rebuild_config("debian:6.12+KVM_SW_PROTECTED_VM=y") == {"CONFIG_KVM_SW_PROTECTED_VM=y"}
    assert mcli._rebuild_config("debian:6.12.117+KVM_SW_PROTECTED_VM=y") == {"CONFIG_KVM_SW_PROTECTED_VM=y"}
    assert mcli._rebuild_config("debian:6.1+KVM_SW_PROTECTED_VM=y") == frozenset()
    assert mcli._rebuild_config("debian:6.12+KVM_PROVE_MMU=y") == frozenset()
