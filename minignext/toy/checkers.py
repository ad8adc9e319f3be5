"""Analytic judges for the toy world: read the attributes back out of media and text.

No learned model is involved, so the judges stay independent of everything they judge
(the decoders of issue 7, the toy NExT-GPT of issue 8). A sample is right only when it
holds exactly one object, and that object has the asked attributes.

    image  foreground = chroma (max - min of RGB) > 0.25: the world's grey background has none,
           every colour has >= 0.6. 8-connected components; specks under 4 px are ignored,
           but more than 8 px of specks in all means noise, and a blob over 60% of the frame
           is no object on a background. Colour: chroma-weighted circular
           mean of the hue, nearest of the six, and >= 75% of the pixels within 30 degrees
           of it. Shape: bounding-box fill ratio, solidity (area / convex hull area) and how
           far the centroid sits below the box centre (a triangle's sits 1/6 of the height lower),
           width along the diagonals over width along the axes (sqrt 2 for a square, 1 for a circle).
           Under 6 px wide is too small to tell (the world draws nothing under 9 px).
    sound  short-time FFT (64 ms Hann, 10 ms hop), peak bin refined by a parabola on the log
           magnitude. Loud frames (peak within 20 dB of the loudest) must be tonal (most energy
           near the peak and its overtones), hold one tone (no other peak above 30% of it, and no
           overtone above 50%: the world's tones are pure, so that is a second tone an octave
           up), and form one unbroken run with a continuous pitch track. Pitch: median
           of the track, nearest of the six within 1.5 semitones. Contour: the slope of a line
           fit (rising/falling) or the size and wiggle of what the line leaves (wobbly/steady).
    video  the image judge on every frame (exactly one object in each), colour pooled over
           frames, shape by majority, direction from a line fit to the centroid track.
    text   the attribute words a sentence mentions, with the world's synonyms.
"""

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from minignext.toy.world import (COLOUR_HUES, COLOURS, CONTOURS, DIRECTIONS, IMAGE_SIZE, PITCH_SEMITONES,
                                 PITCHES, SAMPLE_RATE, SHAPES, Media, Obj)

FG_CHROMA = 0.25
MIN_BLOB = 4
MAX_SPECKLE = 8
MAX_COVER = 0.6  # an object covering more of the frame than this is not an object on a background
HUE_TOLERANCE = 30.0
MIN_PURITY = 0.75


# ---------------------------------------------------------------- inputs

def _array(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy() if x.dtype != torch.uint8 else x.cpu().numpy()
    x = np.asarray(x)  # also reads PIL images
    return x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32)


def _pixels(x):
    x = _array(x)
    if x.size and (x.min() < -0.1 or x.max() > 1.1):
        raise ValueError(f"float pixels must lie in [0, 1] (got {x.min():.2f}..{x.max():.2f}); "
                         f"map a decoder's [-1, 1] output with (x + 1) / 2, or pass uint8")
    return np.clip(x, 0, 1)


def _frames(x, video):
    """(F, H, W, 3) float in [0, 1] from HWC/CHW images or FHWC/FCHW videos, uint8 or float."""
    x = _pixels(x)
    if x.ndim != (4 if video else 3):
        want = "(F, H, W, 3) or (F, 3, H, W)" if video else "(H, W, 3) or (3, H, W)"
        raise ValueError(f"expected a {'video' if video else 'image'} of shape {want}; got {x.shape}")
    if x.shape[-1] != 3 and x.shape[-3] == 3:
        x = np.moveaxis(x, -3, -1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels (RGB); got shape {x.shape}")
    return x if video else x[None]


def _want(want, *names):
    """The asked attributes as a dict, from an Obj, a Media, a dict or None."""
    if want is None:
        return {}
    if isinstance(want, Media):
        d = {"colour": want.obj.colour, "shape": want.obj.shape, "pitch": want.obj.pitch,
             "contour": want.obj.contour, "direction": want.direction}
    elif isinstance(want, Obj):
        d = {"colour": want.colour, "shape": want.shape, "pitch": want.pitch, "contour": want.contour}
    elif isinstance(want, dict):
        d = want
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"cannot check {sorted(unknown)} here; this judge reads {names}")
    else:
        raise ValueError(f"want must be an Obj, a Media, a dict or None; got {type(want).__name__}")
    return {k: v for k, v in d.items() if k in names and v is not None}


