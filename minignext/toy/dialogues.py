"""MosIT-style instruction dialogues for the toy world (NExT-GPT, Wu et al. 2023, sec. 5.2: the
Modality-switching Instruction Tuning data): conversations of 2-8 turns that switch modalities,
refer back to earlier turns ("the first picture", "make it move left"), show media without asking
for anything (the answer describes them and makes none), ask for two outputs in one turn, and name
a medium in words to get it in the other modality ("what does a red circle sound like?").

The phrasings come from data/phrasings.json, a bank of templates written apart from the grammar of
world.py and apart from the held-out user conversations (data/user_heldout.json), which no training
text ever sees. One template in every HOLD_OUT_EVERY of each kind is kept out of training
(phrasing="test"), so that held-out *forms* can be measured too. Light noise (a dropped or doubled
letter outside the attribute words, case, a missing question mark, a filler) is added on top.

Every answer names its media with the world's canonical captions, which is what the output
projections are trained to turn into decoder conditioning.
"""

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from minignext.toy import world

BANK = Path(__file__).parent / "data" / "phrasings.json"
HOLD_OUT_EVERY = 7
ATTRIBUTE_WORDS = set(world.COLOURS + world.SHAPES + world.PITCHES + world.CONTOURS + world.DIRECTIONS)
MODALITIES = ("image", "audio", "video")


@dataclass(frozen=True)
class Exchange:
    """One user turn and its answer. `made`: the media the answer makes, in order; the answer's
    text names them, and their signal tokens follow the text."""
    kind: str
    user: str
    assistant: str
    user_media: world.Media | None = None
    made: tuple = ()


@functools.cache
def bank() -> dict:
    return json.loads(BANK.read_text())


def templates(key, phrasing="train") -> list:
    """The bank's templates of `key`: every HOLD_OUT_EVERY-th is a test form, the rest train."""
    if phrasing not in ("train", "test"):
        raise ValueError(f"unknown phrasing {phrasing!r}; expected 'train' or 'test'")
    items = bank()[key]
    keep = (lambda i: i % HOLD_OUT_EVERY == 3) if phrasing == "test" else (lambda i: i % HOLD_OUT_EVERY != 3)
    return [t for i, t in enumerate(items) if keep(i)]


def pick(rng, key, phrasing="train"):
    options = templates(key, phrasing)
    return options[rng.integers(len(options))]


def describe(m: world.Media) -> str:
    """The canonical words for a medium: "a red circle", "a deep wobbly tone", "a red circle moving left"."""
    return m.caption()


REQUESTS = {       # how a user names a medium to make (the templates supply "a picture of" and the like)
    "image": ("a {colour} {shape}", "a {shape} that is {colour}", "a {colour} {shape_word}"),
    "audio": ("a {contour} {pitch} tone", "a {pitch} tone that {verb}", "a {pitch} {contour} beep",
              "the sound of a {colour} {shape}"),
    "video": ("a {colour} {shape} moving {direction}", "a {colour} {shape} that moves {direction}",
              "a {colour} {shape} going {direction}"),
}


def request(m: world.Media, rng, forms=None) -> str:
    """Words that name `m` in a request, one of REQUESTS[m.modality] (or of its first `forms`)."""
    options = REQUESTS[m.modality][:forms]
    words = dict(colour=m.obj.colour, shape=m.obj.shape, pitch=m.obj.pitch, contour=m.obj.contour,
                 verb=world.CONTOUR_VERBS[m.obj.contour], direction=m.direction or "",
                 shape_word=world.SHAPE_WORDS[m.obj.shape][rng.integers(len(world.SHAPE_WORDS[m.obj.shape]))])
    return options[rng.integers(len(options))].format(**words)


