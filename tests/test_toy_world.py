"""The toy world: reproducible, shaped as documented, held-out split respected, media that
match their attributes by direct measurement (the checkers have their own tests)."""

import itertools
import re

import numpy as np
import pytest
import torch

from minignext.toy import world as w
from minignext.toy.checkers import check_text


# ---------------------------------------------------------------- objects, mapping, split

def test_mapping_is_a_bijection_between_objects_and_sounds():
    assert len(w.all_combinations()) == len(w.COLOURS) * len(w.SHAPES) == 24
    assert sorted(w.COLOUR_TO_PITCH.values()) == sorted(w.PITCHES)
    assert sorted(w.SHAPE_TO_CONTOUR.values()) == sorted(w.CONTOURS)
    sounds = {(o.pitch, o.contour) for o in w.all_combinations()}
    assert len(sounds) == 24
    for o in w.all_combinations():
        assert w.Obj.from_sound(o.pitch, o.contour) == o
    assert sorted(o.index for o in w.all_combinations()) == list(range(24))
    # pitch order follows the colour order (red is the lowest light frequency, so the lowest tone)
    assert [w.PITCH_SEMITONES[w.COLOUR_TO_PITCH[c]] for c in w.COLOURS] == sorted(w.PITCH_SEMITONES.values())


def test_held_out_split_partitions_the_combinations():
    train, held = w.train_combinations(), w.heldout_combinations()
    assert len(held) == len(w.HELD_OUT) == 3 and len(train) == 21
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(w.all_combinations())
    rng = np.random.default_rng(0)
    drawn = {w.sample_object(rng, "train") for _ in range(2000)}
    assert drawn == set(train)
    assert {w.sample_object(rng, "heldout") for _ in range(200)} == set(held)


def test_bad_input_is_a_value_error_that_says_what_is_expected():
    with pytest.raises(ValueError, match="colours are"):
        w.Obj("purple", "circle")
    with pytest.raises(ValueError, match="pitches are"):
        w.Obj.from_sound("loud", "steady")
    with pytest.raises(ValueError, match="expected one of"):
        w.sample_object(0, "validation")
    with pytest.raises(ValueError, match="direction"):
        w.render_video(w.Obj("red", "circle"), "sideways", 0)
    with pytest.raises(ValueError, match="needs a direction"):
        w.caption(w.Obj("red", "circle"), 0, "video")
    with pytest.raises(ValueError, match="modality"):
        w.caption(w.Obj("red", "circle"), 0, "smell")
    with pytest.raises(ValueError, match="phrasing"):
        w.caption(w.Obj("red", "circle"), 0, "image", phrasing="dev")


# ---------------------------------------------------------------- reproducibility

def _sample_everything(seed):
    rng = np.random.default_rng(seed)
    o = w.sample_object(rng)
    return (o, w.render_image(o, rng), w.render_audio(o, rng), w.render_video(o, "up", rng),
            w.caption(o, rng, "audio"), w.sample_dialogue(rng, max_turns=4))


def test_everything_is_reproducible_from_a_seed():
    a, b, c = _sample_everything(3), _sample_everything(3), _sample_everything(4)
    for x, y in zip(a, b):
        assert x == y if not isinstance(x, np.ndarray) else np.array_equal(x, y)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[2], c[2])
    for make in (w.image_batches, w.audio_batches, w.video_batches):
        x, y = next(make(4, seed=9)), next(make(4, seed=9))
        assert x["caption"] == y["caption"] and all(torch.equal(x[k], y[k]) for k in x if k != "caption")
    assert w.text_corpus(20, seed=1) == w.text_corpus(20, seed=1) != w.text_corpus(20, seed=2)


# ---------------------------------------------------------------- media

def test_media_shapes_dtypes_and_ranges():
    rng = np.random.default_rng(1)
    o = w.Obj("cyan", "cross")
    img, wav, vid = w.render_image(o, rng), w.render_audio(o, rng), w.render_video(o, "left", rng)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert wav.shape == (16000,) and wav.dtype == np.float32 and np.abs(wav).max() <= 1
    assert vid.shape == (8, 32, 32, 3) and vid.dtype == np.uint8
    assert w.render_image(o, rng, res=64).shape == (64, 64, 3)


