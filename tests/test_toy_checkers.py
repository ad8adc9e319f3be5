"""The toy world's judges: >= 99% right on the world's own media, still right on mildly
degraded media (what a decent generator makes), and strict on corrupted media."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from minignext.toy import world as w
from minignext.toy.checkers import check_audio, check_image, check_text, check_video


def blur(x, sigma):
    """Gaussian blur over the two spatial axes that precede the channel axis."""
    x = x.astype(np.float32)
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (x.ndim - 3, x.ndim - 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="edge")
        x = sum(k[i] * np.take(xp, range(i, i + x.shape[axis]), axis=axis) for i in range(2 * r + 1))
    return x


def u8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def accuracy(samples, judge):
    verdicts = [judge(media, want) for media, want in samples]
    failures = [(want, v.reason) for (_, want), v in zip(samples, verdicts) if not v.ok]
    return 1 - len(failures) / len(samples), failures[:5]


def images(n, seed, split="all"):
    rng = np.random.default_rng(seed)
    return [(w.render_image(o, rng), o) for o in (w.sample_object(rng, split) for _ in range(n))]


def videos(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = w.Media("video", w.sample_object(rng, "all"), w.DIRECTIONS[i % 4])
        out.append((m.render(rng), m))
    return out


def sounds(n, seed):
    rng = np.random.default_rng(seed)
    return [(w.render_audio(o, rng), o) for o in (w.sample_object(rng, "all") for _ in range(n))]


# ---------------------------------------------------------------- ground truth

def test_images_ground_truth_at_least_99_percent():
    acc, failures = accuracy(images(300, 0), check_image)
    assert acc >= 0.99, failures


def test_sounds_ground_truth_at_least_99_percent():
    acc, failures = accuracy(sounds(300, 1), check_audio)
    assert acc >= 0.99, failures


def test_videos_ground_truth_at_least_99_percent():
    acc, failures = accuracy(videos(160, 2), check_video)
    assert acc >= 0.99, failures


def test_without_want_the_judges_read_the_true_attributes():
    for img, o in images(48, 3):
        v = check_image(img)
        assert v.ok and (v.colour, v.shape, v.n_objects) == (o.colour, o.shape, 1), (o, v)
    for wav, o in sounds(24, 4):
        v = check_audio(wav)
        assert v.ok and (v.pitch, v.contour, v.n_tones) == (o.pitch, o.contour, 1), (o, v)
    for vid, m in videos(12, 5):
        v = check_video(vid)
        assert v.ok and (v.colour, v.direction, v.n_objects) == (m.obj.colour, m.direction, (1,) * 8), (m, v)


def test_wrong_attributes_are_rejected_with_the_reason():
    img, o = images(1, 6)[0]
    other = w.Obj(w.COLOURS[(w.COLOURS.index(o.colour) + 1) % 6], o.shape)
    v = check_image(img, other)
    assert not v.ok and f"colour is {o.colour}, not {other.colour}" in v.reason
    vid, m = videos(1, 7)[0]
    wrong = {"left": "right", "right": "left", "up": "down", "down": "up"}[m.direction]
    assert not check_video(vid, {"direction": wrong}).ok
    assert check_video(vid, {"colour": m.obj.colour, "direction": m.direction}).ok
    wav, o = sounds(1, 8)[0]
    assert not check_audio(wav, {"pitch": o.pitch, "contour": "steady" if o.contour != "steady" else "rising"}).ok


# ---------------------------------------------------------------- what a decent generator makes

def test_images_survive_blur_noise_and_colour_drift():
    rng = np.random.default_rng(9)
    samples = []
    for img, o in images(200, 10):
        x = blur(img, rng.uniform(0.4, 0.9)) + rng.normal(0, 0.03 * 255, img.shape)
        x = x + np.array([1, -1, 0.5]) * rng.uniform(-12, 12)  # a colour cast
        samples.append((u8(x), o))
    acc, failures = accuracy(samples, check_image)
    assert acc >= 0.97, failures


def test_videos_survive_blur_and_noise():
    rng = np.random.default_rng(11)
    samples = [(u8(blur(v, 0.7) + rng.normal(0, 0.03 * 255, v.shape)), m) for v, m in videos(60, 12)]
    acc, failures = accuracy(samples, check_video)
    assert acc >= 0.95, failures


@functools.lru_cache(maxsize=1)
def mel_round_trip(n_mels=64, n_fft=1024, sr=16000):
    """(bins, bins) matrix: a linear spectrum squeezed into mel bands and spread back by the pseudo-inverse."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(0, mel(sr / 2), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.stack([np.clip(np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)), 0, None)
                   for lo, c, hi in zip(edges, edges[1:], edges[2:])])
    return fb.T @ np.linalg.pinv(fb).T