def noisy(text, rng, p=0.35) -> str:
    """With probability p, one or two small slips a real user makes: a dropped or doubled letter in a
    word that is not an attribute word, all lower case, no final punctuation, a filler up front."""
    if rng.random() >= p:
        return text
    for _ in range(int(rng.integers(1, 3))):
        slip = rng.integers(4)
        words = text.split(" ")
        plain = [i for i, w in enumerate(words) if len(w) > 3 and re.sub(r"\W", "", w).lower() not in ATTRIBUTE_WORDS
                 and "{" not in w]
        if slip == 0 and plain:
            i = plain[rng.integers(len(plain))]
            w, j = words[i], int(rng.integers(1, len(words[i]) - 1))
            words[i] = w[:j] + w[j + 1:] if rng.random() < 0.5 else w[:j] + w[j] + w[j:]
        elif slip == 1:
            words = [w.lower() for w in words]
        elif slip == 2:
            words[-1] = words[-1].rstrip("?.!")
        else:
            words.insert(0, ("ok", "so", "hey", "um", "hmm", "pls")[rng.integers(6)])
        text = " ".join(words)
    return text


def random_medium(modality, rng, split="train") -> world.Media:
    obj = world.sample_object(rng, split)
    return world.Media(modality, obj, world.DIRECTIONS[rng.integers(4)] if modality == "video" else None)


def _answer(rng, key, **slots) -> str:
    text = pick(rng, key).format(**slots)
    return text[0].upper() + text[1:]


def first_turn(kind, rng, split="train", phrasing="train") -> Exchange:
    """A turn that needs no earlier one."""
    say = lambda key, **kw: noisy(pick(rng, key, phrasing).format(**kw), rng)        # noqa: E731
    if kind == "chat":
        user, answer = pick(rng, "chat", phrasing)
        return Exchange(kind, noisy(user, rng), answer)
    modality = NAMED[kind][1] if kind in NAMED else \
        kind.split("_")[-1] if kind.startswith(("describe_", "show_", "make_")) else kind.split("_")[0]
    m = random_medium(modality, rng, split)
    if kind.startswith("describe_"):
        return Exchange(kind, say(kind), _answer(rng, "answer_describe", x=describe(m)), user_media=m)
    if kind.startswith("show_"):
        return Exchange(kind, say(kind), _answer(rng, "answer_show", x=describe(m)), user_media=m)
    if kind.startswith("make_") and kind != "make_two":
        return Exchange(kind, say(kind, x=request(m, rng)), _answer(rng, "answer_make", x=describe(m)), made=(m,))
    if kind == "make_two":
        return make_two(rng, split, phrasing)
    if kind in NAMED:               # a medium named in words, made in the other modality through the mapping
        named, _, key = NAMED[kind]
        words = request(world.Media(named, m.obj), rng, forms=3)      # an object or a tone, never "the sound of"
        return Exchange(kind, say(kind, x=words), _answer(rng, key, x=describe(m)), made=(m,))
    target = kind.split("_to_")[1]
    out = world.Media(target, m.obj, world.DIRECTIONS[rng.integers(4)] if target == "video" else None)
    key = {"audio": "answer_sounds_like", "image": "answer_looks_like", "video": "answer_make"}[target]
    user = say(kind, direction=out.direction) if target == "video" else say(kind)
    return Exchange(kind, user, _answer(rng, key, x=describe(out)), user_media=m, made=(out,))


def make_two(rng, split="train", phrasing="train") -> Exchange:
    t = pick(rng, "make_two", phrasing)
    first_kind, second_kind = t["kinds"]
    x = random_medium(first_kind, rng, split)
    if second_kind.endswith("_of_x"):
        modality = second_kind.removesuffix("_of_x")
        y = world.Media(modality, x.obj, world.DIRECTIONS[rng.integers(4)] if modality == "video" else None)
    else:
        y = random_medium(second_kind, rng, split)
    slots = {"x": request(x, rng), "y": request(y, rng), "direction": y.direction or ""}
    return Exchange("make_two", noisy(t["text"].format(**slots), rng),
                    _answer(rng, "answer_make_two", x=describe(x), y=describe(y)), made=(x, y))


NAMED = {"object_sound": ("image", "audio", "answer_sounds_like"),       # "what does a red circle sound like?"
         "sound_picture": ("audio", "image", "answer_looks_like")}      # "draw what a deep wobbly tone looks like"
