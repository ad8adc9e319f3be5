"""The exercises themselves: every test fails on the untouched stubs (and passes on the solutions,
which the ordinary run of tests/exercises checks), hints escalate from the idea to the code, and
each known wrong answer fails with its own diagnosis."""

import ast
import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import EXERCISES, ROOT, load_exercise_module


def stub_files():
    return sorted(p for p in EXERCISES.glob("lesson*.py"))


def public_functions(path):
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}


def hints_of(path) -> dict:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HINTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def test_every_stub_has_a_solution_and_a_test():
    assert stub_files(), "no exercises found"
    for stub in stub_files():
        assert (EXERCISES / "solutions" / stub.name).is_file(), f"{stub.name} has no solution"
        assert (ROOT / "tests" / "exercises" / f"test_{stub.name}").is_file(), f"{stub.name} has no test"
        assert set(public_functions(EXERCISES / "solutions" / stub.name)) >= set(public_functions(stub)), \
            f"the solution of {stub.name} lacks some of its exercises"


def test_stubs_raise_not_implemented_with_escalating_hints():
    for stub in stub_files():
        hints = hints_of(stub)
        functions = public_functions(stub)
        assert functions, f"{stub.name} defines no exercise"
        for name, fn in functions.items():
            raises = [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Raise)]
            assert raises == [f"raise _stuck({name!r})"], f"{stub.name}:{name} should only raise _stuck({name!r})"
            assert len(hints.get(name, [])) >= 2, f"{stub.name}:{name} needs at least two hints, idea first"
        module = load_exercise_module(stub.stem, "stubs")
        with pytest.raises(NotImplementedError, match=r"more hints"):
            getattr(module, next(iter(functions)))(*[None] * len(next(iter(functions.values())).args.args))


def solution_lines(path, name) -> list[str]:
    """The statements of a solution function, one line each, without docstrings or comments."""
    fn = public_functions(path)[name]
    lines = []
    for node in ast.walk(fn):
        if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.For, ast.If, ast.With)):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue
            lines.append(" ".join(ast.unparse(node).split()))
    return lines


CODE_MARKS = ("torch.", "F.", " = ", "[:,", ".shape", "()")


def test_first_hints_give_the_idea_not_the_code():
    for stub in stub_files():
        hints = hints_of(stub)
        for name in public_functions(stub):
            first = " ".join(hints[name][0].split())
            for line in solution_lines(EXERCISES / "solutions" / stub.name, name):
                assert line not in first, f"{stub.name}:{name}: the first hint contains the solution's line {line!r}"
            marks = [m for m in CODE_MARKS if m in first]
            assert not marks, f"{stub.name}:{name}: the first hint reads like code ({marks}); say the idea in words"
            assert len(first) > 60, f"{stub.name}:{name}: the first hint is too short to say the idea"


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