def griffin_lim_through_mel(x, rng, iters=16, n_fft=1024, hop=160):
    """What a mel-spectrogram decoder without a trained vocoder gives back: the STFT magnitude
    through a 64-band mel round trip, phases re-estimated by Griffin-Lim."""
    win = np.hanning(n_fft)
    index = (np.arange(0, len(x) + 1, hop)[:, None] + np.arange(n_fft)).ravel()  # overlap-add positions
    norm = np.maximum(np.bincount(index, np.tile(win ** 2, len(index) // n_fft)), 1e-8)

    def stft(y):
        return np.fft.rfft(np.pad(y, n_fft // 2)[index.reshape(-1, n_fft)] * win, axis=1)

    def istft(spec):
        out = np.bincount(index, (np.fft.irfft(spec, axis=1) * win).ravel()) / norm
        return out[n_fft // 2:n_fft // 2 + len(x)]

    mag = np.clip(np.abs(stft(x)) @ mel_round_trip(), 0, None)
    phase = np.exp(2j * np.pi * rng.random(mag.shape))
    for _ in range(iters):
        spec = stft(istft(mag * phase))
        phase = spec / np.maximum(np.abs(spec), 1e-12)
    return istft(mag * phase).astype(np.float32)


def test_sounds_survive_noise_echo_detuning_and_a_mel_round_trip():
    rng = np.random.default_rng(13)
    samples = []
    for i, (x, o) in enumerate(sounds(90, 14)):
        x = x.astype(np.float64)
        if i % 3 == 0:  # white noise at 15 dB SNR
            x = x + rng.normal(0, np.sqrt(np.mean(x ** 2) / 10 ** 1.5), x.shape)
        elif i % 3 == 1:  # a short echo tail and a 0.7 semitone detune
            tail = 0.02 * rng.normal(0, 1, 800) * np.exp(-np.arange(800) / 200)
            x = np.convolve(x, np.concatenate([[1.0], tail]))[:len(x)]
            x = np.interp(np.arange(len(x)) * 2 ** (0.7 / 12), np.arange(len(x)), x, right=0)
        samples.append((x.astype(np.float32), o))
    acc, failures = accuracy(samples, check_audio)
    assert acc >= 0.97, failures
    mel = [(griffin_lim_through_mel(x.astype(np.float64), rng), o) for x, o in sounds(16, 15)]
    acc, failures = accuracy(mel, check_audio)
    assert acc >= 0.9, failures


# ---------------------------------------------------------------- corrupted media

def test_image_corruptions_are_rejected():
    rng = np.random.default_rng(16)
    red = w.Obj("red", "square")
    one = w.render_image(red, rng, size=10, centre=(8, 8))
    assert check_image(one, red).ok
    bg = (one.max(-1) - one.min(-1)) < 30
    second = w.render_image(w.Obj("blue", "circle"), rng, size=10, centre=(23, 23))
    two = np.where(bg[..., None], second, one)
    twin = np.where(bg[..., None], w.render_image(red, rng, size=10, centre=(23, 23)), one)
    fragment = one.copy()
    fragment[25:28, 25:28] = one[8, 8]
    cut = one.copy()
    cut[7:9, :] = one[0, 0]
    mixed = one.copy()
    mixed[:, :8] = one[:, :8, ::-1]  # left half of the square turns blue
    noisy = u8(one + rng.normal(0, 70, one.shape))
    speckled = one.copy()
    for y, x in rng.integers(18, 31, size=(12, 2)):
        speckled[y, x] = (255, 255, 0)
    blank = np.full_like(one, 40)
    flood = np.full_like(one, 0)
    flood[..., 0] = 220
    tiny = w.render_image(red, rng, size=3, centre=(16, 16))
    cases = {"two objects": two, "the same object twice": twin, "a fragment": fragment, "cut in two": cut,
             "two colours": mixed, "heavy noise": noisy, "specks": speckled, "nothing": blank,
             "all red": flood, "too small to tell": tiny}
    for name, img in cases.items():
        v = check_image(img, red)
        assert not v.ok and v.reason, (name, v)
        assert not check_image(img).ok, name


def test_sound_corruptions_are_rejected():
    rng = np.random.default_rng(17)
    a = w.render_audio(w.Obj("red", "square"), rng)
    b = w.render_audio(w.Obj("blue", "square"), rng)
    active = np.nonzero(np.abs(a) > 0.05)[0]
    mid = (active[0] + active[-1]) // 2
    between = w.render_audio(w.Obj("red", "square"), rng)
    between = np.interp(np.arange(16000) * 2 ** (2 / 12), np.arange(16000), between, right=0)  # 2 st off
    seq = np.zeros(16000, np.float32)
    seq[:7000], seq[9000:] = a[active[0]:active[0] + 7000], b[active[0]:active[0] + 7000]
    cases = {
        "silence": np.zeros(16000, np.float32),
        "white noise": rng.normal(0, 0.3, 16000),
        "tone under noise at 0 dB": a + rng.normal(0, np.sqrt(np.mean(a ** 2)), 16000),
        "two tones at once": a + b,
        "two tones an octave apart": a + w.render_audio(w.Obj("cyan", "square"), rng),  # deep -5, high +7
        "a softer second tone": a + 0.4 * b,
        "two tones in a row": seq,
        "pitch jump": np.concatenate([a[:mid], b[mid:]]),
        "too short": np.where(np.arange(16000) < active[0] + 3000, a, 0),
        "between two pitches": between,
    }
    for name, x in cases.items():
        v = check_audio(np.asarray(x, np.float32), w.Obj("red", "square"))
        assert not v.ok and v.reason, (name, v)


def test_video_corruptions_are_rejected():
    rng = np.random.default_rng(18)
    m = w.Media("video", w.Obj("green", "square"), "right")
    vid = m.render(rng)
    assert check_video(vid, m).ok
    extra = vid.copy()
    extra[3, 28:31, 1:4] = vid[3][np.unravel_index(np.argmax(vid[3].max(-1) - vid[3].min(-1)), (32, 32))]
    gone = vid.copy()
    gone[5] = vid[5, 0, 0]
    still = np.repeat(vid[:1], 8, axis=0)
    shuffled = vid[[0, 5, 2, 7, 1, 6, 3, 4]]
    recoloured = vid.copy()
    recoloured[4:] = vid[4:, :, :, [1, 2, 0]]  # green turns red
    cases = {"a second blob in one frame": extra, "a frame without the object": gone, "no motion": still,
             "jumping about": shuffled, "changes colour": recoloured, "noise": u8(vid + rng.normal(0, 70, vid.shape))}
    for name, x in cases.items():
        v = check_video(x, m)
        assert not v.ok and v.reason, (name, v)


# ---------------------------------------------------------------- inputs and text

def test_inputs_in_any_common_layout_give_the_same_verdict():
    img, o = images(1, 19)[0]
    ref = check_image(img, o)
    chw = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    assert ref.ok and check_image(chw, o) == ref == check_image(Image.fromarray(img), o)
    batch = next(w.video_batches(2, seed=3))
    for video, colour, direction in zip(batch["video"], batch["colour"], batch["direction"]):
        assert check_video(video, {"colour": w.COLOURS[colour], "direction": w.DIRECTIONS[direction]}).ok
    wav, o = sounds(1, 20)[0]
    assert check_audio(torch.from_numpy(wav), o).ok
    with pytest.raises(ValueError, match="shape"):
        check_image(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="this judge reads"):
        check_image(img, {"pitch": "deep"})
    assert check_audio(torch.from_numpy(wav)[None], o).ok
    with pytest.raises(ValueError, match="mono"):
        check_audio(np.stack([wav, wav]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_image(img.astype(np.float32))
    with pytest.raises(ValueError, match="16000 Hz"):
        check_audio(wav, sr=22050)


def test_text_judge_reads_synonyms_and_rejects_conflicts():
    assert check_text("Here is a RED plus sign.", {"colour": "red", "shape": "cross"}).ok
    assert check_text("it is a disc that is blue", w.Obj("blue", "circle")).ok
    assert check_text("a deep tone that wobbles", w.Media("audio", w.Obj("red", "circle"))).ok
    assert check_text("a box going to the left", {"shape": "square", "direction": "left"}).ok
    assert not check_text("a red or blue circle", {"colour": "red"}).ok
    assert not check_text("a circle", {"colour": "red"}).ok
    assert not check_text("a red circle moving up and down", {"direction": "up"}).ok
    assert check_text("hello! i can make pictures.").mentions == {k: () for k in
                                                                   ("colour", "shape", "pitch", "contour", "direction")}
