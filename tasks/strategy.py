"""Which precisions to publish and which becomes ``latest``: the spec's ``strategy`` as one pure function.

- ``fallback``: precisions are built in preference order until one passes; that one is latest.
- ``all``: every precision is built; every passing one is published; the first passing one in
  preference order is latest.
- ``best``: as ``all``, but latest is the passing engine with the highest benchmark throughput at the
  profile's opt shape (the preference order breaks ties and stands in where a benchmark is missing).

Stdlib only and Python 3.9-clean: no flow, no TensorRT, so it is unit-tested with plain numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

STRATEGIES = ("fallback", "all", "best")


@dataclass(frozen=True)
class PrecisionOutcome:
    """What the choice reads of one built precision: did it pass its gate, and how fast it ran."""

    precision: str
    passed: bool
    throughput_per_s: Optional[float] = None  # the engine benchmark at the opt shape; None: not measured


@dataclass(frozen=True)
class Choice:
    """The precisions to publish (preference order), the one that becomes latest, and why."""

    publish: List[str] = field(default_factory=list)
    latest: Optional[str] = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _speed(o: PrecisionOutcome) -> str:
    return f"{o.throughput_per_s:.1f}/s" if o.throughput_per_s else "not benchmarked"


def _fastest(passing: Sequence[PrecisionOutcome]) -> Choice:
    timed = [o for o in passing if o.throughput_per_s]
    publish = [o.precision for o in passing]
    if not timed:
        return Choice(publish, passing[0].precision,
                      f"{passing[0].precision} chosen: no passing engine was benchmarked, so the preference "
                      f"order decides")
    # max() keeps the first of equal values: the preference order breaks ties
    best = max(timed, key=lambda o: o.throughput_per_s)
    others = [o for o in passing if o is not best]
    if not others:
        return Choice(publish, best.precision, f"{best.precision} chosen: the only precision that passed its "
                                               f"gate ({_speed(best)})")
    versus = ", ".join(f"{best.throughput_per_s / o.throughput_per_s:.2f}× {o.precision}" if o.throughput_per_s
                       else f"{o.precision} not benchmarked" for o in others)
    return Choice(publish, best.precision, f"{best.precision} chosen: {versus} throughput "
                                           f"({_speed(best)} at the opt shape)")


def choose(strategy: str, outcomes: Sequence[PrecisionOutcome]) -> Choice:
    """The publication of one conversion.

    Args:
        strategy: ``fallback``, ``all`` or ``best`` (tasks.spec.ModelSpec.strategy).
        outcomes: the precisions that were built, in the spec's preference order.

    Returns a Choice with no latest (and an empty publish list) when nothing passed.
    Raises ValueError for an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    passing = [o for o in outcomes if o.passed]
    if not passing:
        return Choice([], None, "no precision passed its accuracy gate")
    if strategy == "best":
        return _fastest(passing)
    first = passing[0]
    failed = [o.precision for o in outcomes[:list(outcomes).index(first)]]
    before = f" ({', '.join(failed)} did not pass)" if failed else ""
    return Choice([o.precision for o in passing], first.precision,
                  f"{first.precision} chosen: first passing precision in preference order{before}")
