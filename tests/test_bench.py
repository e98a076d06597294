"""bench/: the record's schema, compare() on hand-written records, the compare command's exit
codes (all without KVM), and one smoke run of every registered pair with tiny counts against the
real /dev/kvm (no timing is asserted anywhere: the machine is shared and timings are noise).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import record
from bench.__main__ import Result, main, run_c, run_py
from bench.image import merged
from bench.registry import BENCHES

REPO = Path(__file__).resolve().parents[1]
COMMIT = {"sha": "0123456789abcdef0123456789abcdef01234567", "short": "0123456", "dirty": False}
MACHINE = {"kernel": "6.18.0", "kvm_backend": "kvm_intel", "cpu_model": "Test CPU", "cpus": 2, "thp": None}
WHEN = dt.datetime(2026, 1, 31, 12, 34, 56, tzinfo=dt.UTC)


def entry(harness: list[float], c: list[float], *, unit: str = "ops/s", count: int = 100,
          secondary: dict | None = None, params: dict | None = None) -> dict:
    return record.bench_entry(label="a pair", unit=unit, count=count, target=0.5, c=c, harness=harness,
                              secondary=secondary, params=params)


def rec(benches: dict[str, dict], skipped: dict[str, str] | None = None, **commit: object) -> dict:
    return record.make_record(benches, skipped or {}, 5, commit={**COMMIT, **commit}, machine=MACHINE,
                              created=WHEN)


# tight samples (spread 2 %) around a median
def tight(median: float) -> list[float]:
    return [median * f for f in (0.99, 0.995, 1.0, 1.005, 1.01)]


# ---- the record -------------------------------------------------------------------------------------
def test_record_follows_its_schema_and_survives_json():
    r = rec({"pio_exits": entry(tight(60_000), tight(100_000), unit="exits/s",
                                secondary={"sweeps_per_s": (tight(10), tight(8))})},
            {"dirty_ring_harvest": "KVM_CAP_DIRTY_LOG_RING is 0"})
    assert record.validate(r) == []
    back = json.loads(json.dumps(r))
    assert record.validate(back) == []
    assert back["schema"] == record.SCHEMA
    assert back["created"] == "2026-01-31T12:34:56Z"
    assert set(back["commit"]) == {"sha", "short", "dirty"}
    assert {"kernel", "kvm_backend", "cpu_model", "cpus"} <= set(back["machine"])
    assert set(back["python"]) == {"version", "implementation"}
    b = back["benchmarks"]["pio_exits"]
    assert b["unit"] == "exits/s" and b["count"] == 100 and b["rounds"] == 5 and b["params"] == {}
    for side in ("c", "harness"):
        assert set(b[side]) == {"samples", "median", "min", "max"}
        assert len(b[side]["samples"]) == 5
    assert b["harness"]["median"] == 60_000 and b["c"]["median"] == 100_000
    assert b["ratio"]["median"] == pytest.approx(0.6)
    assert len(b["ratio"]["per_round"]) == 5
    assert b["ratio"]["min"] <= b["ratio"]["median"] <= b["ratio"]["max"]
    assert b["meets_target"] is True
    assert b["secondary"]["sweeps_per_s"]["ratio"] == pytest.approx(0.8)
    assert back["skipped"] == {"dirty_ring_harvest": "KVM_CAP_DIRTY_LOG_RING is 0"}


def test_record_file_name_has_date_and_commit(tmp_path):
    clean = rec({"x": entry([1.0], [2.0])})
    assert record.record_name(clean) == "2026-01-31T123456-0123456.json"
    dirty = rec({"x": entry([1.0], [2.0])}, dirty=True)
    p = record.write_record(dirty, tmp_path / "results" / "bench")
    assert p.name == "2026-01-31T123456-0123456-dirty.json"
    assert record.load_record(p) == json.loads(json.dumps(dirty))


def test_record_of_this_checkout_has_commit_and_machine():
    r = record.make_record({}, {}, 1)
    assert record.validate(r) == []
    if shutil.which("git") and (REPO / ".git").exists():
        assert len(r["commit"]["sha"]) == 40 and isinstance(r["commit"]["dirty"], bool)
    assert r["machine"]["cpus"] == os.cpu_count()
    assert r["machine"]["kernel"] == os.uname().release


@pytest.mark.parametrize(("breakage", "complaint"), [
    (lambda r: r.pop("commit"), "commit"),
    (lambda r: r["machine"].pop("kvm_backend"), "machine"),
    (lambda r: r.update(schema="other/2"), "schema"),
    (lambda r: r["benchmarks"]["x"]["c"].update(samples=[]), "benchmarks.x.c.samples"),
    (lambda r: r["benchmarks"]["x"]["harness"].update(min=99.0), "benchmarks.x.harness: min <= median"),
    (lambda r: r["benchmarks"]["x"].pop("ratio"), "benchmarks.x.ratio"),
    (lambda r: r.update(skipped={"y": 3}), "skipped"),
])
def test_validate_names_what_is_wrong(breakage, complaint):
    r = rec({"x": entry(tight(5), tight(10))})
    breakage(r)
    problems = record.validate(r)
    assert any(p.startswith(complaint) for p in problems), problems


def test_bench_entry_refuses_unpaired_rounds():
    with pytest.raises(ValueError, match="rounds"):
        entry([1.0, 2.0], [1.0])


# ---- compare ----------------------------------------------------------------------------------------
def test_compare_better():
    a = rec({"p": entry(tight(50_000), tight(100_000))})
    b = rec({"p": entry(tight(70_000), tight(100_000))})
    cmp = record.compare(a, b, fail_above=5)
    (d,) = cmp.diffs
    assert d.status == "compared"
    h, c, r = d.change("harness"), d.change("C"), d.change("ratio")
    assert h.pct == pytest.approx(40.0) and h.verdict == "better"
    assert c.pct == pytest.approx(0.0) and c.verdict == "within noise"
    assert r.a == pytest.approx(0.5) and r.b == pytest.approx(0.7) and r.verdict == "better"
    assert cmp.regressions() == [] and cmp.exit_code == 0
    text = cmp.render()
    assert "better" in text and "ok: no harness/C ratio got worse by more than 5%" in text


def test_compare_worse_and_fail_above():
    a = rec({"p": entry(tight(50_000), tight(100_000))})
    b = rec({"p": entry(tight(40_000), tight(100_000))})  # ratio 0.5 -> 0.4: -20 %
    cmp = record.compare(a, b)
    r = cmp.diffs[0].change("ratio")
    assert r.pct == pytest.approx(-20.0) and r.verdict == "worse" and r.beyond_noise
    assert cmp.exit_code == 0  # no --fail-above: report only
    assert record.compare(a, b, fail_above=30).exit_code == 0
    failing = record.compare(a, b, fail_above=10)
    assert [d.name for d in failing.regressions()] == ["p"] and failing.exit_code == 1
    assert "FAIL: p: harness/C ratio 0.500 -> 0.400 (-20.0%)" in failing.render()


def test_compare_ratio_worse_because_c_got_faster():
    a = rec({"p": entry(tight(50_000), tight(100_000))})
    b = rec({"p": entry(tight(50_000), tight(125_000))})
    d = record.compare(a, b).diffs[0]
    assert d.change("harness").verdict == "within noise"
    assert d.change("C").verdict == "better"
    assert d.change("ratio").verdict == "worse" and d.change("ratio").pct == pytest.approx(-20.0)


def test_compare_within_noise():
    a = rec({"p": entry([40_000, 45_000, 50_000, 55_000, 60_000], tight(100_000))})  # spread 40 % of A's median
    b = rec({"p": entry([38_000, 43_000, 48_000, 53_000, 58_000], tight(100_000))})  # -4 %, spread 41.7 %
    cmp = record.compare(a, b)
    h, r = cmp.diffs[0].change("harness"), cmp.diffs[0].change("ratio")
    assert h.pct == pytest.approx(-4.0)
    assert h.noise_pct == pytest.approx(100 * 20_000 / 48_000)  # the larger spread: B's
    assert h.verdict == "within noise" and r.verdict == "within noise"
    rows = [line for line in cmp.render().splitlines() if line.startswith("p ")]
    assert len(rows) == 3 and not any("<-" in row or "++" in row for row in rows)
    # --fail-above judges the change itself, whatever the noise band
    assert record.compare(a, b, fail_above=10).exit_code == 0
    assert record.compare(a, b, fail_above=3).exit_code == 1


def test_compare_new_missing_and_skipped():
    a = rec({"old": entry(tight(1), tight(2)), "both": entry(tight(1), tight(2)),
             "ran_then_skipped": entry(tight(1), tight(2))},
            {"skipped_both": "no dirty ring"})
    b = rec({"new": entry(tight(1), tight(2)), "both": entry(tight(1), tight(2))},
            {"skipped_both": "no dirty ring", "ran_then_skipped": "KVM_CAP_X is 0"})
    cmp = record.compare(a, b, fail_above=1)
    status = {d.name: d.status for d in cmp.diffs}
    assert status == {"old": "missing", "both": "compared", "ran_then_skipped": "skipped",
                      "skipped_both": "skipped", "new": "new"}
    notes = {d.name: d.note for d in cmp.diffs}
    assert "skipped in B: KVM_CAP_X is 0 (ran in A)" in notes["ran_then_skipped"]
    assert notes["skipped_both"] == "skipped in A: no dirty ring; skipped in B: no dirty ring"
    assert cmp.exit_code == 0  # nothing comparable got worse
    text = cmp.render()
    for name in status:
        assert name in text


def test_compare_notes_different_work_and_machines():
    a = rec({"p": entry(tight(1), tight(2), count=100, params={"slot_mib": 32})})
    b = rec({"p": entry(tight(1), tight(2), count=200, params={"slot_mib": 64})})
    b["machine"] = {**MACHINE, "kernel": "7.0.0"}
    b["rounds"] = 7
    text = record.compare(a, b).render()
    assert "counts differ (100 -> 200); parameters differ ({'slot_mib': 32} -> {'slot_mib': 64})" in text
    assert "note: kernel differs: 6.18.0 -> 7.0.0" in text
    assert "note: rounds differ: 5 -> 7" in text


def test_compare_command_exit_codes(tmp_path, capsys):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(rec({"p": entry(tight(50_000), tight(100_000))})))
    b.write_text(json.dumps(rec({"p": entry(tight(40_000), tight(100_000))})))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "p" in out and "-20.0%" in out and "worse" in out
    assert main(["compare", str(a), str(b), "--fail-above", "10"]) == 1
    assert main(["compare", str(a), str(b), "--fail-above", "25"]) == 0
    assert main(["compare", str(b), str(a), "--fail-above", "10"]) == 0  # the other way it got better
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["compare", str(a), str(bad)]) == 2
    assert "not a bench record" in capsys.readouterr().err


def test_merged_ranges():
    assert merged([(0x2000, 0x10), (0x1000, 0x1000), (0x2008, 0x10), (0x5000, 0), (0x9000, 8)]) == [
        (0x1000, 0x1018), (0x9000, 8)]


# ---- one run of each pair against the real /dev/kvm ---------------------------------------------------
TINY = {"exits": 2000, "race_ops": 200, "vms": 2, "fault_mib": 2, "dirty_passes": 1}


def _kvm_missing() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing: the smoke runs need a real KVM"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture(scope="module")
def c_programs() -> None:
    why = _kvm_missing()
    if why:
        pytest.skip(why)
    if not shutil.which(os.environ.get("CC", "gcc")):
        pytest.skip("no C compiler to build bench/ (gcc)")
    p = subprocess.run(["make", "-s", "-C", str(REPO / "bench")], capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"make -C bench failed:\n{p.stdout}\n{p.stderr}"


@pytest.mark.parametrize("name", list(BENCHES))
def test_pair_runs_once(c_programs, name):
    b = BENCHES[name]
    why = b.skip_reason()
    if why:
        pytest.skip(why)
    n = TINY.get(b.count_option, 1)
    c = run_c(b, n)
    h = run_py(b, n)
    for side in (c, h):
        assert set(side) == {b.c_rate_key, *b.secondary}
        assert side[b.c_rate_key] > 0
    res = Result(b, n, [c[b.c_rate_key]], [h[b.c_rate_key]],
                 {k: [c[k]] for k in b.secondary}, {k: [h[k]] for k in b.secondary})
    r = record.make_record({name: res.as_dict()}, {}, 1)
    assert record.validate(r) == []


def test_run_writes_a_record(c_programs, tmp_path, capsys):
    out = tmp_path / "rec.json"
    assert main(["--only", "pio_exits", "--rounds", "2", "--exits", "1000", "--json", str(out),
                 "--record-dir", str(tmp_path / "dir")]) == 0
    text = capsys.readouterr().out
    assert "pio_exits" in text and "ratio" in text
    r = record.load_record(out)
    assert list(r["benchmarks"]) == ["pio_exits"] and r["rounds"] == 2
    assert len(r["benchmarks"]["pio_exits"]["c"]["samples"]) == 2
    (written,) = (tmp_path / "dir").iterdir()
    assert written.name.endswith(".json") and record.load_record(written)["benchmarks"]
