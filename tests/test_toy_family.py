"""The family table on the shipped toy weights: every system on the shared held-out cases through its
own chat (a file of its own, so that it runs beside test_toy_eval.py's gates on a second worker)."""

import time

from minignext.toy import family
from test_toy_eval import check


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