def test_coverage_areas_match_the_shapes_formulas():
    size = 18.0  # cross arms 6 px wide, on whole pixels
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
    for shape, fraction in expected.items():
        area = w.coverage(shape, (16.0, 16.0), size).sum()
        assert area == pytest.approx(fraction * size * size, rel=0.02), shape


def test_triangle_points_up_and_cross_is_symmetric():
    tri = w.coverage("triangle", (16.0, 16.0), 16.0)[0]
    assert tri[9].sum() < tri[22].sum()  # narrow near the top, wide near the bottom
    cross = w.coverage("cross", (16.0, 16.0), 15.0)[0]
    np.testing.assert_array_equal(cross, cross.T)


def test_image_is_grey_except_the_object_in_its_colour():
    rng = np.random.default_rng(2)
    for o in w.all_combinations():
        img = w.render_image(o, rng).astype(np.float32) / 255
        chroma = img.max(-1) - img.min(-1)
        assert np.percentile(chroma, 5) < 0.02  # the background has no colour
        r, g, b = img[chroma > 0.5].mean(0)
        hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360  # direct hue formula
        err = abs((hue - w.COLOUR_HUES[o.colour] + 180) % 360 - 180)
        assert err < 12, (o, hue)


def test_video_centroid_moves_the_stated_way_by_10_to_14_px():
    rng = np.random.default_rng(3)
    for d in w.DIRECTIONS * 3:
        vid = w.render_video(w.Obj("yellow", "square"), d, rng).astype(np.float32)
        mass = vid.max(-1) - vid.min(-1)
        ys, xs = np.mgrid[:32, :32]
        cx = (mass * xs).sum((1, 2)) / mass.sum((1, 2))
        cy = (mass * ys).sum((1, 2)) / mass.sum((1, 2))
        move = np.array([cx[-1] - cx[0], cy[-1] - cy[0]])
        assert np.allclose(move / np.linalg.norm(move), w.DIRECTION_VECTORS[d], atol=0.05), (d, move)
        assert 9.5 < np.linalg.norm(move) < 14.5
        assert (vid[:, 0].sum() + vid[:, -1].sum() + vid[:, :, 0].sum() + vid[:, :, -1].sum()) > 0  # background


def _peak_hz(x, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))
    return np.argmax(spec) * sr / (8 * len(x))


def test_tone_pitch_and_contour_by_direct_fft():
    rng = np.random.default_rng(4)
    for colour in w.COLOURS:
        for shape in ("square", "triangle", "cross"):  # steady, rising, falling
            o = w.Obj(colour, shape)
            x = w.render_audio(o, rng).astype(np.float64)
            loud = np.nonzero(np.abs(x) > 0.1)[0]
            first, last = x[loud[0] + 400:loud[0] + 2000], x[loud[-1] - 2000:loud[-1] - 400]
            semis = [12 * np.log2(_peak_hz(seg) / 440) for seg in (first, last)]
            glide = semis[1] - semis[0]
            assert {"steady": abs(glide) < 0.4, "rising": glide > 4, "falling": glide < -4}[o.contour], (o, glide)
            assert abs(np.mean(semis) - w.PITCH_SEMITONES[o.pitch]) < 0.6, (o, semis)


def test_tone_has_silence_around_it_and_no_clicks():
    x = w.render_audio(w.Obj("red", "circle"), 5)
    assert np.abs(x[:200]).max() < 0.01 and np.abs(x[-200:]).max() < 0.01
    assert np.abs(np.diff(x)).max() < 0.3  # 15 ms fades, a 1 kHz tone of amplitude 0.7 moves < 0.28 per sample


# ---------------------------------------------------------------- text