# Known wrong answers: (lesson, the test that catches it, its arguments, the diagnosis, the wrong code).
WRONG_ANSWERS = [
    ("lesson01_attention", "test_naive_attention_causal", {}, "the mask lets a token see the future", """
def naive_attention(q, k, v, causal=False):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:   # the mask turned the wrong way: the past is hidden, the future visible
        s = s.masked_fill(torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).tril(-1), float("-inf"))
    return s.softmax(-1) @ v
"""),
    ("lesson01_attention", "test_tiled_attention_equals_sdpa", {"tq": 9, "tk": 9, "block": 4},
     "the mask lets a token see the future", """
def tiled_attention(q, k, v, block_size, causal=False):
    return naive_attention(q, k, v)
"""),
    ("lesson01_attention", "test_online_softmax_over_blocks_equals_softmax", {}, "were not rescaled", """
def online_softmax_step(m, l, acc, scores, v_block):
    m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
    p = torch.exp(scores - m_new.masked_fill(torch.isinf(m_new), 0))
    return m_new, l + p.sum(-1, keepdim=True), acc + p @ v_block
"""),
    ("lesson02_llama", "test_rms_norm_matches_formula", {}, "that is LayerNorm", """
def rms_norm(x, weight, eps):
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
"""),
    ("lesson02_llama", "test_apply_rope_rotates_half_pairs", {}, "neighbouring pairs", """
def apply_rope(q, k, cos, sin):
    def turn(x):
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = cos[..., : x.shape[-1] // 2], sin[..., : x.shape[-1] // 2]
        return torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2)
    return turn(q), turn(k)
"""),
    ("lesson02_llama", "test_kv_cache_update_in_place_equals_concatenation", {}, "not written in place", """
def kv_cache_update(cache_k, cache_v, k, v, start):
    return torch.cat([cache_k[:, :, :start], k], 2), torch.cat([cache_v[:, :, :start], v], 2)
"""),
    ("lesson03_encoders", "test_patchify_cuts_patches_in_reading_order", {}, "channel-last", """
def patchify(images, patch_size):
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), c * p * p)
"""),
    ("lesson04_diffusion", "test_add_noise_matches_diffusers", {}, "square roots", """
def add_noise(x0, noise, alpha_bar):
    a = torch.as_tensor(alpha_bar, dtype=x0.dtype)
    a = a.reshape(-1, *[1] * (x0.dim() - 1)) if a.dim() else a
    return a * x0 + (1 - a) * noise
"""),
    ("lesson04_diffusion", "test_classifier_free_guidance", {}, "points away from the condition", """
def classifier_free_guidance(uncond, cond, guidance_scale):
    return uncond + guidance_scale * (uncond - cond)
"""),
    ("lesson05_av", "test_hifigan_resblock_matches_transformers", {"kernel": 3, "dilations": (1, 3, 5), "slope": 0.1},
     "needs padding d*(K-1)//2", """
def hifigan_resblock(x, convs1, convs2, dilations, slope=0.1):
    for d, (w1, b1), (w2, b2) in zip(dilations, convs1, convs2):
        k = w1.shape[-1]
        y = F.conv1d(F.leaky_relu(x, slope), w1, b1, dilation=d, padding=(k - 1) // 2)
        x = x[..., : y.shape[-1]] + F.conv1d(F.leaky_relu(y, slope), w2, b2, padding=(k - 1) // 2)
    return x
"""),
    ("lesson05_av", "test_mrf_reproduces_the_speecht5_vocoder", {}, "the branches were chained", """
def mrf(x, branches):
    for branch in branches:
        x = branch(x)
    return x
"""),
    ("lesson06_any_to_any", "test_extract_reads_the_states_at_the_signal_tokens", {}, "off by one position", """
def extract_signal_states(hidden, ids, run):
    ids, run = [int(i) for i in ids], [int(i) for i in run]
    for start in range(len(ids) - len(run) + 1):
        if ids[start:start + len(run)] == run:
            return hidden[:, start - 1:start - 1 + len(run)]
    raise ValueError(run)
"""),
    ("lesson06_any_to_any", "test_splice_matches_a_concatenation_built_by_hand", {"insert_at": [2, 2]},
     "off by one position", """
def splice_soft_tokens(token_embeds, soft_tokens, insert_at):
    pieces, prev = [], 0
    for i, at in enumerate(insert_at):
        pieces += [token_embeds[prev:at], soft_tokens[i:i + 1]]
        prev = at
    return torch.cat(pieces + [token_embeds[prev:]]), list(insert_at)
"""),
    ("lesson07_toy", "test_info_nce_counts_every_same_class_pair_as_positive", {}, "only the diagonal", """
def info_nce(media_emb, text_emb, labels, scale):
    logits = scale * media_emb @ text_emb.T
    target = torch.arange(len(labels))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
"""),
    ("lesson08_training", "test_signal_distance_is_the_mean_euclidean_distance", {}, "squared distance", """
def signal_distance(pred, target):
    return ((pred - target) ** 2).sum(-1).mean()
"""),
    ("lesson08_training", "test_answer_ce_counts_only_labelled_next_tokens", {}, "off by one position", """
def answer_ce(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
"""),
    ("lesson08_training", "test_freeze_old_rows_trains_only_the_new_rows", {}, "the gradient was changed in place", """
def freeze_old_rows(param, first_new_id):
    def hook(grad):
        grad[:first_new_id] = 0
    param.requires_grad_(True)
    return param.register_hook(hook)
"""),
]


def exercise_tests(lesson):
    path = ROOT / "tests" / "exercises" / f"test_{lesson}.py"
    spec = importlib.util.spec_from_file_location(f"wrong_answer_tests_{lesson}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lesson, test, args, diagnosis, source", WRONG_ANSWERS,
                         ids=[f"{w[0]}:{w[3]}" for w in WRONG_ANSWERS])
def test_known_wrong_answers_fail_with_their_diagnosis(lesson, test, args, diagnosis, source):
    wrong = load_exercise_module(lesson, "solutions")
    exec(source, wrong.__dict__)                       # the solution module with one function replaced
    with pytest.raises((AssertionError, pytest.fail.Exception)) as failure:
        getattr(exercise_tests(lesson), test)(ex=wrong, **args)
    assert diagnosis in str(failure.value), f"{test} failed without saying {diagnosis!r}:\n{failure.value}"
