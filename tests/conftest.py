import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "exercises"

os.environ.setdefault("MINIGNEXT_PROGRESS", "0")
# Tiny models run fastest on one thread, and CI machines are small.
torch.set_num_threads(1)


def perturb(module, scale=0.05):
    """Add small noise to every parameter, so no zero-initialised layer hides a wrong wiring."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def pytest_addoption(parser):
    parser.addoption(
        "--exercises", default="solutions",
        help="which exercise code the tests in tests/exercises check: 'solutions' (default), "
             "'stubs' (the untouched files in exercises/), or a folder with your own copies, e.g. 'mine'")


def load_exercise_module(lesson: str, target: str):
    if target == "solutions":
        path = EXERCISES / "solutions" / f"{lesson}.py"
    elif target == "stubs":
        path = EXERCISES / f"{lesson}.py"
    else:
        folder = Path(target)
        path = (folder if folder.is_absolute() else ROOT / folder) / f"{lesson}.py"
    if not path.is_file():
        pytest.fail(f"no exercise file {path}")
    spec = importlib.util.spec_from_file_location(f"exercise_{target}_{lesson}".replace("/", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ex(request):
    """The exercise module named by the test file's LESSON, from the chosen target."""
    return load_exercise_module(request.module.LESSON, request.config.getoption("--exercises"))


def check(got, want, what, wrong=(), **tolerance):
    """Compare an exercise's answer with the expected one and say what was compared.

    wrong: [(diagnosis, output of a known wrong answer)]. If `got` equals one of them (and that
    one differs from `want`), the test fails with its diagnosis instead of a bare mismatch."""
    if not isinstance(got, torch.Tensor):
        pytest.fail(f"{what}: expected a tensor, got {type(got).__name__}", pytrace=False)
    for diagnosis, value in wrong:
        if same(got, value) and not same(want, value):
            pytest.fail(f"{what}: {diagnosis}", pytrace=False)
    if got.shape != want.shape:
        pytest.fail(f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}", pytrace=False)
    torch.testing.assert_close(got, want, msg=lambda m: f"{what}\n{m}", **tolerance)


def same(a, b, atol=1e-5, rtol=1e-4):
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.detach().double(), b.detach().double(), atol=atol, rtol=rtol))