def test_every_caption_names_exactly_its_attributes():
    rng = np.random.default_rng(6)
    for phrasing in ("train", "test"):
        for _ in range(300):
            o, d = w.sample_object(rng, "all"), w.DIRECTIONS[rng.integers(4)]
            for modality in ("image", "audio", "video"):
                text = w.caption(o, rng, modality, d if modality == "video" else None, phrasing)
                want = {"image": {"colour": o.colour, "shape": o.shape},
                        "audio": {"pitch": o.pitch, "contour": o.contour},
                        "video": {"colour": o.colour, "shape": o.shape, "direction": d}}[modality]
                verdict = check_text(text, want)
                assert verdict.ok, (text, verdict.reason)
                others = set(verdict.mentions) - set(want)
                assert all(not verdict.mentions[k] for k in others), text


def test_several_phrasings_per_meaning_and_test_phrasings_never_in_training_text():
    o = w.Obj("red", "circle")
    rng = np.random.default_rng(7)
    assert len({w.caption(o, rng, "image") for _ in range(100)}) >= 4
    assert w.caption(o) == "a red circle"  # rng=None: the canonical phrasing
    corpus = "\n".join(w.text_corpus(3000, seed=0))
    for marker in ("image that is a", "beep that", "that is moving", "what do you see in this", "describe what you",
                   "make a picture of", "can you play", "make a video that", "let me hear this",
                   "a picture of this sound", "now let me hear it", "now make this one", "the colour of the first",
                   "hi there"):
        assert marker not in corpus, marker
    test_text = "\n".join(w.text_corpus(3000, seed=0, phrasing="test"))
    assert "that is moving" in test_text and "let me hear this" in test_text


def test_held_out_instructions_use_only_words_of_the_training_phrasings():
    words = lambda texts: set(re.findall(r"[a-z]+", " ".join(texts)))  # noqa: E731
    known = words(w.text_corpus(4000, seed=0))
    for kind, options in {**w.INSTRUCTIONS, **w.CAPTIONS}.items():
        new = words(re.sub(r"\{\w+\}", " ", t) for t in w._templates(options, "test")) - known
        assert not new, (kind, new)


def test_training_text_never_names_a_held_out_pair():
    held = set(w.HELD_OUT) | {(w.COLOUR_TO_PITCH[c], w.SHAPE_TO_CONTOUR[s]) for c, s in w.HELD_OUT}
    lines = [line for text in w.text_corpus(4000, seed=3) for line in text.split("\n")]
    seen = set()
    for line in lines:
        m = check_text(line).mentions
        for pair in itertools.chain(itertools.product(m["colour"], m["shape"]),
                                    itertools.product(m["pitch"], m["contour"])):
            assert pair not in held, line
            seen.add(pair)
    assert len(seen) == 42  # every training pair, as objects and as sounds
    held_text = "\n".join(w.text_corpus(300, seed=3, split="heldout"))
    assert any(c in held_text and s in held_text for c, s in w.HELD_OUT)


def test_batches_hold_tensors_and_only_training_objects():
    held = {o.index for o in w.heldout_combinations()}
    img = next(w.image_batches(64, seed=1))
    assert img["image"].shape == (64, 3, 32, 32) and img["image"].dtype == torch.float32
    assert 0 <= img["image"].min() and img["image"].max() <= 1 and len(img["caption"]) == 64
    assert not held & set(img["label"].tolist())
    torch.testing.assert_close(img["label"], img["colour"] * 4 + img["shape"])
    aud = next(w.audio_batches(8, seed=1))
    assert aud["audio"].shape == (8, 16000) and not held & set(aud["label"].tolist())
    vid = next(w.video_batches(8, seed=1))
    assert vid["video"].shape == (8, 8, 3, 32, 32) and vid["direction"].shape == (8,)
    for caption, d in zip(vid["caption"], vid["direction"].tolist()):
        assert check_text(caption, {"direction": w.DIRECTIONS[d]}).ok
    assert held <= set(next(w.image_batches(64, seed=1, split="heldout"))["label"].tolist())


# ---------------------------------------------------------------- dialogues

