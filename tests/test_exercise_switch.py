"""minignext.exercises.use swaps the student's functions into the library: the solutions give the
toy NExT-GPT's very output, a wrong answer changes it, and leaving the block restores the library."""

import importlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from minignext import exercises
from minignext.presets import TOY_DIR
from minignext.systems.nextgpt import Conversation
from minignext.toy import world

pytestmark = pytest.mark.skipif(not (TOY_DIR / "nextgpt" / "nextgpt.json").is_file(), reason="toy weights missing")


def test_every_swapped_name_exists_in_the_library_and_in_the_exercises():
    for lesson, functions in exercises.SWAPS.items():
        student = exercises.load_lesson("solutions", lesson)
        for name, sites in functions.items():
            assert callable(getattr(student, name)), f"{lesson} has no {name}"
            for module, attr in sites[1] if isinstance(sites, tuple) else sites:
                assert callable(getattr(importlib.import_module(module), attr, None)), f"{module} has no {attr}"


def demo():
    """A short toy conversation through every route: image in, image, audio and video out."""
    from minignext.systems.nextgpt import NextGPT

    torch.manual_seed(0)
    model = NextGPT.from_preset("toy", dtype=torch.float32)
    picture = Image.fromarray(world.render_image(world.Obj("red", "circle"), np.random.default_rng(0)))
    conv = Conversation().user("what is in this picture?", image=picture)
    replies = [model.chat(conv, progress=False, num_inference_steps=3)]
    for request in ("draw a blue square.", "play a deep tone that rises.", "make a video of a green cross moving left."):
        conv.user(request)
        replies.append(model.chat(conv, progress=False, num_inference_steps=3, max_new_tokens=40))
    return replies


def outputs(replies):
    out = []
    for r in replies:
        out += [("text", r.raw_text)] + [("image", np.asarray(x, dtype=np.float32)) for x in r.images]
        out += [("audio", w * 255) for w, _ in r.audios] + [("video", v.astype(np.float32)) for v in r.videos]
    return out


@pytest.fixture(scope="module")
def library_output():
    return outputs(demo())


def test_the_solutions_swapped_in_give_the_same_demo(library_output):
    with exercises.use("solutions") as swapped:
        assert len(swapped) >= 20
        mine = outputs(demo())
    assert [k for k, _ in mine] == [k for k, _ in library_output], "not the same kinds of output"
    assert {k for k, _ in mine} == {"text", "image", "audio", "video"}
    for (kind, got), (_, want) in zip(mine, library_output):
        if kind == "text":
            assert got == want
        else:          # the tiled attention path differs from the fused one in the last bits only
            assert np.abs(got - want).max() <= 2.0, f"{kind} differs by {np.abs(got - want).max()} of 255"


def test_a_wrong_answer_swapped_in_changes_the_demo(library_output, tmp_path):
    shutil.copy(exercises.ROOT / "exercises" / "solutions" / "lesson06_any_to_any.py", tmp_path)
    with open(tmp_path / "lesson06_any_to_any.py", "a") as f:     # read one position early
        f.write("\n\ndef extract_signal_states(hidden, ids, run):\n"
                "    ids = [int(i) for i in ids]\n"
                "    start = next(s for s in range(len(ids)) if ids[s:s + len(run)] == list(run))\n"
                "    return hidden[:, start - 1:start - 1 + len(run)]\n")
    with exercises.use(tmp_path, lessons=["lesson06"]):
        wrong = outputs(demo())
    media = [(got, want) for (kind, got), (_, want) in zip(wrong, library_output) if kind != "text"]
    assert media and all(np.abs(got - want).max() > 10 for got, want in media), \
        "reading the states one position early should change every generated medium"


def test_leaving_the_block_restores_the_library():
    from minignext import attention, llama

    before = (llama.rms_norm, attention.get_default_impl())
    with exercises.use("solutions", lessons=["lesson01", "lesson02"]):
        assert llama.rms_norm is not before[0] and attention.get_default_impl() == "tiled"
    assert (llama.rms_norm, attention.get_default_impl()) == before
    with pytest.raises(NotImplementedError, match="more hints"):
        with exercises.use("stubs", lessons=["lesson02"]):
            llama.rms_norm(torch.ones(2), torch.ones(2), 1e-6)
    assert llama.rms_norm is before[0]
