"""The one shape of an oracle's answer: a Verdict (ok, or the problems it saw, in words).

Every oracle in the harness returns a Verdict built from plain values, so it can be unit-tested
with synthetic inputs; a case turns it into a failure with `verdict.check(context)`, which raises
OracleFailure (an AssertionError: pytest shows it as the case's failure) whose message names the
oracle, each problem and the context needed to rerun the case.

    v = ring_order(written, harvested, gpa=GPA)
    v.check(f"pass {rnd}, {w.where()}")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """What one oracle concluded: ok when it saw no problem."""

    oracle: str  # what was judged, e.g. "dirty ring order", "MMIO exits"
    problems: tuple[str, ...] = ()  # one line each (a line may continue on indented lines)
    facts: Mapping[str, Any] = field(default_factory=dict)  # measured values worth recording

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        # `assert not problems` was the old idiom; a Verdict is truthy either way would be a trap
        raise TypeError("a Verdict has no truth value: use .ok, or .check() to fail the case")

    def explain(self, context: str = "") -> str:
        if self.ok:
            return f"{self.oracle}: ok"
        lines = [f"{self.oracle}: {len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}"]
        lines += [f"  - {p}" for p in self.problems]
        if context:
            lines.append(f"  ({context})")
        return "\n".join(lines)

    def check(self, context: str = "") -> Verdict:
        """Raise OracleFailure if any problem was seen; return self otherwise."""
        if self.problems:
            raise OracleFailure(self, context)
        return self

    @classmethod
    def of(cls, oracle: str, problems: Iterable[str], **facts: Any) -> Verdict:
        return cls(oracle, tuple(problems), dict(facts))

    def __add__(self, other: Verdict) -> Verdict:
        """Two oracles' verdicts as one (their problems prefixed by their names)."""
        if not isinstance(other, Verdict):
            return NotImplemented
        probs = [f"{v.oracle}: {p}" for v in (self, other) for p in v.problems]
        return Verdict(f"{self.oracle} + {other.oracle}", tuple(probs), {**self.facts, **other.facts})


class OracleFailure(AssertionError):
    """A Verdict that was not ok, raised by Verdict.check()."""

    def __init__(self, verdict: Verdict, context: str = "") -> None:
        self.verdict = verdict
        self.context = context
        super().__init__(verdict.explain(context))

    @property
    def problems(self) -> list[str]:
        return list(self.verdict.problems)