def _mismatch(found: dict, want: dict) -> str:
    wrong = [f"{k} is {found[k]}, not {v}" for k, v in want.items() if found[k] != v]
    return "; ".join(wrong)


# ---------------------------------------------------------------- images

@dataclass(frozen=True)
class ImageVerdict:
    colour: str | None
    shape: str | None
    n_objects: int
    ok: bool
    reason: str = ""


def _blobs(mask):
    """8-connected components of a boolean mask, as (ys, xs) index arrays, largest first."""
    h, w = mask.shape
    grid = mask.tolist()
    seen = [[False] * w for _ in range(h)]
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0][x0]:
            continue
        seen[y0][x0] = True
        stack, ys, xs = [(y0, x0)], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y), xs.append(x)
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and grid[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        stack.append((ny, nx))
        out.append((np.array(ys), np.array(xs)))
    return sorted(out, key=lambda b: -len(b[0]))


def _hue_chroma(rgb):
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return hue * 60, chroma


def _colour_of(hue, chroma):
    """Nearest colour to the chroma-weighted circular mean hue, or None if the pixels disagree."""
    rad = np.deg2rad(hue)
    mean = np.rad2deg(np.arctan2((chroma * np.sin(rad)).sum(), (chroma * np.cos(rad)).sum())) % 360
    dist = {c: abs((mean - h + 180) % 360 - 180) for c, h in COLOUR_HUES.items()}
    colour = min(dist, key=dist.get)
    purity = np.mean(np.abs((hue - COLOUR_HUES[colour] + 180) % 360 - 180) <= HUE_TOLERANCE)
    return colour if dist[colour] <= HUE_TOLERANCE and purity >= MIN_PURITY else None


def _hull_area(ys, xs):
    """Area of the convex hull of the pixels' corners (monotone chain on each row's end corners)."""
    pts = set()
    for y in np.unique(ys):
        row = xs[ys == y]
        pts.update({(row.min(), y), (row.min(), y + 1), (row.max() + 1, y), (row.max() + 1, y + 1)})
    pts = sorted((int(x), int(y)) for x, y in pts)

    def half(points):
        chain = []
        for p in points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = half(pts) + half(pts[::-1])
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))


def shape_features(ys, xs) -> dict:
    """Geometry of one blob: fill of its bounding box, solidity, aspect, how far the centroid sits
    below the box centre, and its width along the diagonals over its width along the axes
    (a square is sqrt(2) times wider corner to corner, a circle equally wide every way)."""
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    s, d = xs + ys, xs - ys
    diagonal = (s.max() - s.min() + d.max() - d.min() + 4) / np.sqrt(2) / (h + w)
    return {"fill": len(ys) / (h * w), "solidity": len(ys) / max(_hull_area(ys, xs), 1.0),
            "aspect": max(h, w) / min(h, w), "drop": (ys.mean() - (ys.min() + ys.max()) / 2) / h,
            "diagonal": diagonal}


def _shape_of(ys, xs, res=IMAGE_SIZE):
    """Thresholds sit halfway between the shapes' ranges over the world's own renders."""
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if min(h, w) < 6 * res / IMAGE_SIZE:  # the world draws nothing under 9 px
        return None
    f = shape_features(ys, xs)
    if f["aspect"] > 1.5 or f["fill"] < 0.35:
        return None
    if f["drop"] > 0.075:       # triangles 0.10-0.17, the others within +-0.04
        return "triangle"
    if f["solidity"] < 0.85:    # crosses 0.64-0.81, circles and squares >= 0.88
        return "cross"
    return "square" if f["diagonal"] > 1.2 else "circle"  # squares ~1.41, circles ~1.0


def _objects(frame):
    """The blobs of one frame that count as objects, and how many speckle pixels were ignored."""
    _, chroma = _hue_chroma(frame)
    blobs = _blobs(chroma > FG_CHROMA)
    objects = [b for b in blobs if len(b[0]) >= MIN_BLOB]
    return objects, sum(len(b[0]) for b in blobs if len(b[0]) < MIN_BLOB)


