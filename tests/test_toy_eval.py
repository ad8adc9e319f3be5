"""The toy models' quality gates, on the shipped weights: `python -m minignext.toy.eval` in CI.

Each metric with a threshold (the issue's acceptance numbers) must reach it; the table is printed
so that a CI log shows every number, including the held-out combinations that have no threshold."""

import time

import pytest

from minignext.toy import eval as toy_eval
from minignext.toy.trainer import TOY_DIR


def run_eval(what, capsys):
    t0 = time.perf_counter()
    metrics = toy_eval.evaluate(toy_eval.parts_of(what))
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n{what}: evaluated in {seconds:.0f} s\n{toy_eval.format_table(metrics)}")
    return metrics


def test_toy_foundations_meet_their_thresholds(capsys):
    metrics = run_eval("foundations", capsys)
    assert {m.name.split(",")[0] for m in metrics} >= {"text -> image", "text -> audio", "text -> video"}
    failed = [(m.name, m.note, round(m.value, 3), m.threshold) for m in metrics if not m.ok]
    assert not failed, failed


@pytest.mark.skipif(not (TOY_DIR / "nextgpt" / "nextgpt.json").is_file(), reason="the toy NExT-GPT is not trained yet")
def test_toy_nextgpt_meets_its_thresholds(capsys):
    metrics = run_eval("nextgpt", capsys)
    failed = [(m.name, m.note, round(m.value, 3), m.threshold) for m in metrics if not m.ok]
    assert not failed, failed
