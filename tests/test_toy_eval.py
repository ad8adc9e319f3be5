"""The toy models' quality gates, on the shipped weights: `python -m minignext.toy.eval` in CI.

Each metric with a threshold (the issues' acceptance numbers) must reach it, and the table is printed
so that a CI log shows every number, including the held-out combinations that have no threshold.
A metric the shipped weights are known to miss is listed in SHORTFALLS and checked by a strict
xfail: CI stays honest (the miss is visible) and tells us when the miss is gone."""

import time

import pytest

from minignext.toy import eval as toy_eval
from minignext.toy.trainer import TOY_DIR

SHORTFALLS = {    # metric name -> why the shipped weights are known to miss its threshold
}
FLAMINGO_SHORTFALLS = {  # the toy Flamingo's, apart: its metric names are also NExT-GPT's
    "video -> text": "the resampler does not read motion yet: colour and shape right, the direction at chance",
}


def evaluated(what, capsys):
    t0 = time.perf_counter()
    metrics = toy_eval.evaluate(toy_eval.parts_of(what))
    with capsys.disabled():
        print(f"\n{what}: evaluated in {time.perf_counter() - t0:.0f} s\n{toy_eval.format_table(metrics)}")
    return metrics


def split(metrics, shortfalls):
    known = [m for m in metrics if m.threshold is not None and m.name in shortfalls]
    rest = [m for m in metrics if m not in known]
    return known, rest


def check(metrics, shortfalls=SHORTFALLS):
    """Every metric not in SHORTFALLS must pass; a listed one that passes now must leave the list.
    Marks the test xfail while listed ones still miss."""
    known, rest = split(metrics, shortfalls)
    failed = [(m.name, m.note, round(m.value, 3), m.threshold) for m in rest if not m.ok]
    assert not failed, failed
    fixed = [m.name for m in known if m.ok]
    assert not fixed, f"{fixed} reach their thresholds now: take them out of SHORTFALLS"
    if known:
        pytest.xfail("known shortfalls: " + "; ".join(f"{m.name} {100 * m.value:.0f}% < {100 * m.threshold:.0f}% "
                                                       f"({shortfalls[m.name]})" for m in known))


def test_toy_foundations_meet_their_thresholds(capsys):
    metrics = evaluated("foundations", capsys)
    assert {m.name.split(",")[0] for m in metrics} >= {"text -> image", "text -> audio", "text -> video"}
    check(metrics)


@pytest.mark.skipif(not (TOY_DIR / "nextgpt" / "nextgpt.json").is_file(), reason="the toy NExT-GPT is not trained yet")
def test_toy_nextgpt_meets_its_thresholds(capsys):
    metrics = evaluated("nextgpt", capsys)
    check(metrics)


@pytest.mark.skipif(not (TOY_DIR / "flamingo" / "flamingo.json").is_file(), reason="the toy Flamingo is not trained yet")
def test_toy_flamingo_meets_its_thresholds(capsys):
    metrics = evaluated("flamingo", capsys)
    assert {m.name for m in metrics} >= {"image -> text", "video -> text", "few-shot naming, 2 examples"}
    check(metrics, FLAMINGO_SHORTFALLS)
