"""The one verdict type every oracle returns (harness/oracles/verdict.py)."""

import pytest

from harness.oracles.verdict import OracleFailure, Verdict


def test_ok_verdict_checks_quietly():
    v = Verdict.of("dirty log", [], pages=3)
    assert v.ok and v.check() is v and v.facts == {"pages": 3}
    assert v.explain() == "dirty log: ok"


def test_failed_verdict_raises_with_every_problem_and_the_context():
    v = Verdict.of("MMIO exits", ["exit #0 at 0xfffffffe, want 0x100000000", "1 exit missing"])
    with pytest.raises(OracleFailure) as ei:
        v.check("pae32, gpa=0xfffffffe, seed 7")
    msg = str(ei.value)
    assert msg.startswith("MMIO exits: 2 problems")
    assert "  - exit #0 at 0xfffffffe" in msg and "  - 1 exit missing" in msg
    assert "(pae32, gpa=0xfffffffe, seed 7)" in msg
    assert ei.value.problems == list(v.problems) and isinstance(ei.value, AssertionError)


def test_a_verdict_has_no_truth_value():
    """`assert not problems` on a Verdict would pass whatever it holds: refuse it."""
    with pytest.raises(TypeError):
        bool(Verdict.of("x", ["p"]))


def test_verdicts_combine():
    v = Verdict.of("a", ["p"]) + Verdict.of("b", [], n=1)
    assert not v.ok and v.problems == ("a: p",) and v.facts == {"n": 1}