# How often each kind opens a turn that needs no earlier one (relative weights). In a world where every
# object has a sound, asking for an object's sound by its name is a natural request, and drawn uniformly
# the bank gave it least: one make_audio request in four names an object. Two outputs in one turn (one
# kind in 15 before) need the second run of signal tokens to follow the first.
# Describing counts twice, so that turns that make nothing keep their share (40% of first turns, as when
# drawn uniformly) beside the new make-requests: with it at 33%, media made where none was asked went
# 6% -> 13% of turns. And a clip's direction is the attribute the LLM reads least well from the soft
# token (a linear probe reads it perfectly there, so the token carries it).
# Drawing a sound counts twice: asked to draw a sound they were given, models answered by describing
# it (one audio-input first turn in four asked for anything to be made).
FIRST_KINDS = {"chat": 1, "describe_image": 2, "describe_audio": 2, "describe_video": 2, "show_image": 1,
               "show_audio": 1, "show_video": 1, "make_image": 1, "make_audio": 1, "make_video": 1,
               "image_to_audio": 1, "audio_to_image": 2, "video_to_audio": 1, "image_to_video": 1, "make_two": 2,
               "object_sound": 2, "sound_picture": 1}
FOLLOW_UPS = ("follow_move", "follow_recolour", "follow_sound", "ask_first_colour", "ask_first_shape",
              "ask_last_attr")


def follow_up(kind, rng, seen, phrasing="train") -> Exchange | None:
    """A turn that refers back to `seen` (the media of the conversation so far, in order), or None
    when the conversation has nothing it could refer to."""
    visual = [m for m in seen if m.modality != "audio"]
    last, first = (seen[-1] if seen else None), (visual[0] if visual else None)
    say = lambda key, **kw: noisy(pick(rng, key, phrasing).format(**kw), rng)        # noqa: E731
    if kind == "follow_move" and last is not None:
        out = world.Media("video", last.obj, world.DIRECTIONS[rng.integers(4)])
        return Exchange(kind, say(kind, direction=out.direction), _answer(rng, "answer_make", x=describe(out)),
                        made=(out,))
    if kind == "follow_recolour" and last is not None and last.modality != "audio":     # a clip keeps its direction
        colour = [c for c in world.COLOURS if c != last.obj.colour][rng.integers(5)]
        out = world.Media(last.modality, world.Obj(colour, last.obj.shape), last.direction)
        return Exchange(kind, say(kind, colour=colour), _answer(rng, "answer_make", x=describe(out)), made=(out,))
    if kind == "follow_sound" and last is not None:
        out = world.Media("audio", last.obj)
        return Exchange(kind, say(kind), _answer(rng, "answer_sounds_like", x=describe(out)), made=(out,))
    if kind == "ask_first_colour" and first is not None:
        return Exchange(kind, say(kind), _answer(rng, "answer_first_colour", colour=first.obj.colour))
    if kind == "ask_first_shape" and first is not None:
        return Exchange(kind, say(kind), _answer(rng, "answer_first_shape", shape=first.obj.shape))
    if kind == "ask_last_attr" and last is not None:
        options = [t for t in templates(kind, phrasing) if _attr(last, t["attr"]) is not None]
        t = options[rng.integers(len(options))]
        value = _attr(last, t["attr"])
        return Exchange(kind, noisy(t["text"], rng), _answer(rng, "answer_attr", value=value))
    return None


def _attr(m: world.Media, attr):
    if m.modality == "audio":
        return {"pitch": m.obj.pitch, "contour": m.obj.contour}.get(attr)
    values = {"colour": m.obj.colour, "shape": f"a {m.obj.shape}", "direction": m.direction}
    return values.get(attr)


def sample_conversation(rng, split="train", phrasing="train", turns=None) -> list[Exchange]:
    """2-8 exchanges (or `turns`); after media have appeared, each later turn refers back with p = 0.5."""
    n = int(rng.integers(2, 9)) if turns is None else turns
    out, seen = [], []
    while len(out) < n:
        turn = None
        if seen and rng.random() < 0.5:
            turn = follow_up(FOLLOW_UPS[rng.integers(len(FOLLOW_UPS))], rng, seen, phrasing)
        if turn is None:
            turn = first_turn(world.weighted_pick(rng, FIRST_KINDS), rng, split, phrasing)
        seen += [m for m in (turn.user_media, *turn.made) if m is not None]
        out.append(turn)
    return out