def test_dialogues_cover_every_kind_and_stay_consistent():
    rng = np.random.default_rng(8)
    kinds = set()
    for _ in range(400):
        turns = w.sample_dialogue(rng)
        first = last = None
        for t in turns:
            kinds.add(t.kind)
            media = t.assistant_media or t.user_media
            if t.kind == "ask_first_colour":
                assert check_text(t.assistant, {"colour": first.obj.colour}).ok, t
            if t.kind == "ask_first_shape":
                assert check_text(t.assistant, {"shape": first.obj.shape}).ok, t
            if t.kind in ("follow_move", "follow_sound"):
                assert t.assistant_media.obj == last.obj and t.user_media is None
            if t.kind == "follow_recolour":
                assert t.assistant_media.obj.shape == last.obj.shape != None  # noqa: E711
                assert t.assistant_media.obj.colour != last.obj.colour
            wants_media = t.kind.startswith(("make_", "follow_move", "follow_recolour", "follow_sound")) or \
                "_to_" in t.kind
            assert (t.assistant_media is not None) == wants_media, t
            if t.assistant_media is not None:
                assert check_text(t.assistant, t.assistant_media).ok, t
            if t.kind.startswith("describe_"):
                assert check_text(t.assistant, t.user_media).ok, t
            if media is not None:
                first, last = first or media, media
            for m in (t.user_media, t.assistant_media):
                assert m is None or (m.obj.colour, m.obj.shape) not in w.HELD_OUT
    assert kinds == set(w.TURN_KINDS) | set(w.FOLLOW_UPS)


def test_cross_modal_turns_use_the_mapping():
    rng = np.random.default_rng(9)
    turns = [t for _ in range(300) for t in w.sample_dialogue(rng) if "_to_" in t.kind]
    assert turns
    for t in turns:
        assert t.assistant_media.obj == t.user_media.obj
        if t.kind.endswith("_to_audio"):
            assert check_text(t.assistant, {"pitch": t.user_media.obj.pitch,
                                            "contour": t.user_media.obj.contour}).ok


def test_mosit_turns_that_name_a_medium_make_it_in_the_other_modality():
    """dialogues.py: "what does a red circle sound like?" makes the red circle's sound, a named tone
    makes its object's picture, a recoloured clip keeps its direction, and the weighted first kinds
    come up about as often as their weights say."""
    from collections import Counter

    from minignext.toy import dialogues

    rng = np.random.default_rng(11)
    conversations = [dialogues.sample_conversation(rng) for _ in range(600)]
    turns = [t for c in conversations for t in c]
    kinds = Counter(t.kind for t in turns)
    assert set(dialogues.FIRST_KINDS) <= set(kinds)
    first = sum(kinds[k] for k in dialogues.FIRST_KINDS)
    weights = sum(dialogues.FIRST_KINDS.values())
    for k, weight in dialogues.FIRST_KINDS.items():
        assert abs(kinds[k] / first - weight / weights) < 0.02, k
    for t in turns:
        if t.kind in dialogues.NAMED:
            named, target, _ = dialogues.NAMED[t.kind]
            (m,) = t.made
            assert m.modality == target and t.user_media is None
            assert check_text(t.assistant, m).ok, t
            said = check_text(t.user).mentions
            assert said["colour" if named == "image" else "pitch"] == \
                ((m.obj.colour,) if named == "image" else (m.obj.pitch,)), t
            assert "sound of" not in t.user or named == "image"
            assert (m.obj.colour, m.obj.shape) not in w.HELD_OUT
    clips = 0
    for conversation in conversations:
        seen = []
        for t in conversation:
            if t.kind == "follow_recolour" and seen[-1].modality == "video":
                (m,) = t.made
                assert (m.modality, m.obj.shape, m.direction) == ("video", seen[-1].obj.shape, seen[-1].direction)
                assert m.obj.colour != seen[-1].obj.colour
                clips += 1
            seen += [m for m in (t.user_media, *t.made) if m is not None]
    assert clips
    assert dialogues.templates("object_sound", "test") and dialogues.templates("sound_picture", "test")


