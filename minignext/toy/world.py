"""The toy world: a seeded, procedural source of images, sounds, videos and text.

NExT-GPT (Wu et al., arXiv 2309.05519) assumes frozen foundation models that already
understand the world. Here the world is small enough to learn on a CPU: an object is a
colour and a shape, and every modality can express it.

    image  32x32 RGB: the shape in its colour on a grey background, size and place varied.
    sound  1 s at 16 kHz: a sine tone whose pitch is the colour and whose contour the shape.
    video  8 frames of 32x32: the object moving left, right, up or down.
    text   captions, instructions and dialogues from a small grammar, several phrasings each.

The cross-modal mapping, so that "what does this picture sound like?" has one right answer:

    colour   red   yellow  green  cyan   blue   magenta     hue 0, 60, ..., 300 degrees
    pitch    deep  low     mid    high   bright shrill      E4 G#4 C5 E5 G#5 C6 (4 semitones apart)

    shape    square  triangle  cross    circle
    contour  steady  rising    falling  wobbly              (+-3 semitone glide, +-1.5 vibrato)

Red light has the lowest frequency, so red gets the lowest pitch; a triangle points up and
rises. A video shows an object and a direction; its sound is the object's sound.

Composition is tested on HELD_OUT colour-shape pairs: they (and, through the mapping, their
sounds) never appear in any training sample or text. Prompt phrasings are split as well:
`phrasing="test"` uses templates that training text never contains.

Everything takes a numpy Generator (or an int seed), so every sample is reproducible.
`python -m minignext.toy.world --gallery DIR` writes a few PNG, WAV and GIF samples.
"""

import argparse
import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
COLOUR_HUES = dict(zip(COLOURS, (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)))
SHAPES = ("circle", "square", "triangle", "cross")
PITCHES = ("deep", "low", "mid", "high", "bright", "shrill")
PITCH_SEMITONES = dict(zip(PITCHES, (-5, -1, 3, 7, 11, 15)))  # relative to A4 = 440 Hz
CONTOURS = ("steady", "rising", "falling", "wobbly")
DIRECTIONS = ("left", "right", "up", "down")
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down

COLOUR_TO_PITCH = dict(zip(COLOURS, PITCHES))
SHAPE_TO_CONTOUR = {"square": "steady", "triangle": "rising", "cross": "falling", "circle": "wobbly"}
PITCH_TO_COLOUR = {p: c for c, p in COLOUR_TO_PITCH.items()}
CONTOUR_TO_SHAPE = {k: s for s, k in SHAPE_TO_CONTOUR.items()}

HELD_OUT = (("green", "cross"), ("blue", "circle"), ("magenta", "triangle"))

IMAGE_SIZE = 32
N_FRAMES = 8
SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0
GLIDE_SEMITONES = 3.0    # rising/falling go from -3 to +3 semitones around the pitch
WOBBLE_SEMITONES = 1.5   # vibrato depth, at 3-4 Hz


def hz(pitch: str) -> float:
    return 440.0 * 2.0 ** (PITCH_SEMITONES[pitch] / 12)


@dataclass(frozen=True)
class Obj:
    """One thing of the world: a colour and a shape (and so a pitch and a contour)."""
    colour: str
    shape: str

    def __post_init__(self):
        if self.colour not in COLOURS or self.shape not in SHAPES:
            raise ValueError(f"unknown object {self.colour!r} {self.shape!r}; "
                             f"colours are {COLOURS}, shapes {SHAPES}")

    @classmethod
    def from_sound(cls, pitch: str, contour: str) -> "Obj":
        if pitch not in PITCHES or contour not in CONTOURS:
            raise ValueError(f"unknown sound {pitch!r} {contour!r}; pitches are {PITCHES}, contours {CONTOURS}")
        return cls(PITCH_TO_COLOUR[pitch], CONTOUR_TO_SHAPE[contour])

    @property
    def pitch(self) -> str:
        return COLOUR_TO_PITCH[self.colour]

    @property
    def contour(self) -> str:
        return SHAPE_TO_CONTOUR[self.shape]

    @property
    def index(self) -> int:
        """Class id in 0..23, colour-major."""
        return COLOURS.index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)