def _judge(found, want, n_objects, speckle, required, crowded=False):
    """Why a sample is wrong ("" if right). `required`: what must be readable when nothing is wanted."""
    if speckle > MAX_SPECKLE:
        return f"{speckle} px of scattered specks: too noisy"
    if crowded:
        return "colour fills most of the frame: no clear object on a background"
    if n_objects != 1:
        return f"{n_objects} objects, expected exactly one"
    missing = [k for k in (want or required) if found[k] is None]
    if missing:
        return f"cannot tell the {' or '.join(missing)}"
    return _mismatch(found, want)


def check_image(img, want=None) -> ImageVerdict:
    """Judge one image (HWC or CHW, uint8 or float in [0, 1], numpy, torch or PIL).

    `want`: an Obj, or a dict with any of colour and shape; None only checks that one clear object is there.
    """
    want = _want(want, "colour", "shape")
    frame = _frames(img, video=False)[0]
    objects, speckle = _objects(frame)
    found = {"colour": None, "shape": None}
    if len(objects) == 1:
        ys, xs = objects[0]
        hue, chroma = _hue_chroma(frame[ys, xs])
        found = {"colour": _colour_of(hue, chroma), "shape": _shape_of(ys, xs, frame.shape[0])}
    crowded = bool(objects) and len(objects[0][0]) > MAX_COVER * frame.shape[0] * frame.shape[1]
    reason = _judge(found, want, len(objects), speckle, ("colour", "shape"), crowded)
    return ImageVerdict(found["colour"], found["shape"], len(objects), not reason, reason)


# ---------------------------------------------------------------- videos

@dataclass(frozen=True)
class VideoVerdict:
    colour: str | None
    shape: str | None
    direction: str | None
    n_objects: tuple = field(default=())  # per frame
    ok: bool = False
    reason: str = ""


def _direction_of(centres, res):
    """Direction of a line fit to the centroid track, or None if it barely moves or zig-zags."""
    t = np.arange(len(centres)) - (len(centres) - 1) / 2
    slope = (t[:, None] * (centres - centres.mean(0))).sum(0) / (t * t).sum()
    travel = slope * (len(centres) - 1)  # (dx, dy) in pixels over the clip
    residual = np.abs(centres - centres.mean(0) - t[:, None] * slope).max()
    axis = int(np.argmax(np.abs(travel)))
    if abs(travel[axis]) < 4 * res / IMAGE_SIZE or abs(travel[1 - axis]) > 0.5 * abs(travel[axis]):
        return None
    if residual > 2.5 * res / IMAGE_SIZE:
        return None
    return ("right" if travel[0] > 0 else "left") if axis == 0 else ("down" if travel[1] > 0 else "up")


def check_video(frames, want=None) -> VideoVerdict:
    """Judge a clip, (F, H, W, 3) or (F, 3, H, W). `want`: a Media, an Obj, or a dict of
    colour/shape/direction (e.g. {"colour": "red", "direction": "left"})."""
    want = _want(want, "colour", "shape", "direction")
    video = _frames(frames, video=True)
    counts, hues, chromas, shapes, centres, speckle, crowded = [], [], [], [], [], 0, False
    for frame in video:
        objects, s = _objects(frame)
        counts.append(len(objects))
        speckle = max(speckle, s)
        crowded |= bool(objects) and len(objects[0][0]) > MAX_COVER * frame.shape[0] * frame.shape[1]
        if len(objects) == 1:
            ys, xs = objects[0]
            hue, chroma = _hue_chroma(frame[ys, xs])
            hues.append(hue), chromas.append(chroma), shapes.append(_shape_of(ys, xs, frame.shape[0]))
            centres.append((xs.mean(), ys.mean()))
    found = {"colour": None, "shape": None, "direction": None}
    if all(c == 1 for c in counts):
        found["colour"] = _colour_of(np.concatenate(hues), np.concatenate(chromas))
        top = max(set(shapes), key=shapes.count)
        found["shape"] = top if shapes.count(top) > len(shapes) / 2 else None
        found["direction"] = _direction_of(np.array(centres), video.shape[1])
    n = max(counts, key=lambda c: (c != 1, c))  # report the worst frame
    reason = _judge(found, want, n, speckle, ("colour", "direction"), crowded)  # shape only when asked for
    return VideoVerdict(found["colour"], found["shape"], found["direction"], tuple(counts), not reason, reason)


