"""strategy: which precisions are published and which is latest (tasks/strategy.py)."""
import pytest

from tasks.spec import ModelSpec
from tasks.strategy import Choice, PrecisionOutcome as O, choose


def test_best_picks_the_fastest_passing_precision_and_says_by_how_much():
    choice = choose("best", [O("int8", True, 1400.0), O("fp16", True, 1000.0), O("fp32", False, 500.0)])
    assert choice.publish == ["int8", "fp16"]
    assert choice.latest == "int8"
    assert choice.reason.startswith("int8 chosen: 1.40× fp16 throughput")


def test_best_prefers_a_faster_later_precision_over_the_preference_order():
    choice = choose("best", [O("int8", True, 900.0), O("fp16", True, 1200.0)])
    assert choice.latest == "fp16"
    assert "1.33× int8" in choice.reason


def test_best_ties_and_missing_benchmarks_fall_back_to_preference_order():
    assert choose("best", [O("int8", True, 1000.0), O("fp16", True, 1000.0)]).latest == "int8"
    untimed = choose("best", [O("int8", True), O("fp16", True)])
    assert untimed.latest == "int8" and "preference order" in untimed.reason
    assert choose("best", [O("int8", True), O("fp16", True, 10.0)]).latest == "fp16"


def test_a_failed_faster_precision_is_never_latest():
    choice = choose("best", [O("int8", False, 5000.0), O("fp16", True, 1000.0)])
    assert choice.publish == ["fp16"] and choice.latest == "fp16"
    assert "only precision" in choice.reason


@pytest.mark.parametrize("strategy", ["fallback", "all"])
def test_fallback_and_all_take_the_first_passing_in_preference_order(strategy):
    choice = choose(strategy, [O("int8", False, 5000.0), O("fp16", True, 100.0), O("fp32", True, 900.0)])
    assert choice.latest == "fp16" and choice.publish == ["fp16", "fp32"]
    assert "int8 did not pass" in choice.reason


def test_nothing_passing_gives_no_latest():
    assert choose("best", [O("int8", False, 1.0)]) == Choice([], None, "no precision passed its accuracy gate")


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="fastest"):
        choose("fastest", [])


def test_spec_accepts_best_and_keeps_fallback_the_default():
    assert ModelSpec().strategy == "fallback"
    assert ModelSpec(strategy="best").strategy == "best"