def all_combinations() -> list[Obj]:
    return [Obj(c, s) for c in COLOURS for s in SHAPES]


def heldout_combinations() -> list[Obj]:
    return [Obj(c, s) for c, s in HELD_OUT]


def train_combinations() -> list[Obj]:
    return [o for o in all_combinations() if (o.colour, o.shape) not in HELD_OUT]


SPLITS = {"train": train_combinations, "heldout": heldout_combinations, "all": all_combinations}


def make_rng(seed_or_rng=None) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def weighted_pick(rng, weights: dict):
    """A key of `weights` drawn with probability proportional to its value."""
    keys, values = list(weights), np.array(list(weights.values()), dtype=float)
    return keys[rng.choice(len(keys), p=values / values.sum())]


def sample_object(rng, split="train") -> Obj:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    choices = SPLITS[split]()
    return choices[make_rng(rng).integers(len(choices))]


# ---------------------------------------------------------------- images and videos

SUPERSAMPLE = 4  # anti-aliased edges: coverage is averaged over 4x4 sub-pixels


def _inside(shape, dx, dy):
    """Sub-pixel membership; (dx, dy) are offsets from the centre in half-sizes, y down."""
    ax, ay = np.abs(dx), np.abs(dy)
    box = (ax <= 1) & (ay <= 1)
    if shape == "circle":
        return dx * dx + dy * dy <= 1
    if shape == "square":
        return box
    if shape == "triangle":  # apex up, base down, base width = height
        return box & (ax <= (dy + 1) / 2)
    return box & ((ax <= 1 / 3) | (ay <= 1 / 3))  # cross, arms a third of the size wide