# ---------------------------------------------------------------- sounds

@dataclass(frozen=True)
class AudioVerdict:
    pitch: str | None
    contour: str | None
    n_tones: int
    ok: bool
    reason: str = ""
    track: np.ndarray | None = field(default=None, repr=False, compare=False)  # semitones re A4, per loud frame


N_FFT, HOP = 1024, 160


def spectrogram(wave, sr=SAMPLE_RATE):
    """|STFT| (frames, N_FFT // 2 + 1) with a Hann window, and each frame's centre time in seconds."""
    wave = np.asarray(wave, np.float64)
    if len(wave) < N_FFT:
        wave = np.pad(wave, (0, N_FFT - len(wave)))
    starts = np.arange(0, len(wave) - N_FFT + 1, HOP)
    frames = wave[starts[:, None] + np.arange(N_FFT)] * np.hanning(N_FFT)
    return np.abs(np.fft.rfft(frames, axis=1)), (starts + N_FFT / 2) / sr


def _near_harmonic(bins, f0):
    """Bins within 2.5 semitones (at least 3 bins) of f0, 2 f0 or 3 f0: a mel-smeared tone stays one tone."""
    k = np.clip(np.round(bins / f0), 1, 3)
    return np.abs(bins - k * f0) <= np.maximum(3, 0.155 * k * f0)


def _median5(x):
    return np.median(np.lib.stride_tricks.sliding_window_view(np.pad(x, 2, mode="edge"), 5), axis=1)


def _contour_of(times, track):
    t = times - times.mean()
    slope = (t * (track - track.mean())).sum() / (t * t).sum()  # semitones per second
    rest = track - track.mean() - slope * t
    wiggle = np.sum(np.diff(np.sign(rest[np.abs(rest) > 0.3])) != 0)  # sign changes of clear swings
    if rest.std() > 0.5 and wiggle >= 3:
        return "wobbly"
    if rest.std() > 0.6:
        return None
    if slope > 2.5:
        return "rising"
    if slope < -2.5:
        return "falling"
    return "steady" if abs(slope) < 1.2 else None