def test_dialogue_text_uses_the_vicuna_template():
    turns = [w.Turn("describe_image", "what is in this picture?", "a red circle.", w.Media("image", w.Obj("red", "circle"))),
             w.Turn("chat", "thank you!", "you are welcome.")]
    assert w.format_dialogue(turns) == ("### Human: <Img></Img> what is in this picture?\n### Assistant: a red circle.\n"
                                        "### Human: thank you!\n### Assistant: you are welcome.\n")
    described = w.format_dialogue(turns, media_marker="describe")
    assert described.startswith("### Human: <Img>red circle</Img> what is in this picture?")
    assert w.Media("video", w.Obj("red", "circle"), "up").attributes() == "red circle up"
    assert w.Media("audio", w.Obj("red", "circle")).attributes() == "deep wobbly"


def test_llm_corpus_describes_its_media_inside_the_marker():
    dialogues = [t for t in w.text_corpus(200, seed=4) if "<Img>" in t]
    assert dialogues and "<Img></Img>" not in "".join(dialogues)


# ---------------------------------------------------------------- gallery

def test_gallery_writes_files_and_never_overwrites(tmp_path):
    from PIL import Image
    import wave

    paths = w.write_gallery(tmp_path, seed=0)
    assert all(p.is_file() for p in paths) and len(paths) == 9
    assert Image.open(tmp_path / "objects.png").size == (512, 768)
    with wave.open(str(tmp_path / "sound_deep_steady.wav")) as f:
        assert (f.getframerate(), f.getnchannels(), f.getnframes()) == (16000, 1, 16000)
    assert Image.open(tmp_path / "video_left.gif").n_frames == 8
    with pytest.raises(FileExistsError, match="overwrite"):
        w.write_gallery(tmp_path)
    w.write_gallery(tmp_path, overwrite=True)
    with pytest.raises(SystemExit, match="already exist"):
        w.main(["--gallery", str(tmp_path)])


def test_training_lanes_show_the_latest_progress_state(tmp_path):
    from minignext.toy import train

    log = tmp_path / "lane-0.log"
    assert train.last_status(log) == "starting"
    log.write_text("imagebind: |##..| 10/100 [1.0s]\rimagebind: |###.| 20/100 [2.0s] loss 3.1   ")
    assert train.last_status(log) == "imagebind: |###.| 20/100 [2.0s] loss 3.1"
    order = [[p for lane in phase for p in lane] for phase in train.PHASES]
    assert sorted(sum(order, [])) == sorted(train.FOUNDATIONS)
    phase_of = {p: i for i, parts in enumerate(order) for p in parts}
    assert phase_of["video_decoder"] > phase_of["image_decoder"]        # the video decoder starts from it


def test_a_run_times_its_own_steps_and_resumes(tmp_path):
    import time as clock

    import torch
    from minignext.toy.trainer import Run, read_loss_log, summary

    def run(total, resume):
        layer = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        r = Run("tiny", {"layer": layer}, opt, total, peak_lr=0.1, warmup=1, resume=resume, progress_bar=False,
                runs_dir=tmp_path)
        for _ in r.steps():
            r.log(layer(torch.ones(1, 2)).pow(2).sum().backward() or 0.0)
            opt.step()
        return r, layer

    first, _ = run(3, resume=False)
    took = first.seconds
    clock.sleep(0.05)
    assert first.seconds == took                        # a finished run's time stops with its steps
    assert first.timing() == {"seconds": round(took, 1)}
    again, _ = run(5, resume=True)                      # picks up at step 3
    assert [row["step"] for row in read_loss_log("tiny", runs_dir=tmp_path)] == [0, 1, 2, 3, 4]
    assert again.timing()["resumed_at_step"] == 3       # a record then says its seconds are not the whole run's
    report = summary(tmp_path, first=first, again=again)
    assert "resumed_at_step" not in report["first"] and report["again"]["resumed_at_step"] == 3