def coverage(shape, centres, size, res=IMAGE_SIZE):
    """Fraction of each pixel covered by `shape`: (F, res, res) float32 for F centres (x, y) in pixels.
    Only the pixels of the shape's bounding box are sampled."""
    c = np.asarray(centres, dtype=np.float32).reshape(-1, 2)
    out = np.zeros((len(c), res, res), np.float32)
    sub = (np.arange(SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    half = np.float32(size / 2)
    for f, (cx, cy) in enumerate(c):
        x0, x1 = max(int(np.floor(cx - half)), 0), min(int(np.ceil(cx + half)), res)
        y0, y1 = max(int(np.floor(cy - half)), 0), min(int(np.ceil(cy + half)), res)
        if x1 <= x0 or y1 <= y0:
            continue
        dx = ((np.arange(x0, x1, dtype=np.float32)[:, None] + sub).reshape(1, -1) - cx) / half
        dy = ((np.arange(y0, y1, dtype=np.float32)[:, None] + sub).reshape(-1, 1) - cy) / half
        inside = _inside(shape, dx, dy).astype(np.float32)
        out[f, y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return out


def _colour_rgb(colour, rng):
    hue = (COLOUR_HUES[colour] + rng.uniform(-8, 8)) % 360
    return np.array(colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)), np.float32)


def _background(rng, res):
    """A dark-to-mid grey with a gentle gradient: never saturated, so never a colour."""
    level, slope, angle = rng.uniform(0.06, 0.28), rng.uniform(0.0, 0.06), rng.uniform(0, 2 * np.pi)
    u = np.linspace(-0.5, 0.5, res, dtype=np.float32)
    ramp = np.cos(angle) * u[None, :] + np.sin(angle) * u[:, None]
    return (level + slope * ramp).astype(np.float32)


def _compose(bg, rgb, cov):
    out = bg[None, :, :, None] * (1 - cov[..., None]) + rgb * cov[..., None]
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def render_image(obj: Obj, rng, res=IMAGE_SIZE, size=None, centre=None) -> np.ndarray:
    """(res, res, 3) uint8: the object, 10-18 px wide at 32 px, anywhere inside a 1 px margin.
    `size` (px) and `centre` (x, y in px) fix the placement instead of drawing it."""
    rng = make_rng(rng)
    drawn = rng.uniform(10, 18) * res / IMAGE_SIZE
    size = drawn if size is None else size
    lo, hi = size / 2 + 1, res - size / 2 - 1
    drawn = rng.uniform(lo, hi, size=2)
    centre = drawn if centre is None else centre
    return _compose(_background(rng, res), _colour_rgb(obj.colour, rng), coverage(obj.shape, centre, size, res))[0]


def render_video(obj: Obj, direction: str, rng) -> np.ndarray:
    """(8, 32, 32, 3) uint8: the object, 9-13 px wide, moving 10-14 px in `direction`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    rng = make_rng(rng)
    res = IMAGE_SIZE
    size, travel = rng.uniform(9, 13), rng.uniform(10, 14)
    vec = np.array(DIRECTION_VECTORS[direction], np.float32)
    lo, hi = size / 2 + 1, res - size / 2 - 1
    # start anywhere that keeps the whole path inside the frame
    start = np.array([rng.uniform(lo + travel * (v < 0), hi - travel * (v > 0)) for v in vec], np.float32)
    centres = start + np.linspace(0, travel, N_FRAMES, dtype=np.float32)[:, None] * vec
    return _compose(_background(rng, res), _colour_rgb(obj.colour, rng), coverage(obj.shape, centres, size, res))


# ---------------------------------------------------------------- sounds

def pitch_track(contour, progress, seconds=1.0, rate=3.5):
    """Semitone offset from the pitch at `progress` in [0, 1] through a tone lasting `seconds`."""
    if contour == "steady":
        return np.zeros_like(progress)
    if contour == "rising":
        return GLIDE_SEMITONES * (2 * progress - 1)
    if contour == "falling":
        return GLIDE_SEMITONES * (1 - 2 * progress)
    return WOBBLE_SEMITONES * np.sin(2 * np.pi * rate * seconds * progress)


def render_audio(obj: Obj, rng) -> np.ndarray:
    """(16000,) float32, 1 s: one sine tone of 70-90% of the clip, pitch = colour, contour = shape."""
    rng = make_rng(rng)
    seconds, sr = AUDIO_SECONDS, SAMPLE_RATE
    n = int(round(seconds * sr))
    dur = np.float32(rng.uniform(0.7, 0.9) * seconds)
    start = np.float32(rng.uniform(0.02, seconds - dur - 0.02))
    t = np.arange(n, dtype=np.float32) / np.float32(sr)
    progress = np.clip((t - start) / dur, 0, 1)
    semis = np.float32(PITCH_SEMITONES[obj.pitch] + rng.uniform(-0.3, 0.3))
    semis = semis + pitch_track(obj.contour, progress, dur, rate=np.float32(rng.uniform(3, 4)))
    freq = 440 * np.exp2(semis / 12)
    phase = np.mod(2 * np.pi / sr * np.cumsum(freq, dtype=np.float64) + rng.uniform(0, 2 * np.pi), 2 * np.pi)
    ramp = 0.015  # 15 ms fades, no clicks
    env = np.clip(np.minimum(t - start, start + dur - t) / ramp, 0, 1).astype(np.float32)
    hiss = rng.random(n, dtype=np.float32) - 0.5  # a faint noise floor, about -60 dB
    return rng.uniform(0.3, 0.7) * env * np.sin(phase.astype(np.float32)) + np.float32(0.004) * hiss


# ---------------------------------------------------------------- text

SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"),
               "triangle": ("triangle",), "cross": ("cross", "plus sign")}
CONTOUR_VERBS = {"steady": "stays steady", "rising": "rises", "falling": "falls", "wobbly": "wobbles"}
DIRECTION_WORDS = {"left": ("left", "to the left"), "right": ("right", "to the right"),
                   "up": ("up", "upwards"), "down": ("down", "downwards")}

# Each list: training phrasings first, then the test-only phrasings after the "|" marker. A test-only
# instruction is a new sentence made only of words that the training phrasings use ("let me hear this
# picture." from "let me hear {x}." and "play the sound of this picture."): a model whose whole
# language is this world cannot know what an unseen word ("paint", "would", "please") asks for, so
# held-out instructions test new sentence frames, not new vocabulary. The same holds for the test
# captions, which the held-out requests embed, and which the image decoder's text encoder must know:
# its vocabulary is the image captions' ("an image that is a red box").
CAPTIONS = {
    "image": ["a {colour} {shape}", "a {shape} that is {colour}", "a picture of a {colour} {shape}",
              "an image of a {colour} {shape}", "|", "an image that is a {colour} {shape}"],
    "audio": ["a {contour} {pitch} tone", "a {pitch} tone that {verb}", "the sound of a {contour} {pitch} tone",
              "a {contour} {pitch} beep", "|", "a {pitch} beep that {verb}"],
    "video": ["a {colour} {shape} moving {direction}", "a {colour} {shape} that moves {direction}",
              "a video of a {colour} {shape} going {direction}", "|", "a {colour} {shape} that is moving {direction}"],
}
INSTRUCTIONS = {
    "describe_image": ["what is in this picture?", "describe this image.", "what do you see?",
                       "|", "what do you see in this picture?"],
    "describe_audio": ["what is this sound?", "describe this sound.", "what do you hear?",
                       "|", "describe what you hear."],
    "describe_video": ["what happens in this video?", "describe this video.", "what is moving here?",
                       "|", "what do you see in this video?"],
    "make_image": ["draw {x}.", "show me a picture of {x}.", "make an image of {x}.", "can you draw {x}?",
                   "make an image that shows {x}.", "|", "make a picture of {x}."],
    "make_audio": ["play {x}.", "make the sound of {x}.", "let me hear {x}.", "|", "can you play {x}?"],
    "make_video": ["make a video of {x}.", "show me {x}.", "animate {x}.", "can you animate {x}?",
                   "|", "make a video that shows {x}."],
    "image_to_audio": ["what does this picture sound like?", "play the sound of this picture.", "play this picture.",
                       "|", "let me hear this picture."],
    "audio_to_image": ["what does this sound look like?", "draw this sound.", "let me see this sound.",
                       "|", "show me a picture of this sound."],
    "image_to_video": ["make this move {direction}.", "animate this picture going {direction}.",
                       "|", "now animate this going {direction}."],
    "video_to_audio": ["what does this video sound like?", "play the sound of this video.", "play this video.",
                       "|", "let me hear this video."],
    "follow_move": ["now make it move {direction}.", "make it go {direction}.", "|", "now let it go {direction}."],
    "follow_recolour": ["now make it {colour}.", "make it {colour} instead.", "|", "now make this one {colour}."],
    "follow_sound": ["and what does it sound like?", "now play its sound.", "|", "now let me hear it."],
    "ask_first_colour": ["what colour was the first one?", "which colour did the first one have?",
                         "|", "what was the colour of the first one?"],
    "ask_first_shape": ["what shape was the first one?", "which shape was the first one?",
                        "|", "what was the shape of the first one?"],
}
ANSWERS = {
    "describe_image": ["{x}.", "it is {x}.", "i see {x}."],
    "describe_audio": ["{x}.", "it is {x}.", "i hear {x}."],
    "describe_video": ["{x}.", "it shows {x}.", "i see {x}."],
    "make": ["here is {x}.", "sure, {x}."],
    "sounds_like": ["it sounds like {x}.", "here is its sound: {x}."],
    "looks_like": ["it looks like {x}.", "here is how it looks: {x}."],
    "first_colour": ["the first one was {colour}.", "it was {colour}."],
    "first_shape": ["the first one was a {shape}.", "it was a {shape}."],
}
CHAT = [
    ("hello!", "hello! i can describe and make pictures, sounds and videos."),
    ("how are you?", "i am fine, thank you. what shall we make?"),
    ("what can you do?", "i can describe pictures, sounds and videos, and i can make them too."),
    ("thank you!", "you are welcome."),
    ("what is your name?", "i am a tiny any-to-any assistant."),
    ("good night.", "good night, see you soon."),
    "|",
    ("hi there, who are you?", "i am a tiny any-to-any assistant."),
]


def _templates(options, phrasing):
    if phrasing not in ("train", "test"):
        raise ValueError(f"unknown phrasing {phrasing!r}; expected 'train' or 'test'")
    cut = options.index("|")
    return options[:cut] if phrasing == "train" else options[cut + 1:]


def _pick(rng, options, phrasing="train"):
    """A random template of the phrasing split; with rng=None the first (canonical) one."""
    choices = _templates(options, phrasing) if "|" in options else options
    return choices[0] if rng is None else choices[rng.integers(len(choices))]


def caption(obj: Obj, rng=None, modality="image", direction=None, phrasing="train") -> str:
    """A caption of `obj` as `modality` shows it; rng=None gives the canonical phrasing."""
    if modality not in CAPTIONS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {tuple(CAPTIONS)}")
    if modality == "video" and direction not in DIRECTIONS:
        raise ValueError(f"a video caption needs a direction, one of {DIRECTIONS}; got {direction!r}")
    rng = None if rng is None else make_rng(rng)
    words = dict(colour=obj.colour, shape=_pick(rng, SHAPE_WORDS[obj.shape]), pitch=obj.pitch,
                 contour=obj.contour, verb=CONTOUR_VERBS[obj.contour],
                 direction=_pick(rng, DIRECTION_WORDS.get(direction, ("",))))
    return _pick(rng, CAPTIONS[modality], phrasing).format(**words)


@dataclass(frozen=True)
class Media:
    """A piece of media in a dialogue, as a description to render: what, and how it moves."""
    modality: str
    obj: Obj
    direction: str | None = None

    def render(self, rng):
        if self.modality == "image":
            return render_image(self.obj, rng)
        if self.modality == "audio":
            return render_audio(self.obj, rng)
        return render_video(self.obj, self.direction, rng)

    def caption(self, rng=None, phrasing="train") -> str:
        return caption(self.obj, rng, self.modality, self.direction, phrasing)

    def attributes(self) -> str:
        """The attribute words this medium shows, bare: "red circle", "deep wobbly", "red circle left"."""
        if self.modality == "audio":
            return f"{self.obj.pitch} {self.obj.contour}"
        return " ".join(filter(None, (self.obj.colour, self.obj.shape, self.direction)))


@dataclass(frozen=True)
class Turn:
    """One exchange. `assistant_media` is what the assistant should generate (the signal tokens' job)."""
    kind: str
    user: str
    assistant: str
    user_media: Media | None = None
    assistant_media: Media | None = None


def turn(kind, rng, phrasing, split, first=None, last=None):
    """One turn of `kind`; `first`/`last` are the first and latest media of the dialogue so far."""
    def say(key, **kw):
        return _pick(rng, INSTRUCTIONS[key], phrasing).format(**kw)

    def answer(key, **kw):
        return _pick(rng, ANSWERS[key]).format(**kw)

    obj = sample_object(rng, split)
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    if kind == "chat":
        user, reply = _pick(rng, CHAT, phrasing)
        return Turn(kind, user, reply)
    if kind.startswith("describe_"):
        m = Media(kind.split("_")[1], obj, direction if kind == "describe_video" else None)
        return Turn(kind, say(kind), answer(kind, x=m.caption(rng, phrasing)), user_media=m)
    if kind.startswith("make_"):
        m = Media(kind.split("_")[1], obj, direction if kind == "make_video" else None)
        x = m.caption(rng, phrasing)
        return Turn(kind, say(kind, x=x), answer("make", x=x), assistant_media=m)
    if kind in ("image_to_audio", "video_to_audio"):
        src = Media(kind.split("_")[0], obj, direction if kind == "video_to_audio" else None)
        out = Media("audio", obj)
        return Turn(kind, say(kind), answer("sounds_like", x=out.caption(rng, phrasing)), src, out)
    if kind == "audio_to_image":
        out = Media("image", obj)
        return Turn(kind, say(kind), answer("looks_like", x=out.caption(rng, phrasing)), Media("audio", obj), out)
    if kind == "image_to_video":
        out = Media("video", obj, direction)
        return Turn(kind, say(kind, direction=direction), answer("make", x=out.caption(rng, phrasing)),
                    Media("image", obj), out)
    if kind == "follow_move":
        out = Media("video", last.obj, direction)
        return Turn(kind, say(kind, direction=direction), answer("make", x=out.caption(rng, phrasing)),
                    assistant_media=out)
    if kind == "follow_recolour":
        same_shape = [o for o in SPLITS[split]() if o.shape == last.obj.shape and o.colour != last.obj.colour]
        allowed = same_shape or [Obj(c, last.obj.shape) for c in COLOURS if c != last.obj.colour]
        out = Media("image", allowed[rng.integers(len(allowed))])
        return Turn(kind, say(kind, colour=out.obj.colour), answer("make", x=out.caption(rng, phrasing)),
                    assistant_media=out)
    if kind == "follow_sound":
        out = Media("audio", last.obj)
        return Turn(kind, say(kind), answer("sounds_like", x=out.caption(rng, phrasing)), assistant_media=out)
    if kind == "ask_first_colour":
        return Turn(kind, say(kind), answer("first_colour", colour=first.obj.colour))
    if kind == "ask_first_shape":
        return Turn(kind, say(kind), answer("first_shape", shape=_pick(rng, SHAPE_WORDS[first.obj.shape])))
    raise ValueError(f"unknown turn kind {kind!r}; expected one of {TURN_KINDS + FOLLOW_UPS}")


TURN_KINDS = ("chat", "describe_image", "describe_audio", "describe_video", "make_image", "make_audio",
              "make_video", "image_to_audio", "audio_to_image", "image_to_video", "video_to_audio")
FOLLOW_UPS = ("follow_move", "follow_recolour", "follow_sound", "ask_first_colour", "ask_first_shape")


def sample_dialogue(rng, split="train", phrasing="train", max_turns=3) -> list[Turn]:
    """1..max_turns turns; after media has appeared, each later turn is a follow-up with p = 0.6."""
    rng = make_rng(rng)
    turns, first, last = [], None, None
    for _ in range(int(rng.integers(1, max_turns + 1))):
        pool = TURN_KINDS
        if last is not None and rng.random() < 0.6:  # questions about shape/colour need a visual first one
            pool = FOLLOW_UPS if first.modality != "audio" else FOLLOW_UPS[:3]
        t = turn(pool[rng.integers(len(pool))], rng, phrasing, split, first, last)
        media = t.assistant_media or t.user_media
        if media is not None:
            first, last = first or media, media
        turns.append(t)
    return turns


def insert_fillers(text, rng, fillers, p=0.3, most=3) -> str:
    """With probability p, 1..most words drawn from `fillers` inserted at random places in `text`: a
    model trained on such text learns to read the words that matter, not the exact template."""
    words = text.split()
    if rng.random() < p:
        for _ in range(rng.integers(1, most + 1)):
            words.insert(rng.integers(len(words) + 1), fillers[rng.integers(len(fillers))])
    return " ".join(words)


def format_dialogue(turns, media_marker="<Img></Img>") -> str:
    """The text of a dialogue in NExT-GPT's Vicuna-v0 template. An input medium is shown as
    `media_marker`, or with media_marker="describe" as its attribute words inside the marker,
    `<Img>red circle</Img>`: the toy LLM's corpus, which teaches it to read what stands between
    <Img> and </Img> (NExT-GPT later puts the projected soft token there)."""
    def marker(media):
        return f"<Img>{media.attributes()}</Img>" if media_marker == "describe" else media_marker

    parts = []
    for t in turns:
        user = f"{marker(t.user_media)} {t.user}" if t.user_media is not None and media_marker else t.user
        parts.append(f"### Human: {user}\n### Assistant: {t.assistant}\n")
    return "".join(parts)


# ---------------------------------------------------------------- datasets

def sample_media(modality, n, rng, split="train") -> list[Media]:
    """n media of one modality to render: n objects, then (videos) n directions."""
    objs = [sample_object(rng, split) for _ in range(n)]
    dirs = [DIRECTIONS[rng.integers(len(DIRECTIONS))] for _ in objs] if modality == "video" else [None] * n
    return [Media(modality, o, d) for o, d in zip(objs, dirs)]


def render_batch(media, rng) -> np.ndarray:
    """Media of one modality rendered into one array: uint8 images (n, 32, 32, 3), uint8 videos
    (n, 8, 32, 32, 3) or float32 waveforms (n, 16000)."""
    return np.stack([m.render(rng) for m in media])


def _batches(modality, batch_size, seed, split, phrasing):
    rng = make_rng(seed)
    while True:
        media = sample_media(modality, batch_size, rng, split)
        batch = {modality: torch.from_numpy(render_batch(media, rng)),
                 "caption": [m.caption(rng, phrasing) for m in media],
                 "label": torch.tensor([m.obj.index for m in media]),
                 "colour": torch.tensor([COLOURS.index(m.obj.colour) for m in media]),
                 "shape": torch.tensor([SHAPES.index(m.obj.shape) for m in media])}
        if modality == "video":
            batch["direction"] = torch.tensor([DIRECTIONS.index(m.direction) for m in media])
        yield batch


def image_batches(batch_size=64, seed=0, split="train", phrasing="train"):
    """Endless batches: image (B, 3, 32, 32) float in [0, 1], caption, label/colour/shape ids."""
    for b in _batches("image", batch_size, seed, split, phrasing):
        b["image"] = b["image"].permute(0, 3, 1, 2).float() / 255
        yield b


def audio_batches(batch_size=64, seed=0, split="train", phrasing="train"):
    """Endless batches: audio (B, 16000) float waveform, caption, label/colour/shape ids."""
    yield from _batches("audio", batch_size, seed, split, phrasing)


def video_batches(batch_size=16, seed=0, split="train", phrasing="train"):
    """Endless batches: video (B, 8, 3, 32, 32) float in [0, 1], caption, ids incl. direction."""
    for b in _batches("video", batch_size, seed, split, phrasing):
        b["video"] = b["video"].permute(0, 1, 4, 2, 3).float() / 255
        yield b


def text_corpus(n, seed=0, split="train", phrasing="train") -> list[str]:
    """`n` training texts for the toy LLM: half captions of any modality, half dialogues whose input
    media are described inside their markers (format_dialogue's "describe")."""
    rng = make_rng(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            modality = ("image", "audio", "video")[rng.integers(3)]
            direction = DIRECTIONS[rng.integers(4)] if modality == "video" else None
            out.append(caption(sample_object(rng, split), rng, modality, direction, phrasing))
        else:
            out.append(format_dialogue(sample_dialogue(rng, split, phrasing), media_marker="describe"))
    return out


# ---------------------------------------------------------------- gallery

def write_gallery(folder, seed=0, overwrite=False) -> list[Path]:
    """One PNG grid of all 24 objects, a WAV per shape (red), a GIF per direction; returns the paths."""
    from PIL import Image

    from minignext.media import write_gif, write_wav

    folder, rng = Path(folder), make_rng(seed)
    names = ["objects.png"] + [f"sound_{o.pitch}_{o.contour}.wav" for o in map(Obj, ["red"] * 4, SHAPES)]
    names += [f"video_{d}.gif" for d in DIRECTIONS]
    clashes = [n for n in names if (folder / n).exists()]
    if clashes and not overwrite:
        raise FileExistsError(f"{folder}: {', '.join(clashes)} already exist; pass --overwrite to replace them")
    folder.mkdir(parents=True, exist_ok=True)
    zoom = lambda x: x.repeat(4, axis=-3).repeat(4, axis=-2)  # noqa: E731  (nearest-neighbour, 4x)
    rows = [np.concatenate([render_image(Obj(c, s), rng) for s in SHAPES], axis=1) for c in COLOURS]
    Image.fromarray(zoom(np.concatenate(rows, axis=0))).save(folder / names[0])
    for name, shape in zip(names[1:5], SHAPES):
        write_wav(folder / name, render_audio(Obj("red", shape), rng), SAMPLE_RATE, overwrite=True)
    for name, d in zip(names[5:], DIRECTIONS):
        write_gif(folder / name, zoom(render_video(Obj("blue", "square"), d, rng)), fps=8, overwrite=True)
    return [folder / n for n in names]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minignext.toy.world", description="write samples of the toy world")
    p.add_argument("--gallery", required=True, metavar="DIR", help="folder for the PNG, WAV and GIF samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    try:
        paths = write_gallery(args.gallery, args.seed, args.overwrite)
    except FileExistsError as e:
        raise SystemExit(f"error: {e}") from None
    print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    main()