def check_audio(wave, want=None, sr=SAMPLE_RATE) -> AudioVerdict:
    """Judge a mono waveform. `want`: an Obj (judged through the mapping), or a dict of pitch/contour."""
    want = _want(want, "pitch", "contour")
    wave = np.asarray(wave.detach().cpu() if isinstance(wave, torch.Tensor) else wave, np.float32).squeeze()
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (N,); got {wave.shape}")
    if sr != SAMPLE_RATE:
        raise ValueError(f"the toy world's sounds are {SAMPLE_RATE} Hz; got sr={sr}")

    def verdict(reason, pitch=None, contour=None, n_tones=0, track=None):
        if not reason:
            reason = _mismatch({"pitch": pitch, "contour": contour}, want)
        return AudioVerdict(pitch, contour, n_tones, not reason, reason, track)

    if not np.isfinite(wave).all() or np.sqrt(np.mean(wave.astype(np.float64) ** 2)) < 1e-3:
        return verdict("silent")
    mag, times = spectrogram(wave - wave.mean(), sr)
    peak = mag[:, 8:].max(1)  # a tone's peak stands far above noise spread over all bins
    idx = np.nonzero(peak > 0.1 * peak.max())[0]
    if len(idx) * HOP / sr < 0.3:
        return verdict("less than 0.3 s of sound")
    if np.any(np.diff(idx) > 8):
        return verdict("the sound stops and starts again: more than one sound", n_tones=2)

    m, rows, bins = mag[idx], np.arange(len(idx)), np.arange(mag.shape[1])
    p = np.argmax(m[:, 8:-1], axis=1) + 8  # ignore rumble below 125 Hz
    a, b, c = (np.log(m[rows, p + d] + 1e-12) for d in (-1, 0, 1))
    curve = a - 2 * b + c  # a parabola through the log peak refines it below one bin
    f0 = p + np.where(curve < 0, 0.5 * (a - c) / np.where(curve < 0, curve, -1), 0)
    near, above = _near_harmonic(bins, f0[:, None]), bins >= 8
    power = m ** 2 * above
    tonal = (power * near).sum(1) / power.sum(1)
    second = np.where(near | ~above, 0, m).max(1) / m[rows, p]
    # the world's tones are pure: a strong overtone is a second tone (deep/high, low/bright, mid/shrill are octaves)
    overtone = np.where(near & (bins >= 1.5 * f0[:, None]), m, 0).max(1) / m[rows, p]
    second = np.maximum(second, np.where(overtone > 0.5, overtone, 0))
    if np.median(tonal) < 0.6:
        return verdict("not one clean tone: noise, or several tones at once")
    if np.mean(second > 0.3) > 0.25:
        return verdict("two tones at once", n_tones=2)
    track = _median5(12 * np.log2(f0 * sr / N_FFT / 440.0))  # drops one-frame glitches
    if np.abs(np.diff(track)).max() > 2.5:  # pitches of the world are 4 semitones apart
        return verdict("the pitch jumps: more than one tone", n_tones=2, track=track)
    centre = float(np.median(track))
    nearest = min(PITCHES, key=lambda p: abs(PITCH_SEMITONES[p] - centre))
    pitch = nearest if abs(PITCH_SEMITONES[nearest] - centre) <= 1.5 else None
    contour = _contour_of(times[idx], track)
    missing = [k for k, v in (("pitch", pitch), ("contour", contour)) if v is None and (k in want or not want)]
    return verdict(f"cannot tell the {' or '.join(missing)}" if missing else "", pitch, contour, 1, track)


# ---------------------------------------------------------------- text

def _pattern(words):
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")


TEXT_WORDS = {
    "colour": {c: _pattern([c]) for c in COLOURS},
    "shape": {"circle": _pattern(["circle", "circles", "disc"]), "square": _pattern(["square", "squares", "box"]),
              "triangle": _pattern(["triangle", "triangles"]), "cross": _pattern(["cross", "crosses", "plus sign"])},
    "pitch": {p: _pattern([p]) for p in PITCHES},
    "contour": {"steady": _pattern(["steady", "level"]), "rising": _pattern(["rising", "rises"]),
                "falling": _pattern(["falling", "falls"]), "wobbly": _pattern(["wobbly", "wobbles"])},
    "direction": {"left": _pattern(["left"]), "right": _pattern(["right"]),
                  "up": _pattern(["up", "upwards"]), "down": _pattern(["down", "downwards"])},
}
assert set(TEXT_WORDS["contour"]) == set(CONTOURS) and set(TEXT_WORDS["direction"]) == set(DIRECTIONS)
assert set(TEXT_WORDS["shape"]) == set(SHAPES)


@dataclass(frozen=True)
class TextVerdict:
    mentions: dict  # attribute -> tuple of the values the text names
    ok: bool
    reason: str = ""


def check_text(text: str, want=None) -> TextVerdict:
    """Which attribute values a text names. ok: each wanted attribute is named, and no other value of it.

    `want`: a dict of attributes; an Obj means its colour and shape; a Media what its modality shows."""
    if isinstance(want, Obj):
        want = {"colour": want.colour, "shape": want.shape}
    elif isinstance(want, Media):
        keys = {"image": ("colour", "shape"), "audio": ("pitch", "contour"),
                "video": ("colour", "shape", "direction")}[want.modality]
        want = {k: v for k, v in _want(want, *keys).items()}
    want = _want(want, *TEXT_WORDS)
    low = text.lower()
    mentions = {attr: tuple(v for v, pat in table.items() if pat.search(low)) for attr, table in TEXT_WORDS.items()}
    wrong = [f"{k}: says {', '.join(mentions[k]) or 'nothing'}, not {v}" for k, v in want.items()
             if mentions[k] != (v,)]
    return TextVerdict(mentions, not wrong, "; ".join(wrong))
