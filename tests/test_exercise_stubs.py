"""Every exercise test must fail on the untouched stubs (and pass on the solutions,
which the ordinary run of tests/exercises checks)."""

import ast
import subprocess
import sys
import xml.etree.ElementTree as ET

from conftest import EXERCISES, ROOT


def stub_files():
    return sorted(p for p in EXERCISES.glob("lesson*.py"))


def test_every_stub_has_a_solution_and_a_test():
    assert stub_files(), "no exercises found"
    for stub in stub_files():
        assert (EXERCISES / "solutions" / stub.name).is_file(), f"{stub.name} has no solution"
        assert (ROOT / "tests" / "exercises" / f"test_{stub.name}").is_file(), f"{stub.name} has no test"


def test_stubs_raise_not_implemented_with_a_hint():
    for stub in stub_files():
        tree = ast.parse(stub.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
        assert functions, f"{stub.name} defines no exercise"
        for fn in functions:
            raises = [n for n in ast.walk(fn) if isinstance(n, ast.Raise)]
            assert any("NotImplementedError" in ast.unparse(r) and len(ast.unparse(r)) > 40 for r in raises), \
                f"{stub.name}:{fn.name} should raise NotImplementedError with a hint"


def test_every_exercise_test_fails_on_the_stubs(tmp_path):
    report = tmp_path / "stubs.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--exercises=stubs",
                    f"--junitxml={report}", str(ROOT / "tests" / "exercises")],
                   cwd=ROOT, capture_output=True, text=True, timeout=600)
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {}
    for case in cases:
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = "failed" if failed else (
            "skipped" if skipped else "passed")
    assert outcomes, "no exercise tests ran"
    not_failing = {k: v for k, v in outcomes.items() if v != "failed"}
    assert not not_failing, f"these exercise tests do not fail on the untouched stubs: {not_failing}"
