"""media.py against reference implementations (transformers' CLIP image processor,
kaldi-native-fbank) and direct test-only transcriptions of the Kaldi and sinc formulas."""

import math
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from minignext import media

RNG = np.random.default_rng(0)


def random_image(h, w, mode="RGB"):
    img = Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


# ---------------------------------------------------------------- images

@pytest.fixture(scope="module")
def clip_processor():
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(do_resize=True, size={"shortest_edge": 224}, resample=Image.BICUBIC, do_center_crop=True,
               crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(media.CLIP_MEAN), image_std=list(media.CLIP_STD))


@pytest.mark.parametrize("h, w, mode", [(300, 400, "RGB"), (227, 500, "RGB"), (640, 225, "RGB"),
                                        (100, 80, "RGB"), (224, 224, "RGB"), (233, 310, "RGBA"),
                                        (250, 190, "L"), (260, 300, "P")])
def test_image_matches_clip_image_processor(clip_processor, h, w, mode):
    # Both resize through Pillow's bicubic filter on uint8 pixels, so the match is exact up to
    # float rounding; (227, 500) has an odd excess of 3 px after resizing, where our
    # transformers-style floor offset and torchvision's round-half-even offset would differ.
    img = random_image(h, w, mode)
    ref = torch.as_tensor(np.asarray(clip_processor(img, return_tensors="np")["pixel_values"][0]))
    ours = media.preprocess_image(img)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-2, rtol=0)
    assert (ours - ref).abs().max() < 1e-5


def test_image_batches_arrays_and_paths_agree(tmp_path):
    imgs = [random_image(40, 60), random_image(50, 33)]
    imgs[0].save(tmp_path / "a.png")
    single = media.preprocess_image(tmp_path / "a.png", size=32)
    batch = media.preprocess_image([imgs[0], np.asarray(imgs[1])], size=32)
    assert single.shape == (3, 32, 32) and batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch[0], single)
    stacked = media.preprocess_image(np.stack([np.asarray(imgs[0])] * 3), size=32)
    torch.testing.assert_close(stacked, single.expand(3, -1, -1, -1))
    # a 32x32 image needs no resize: the result is the direct normalisation of its pixels
    small = random_image(32, 32)
    direct = (torch.tensor(np.asarray(small), dtype=torch.float32).permute(2, 0, 1) / 255
              - torch.tensor(media.CLIP_MEAN)[:, None, None]) / torch.tensor(media.CLIP_STD)[:, None, None]
    torch.testing.assert_close(media.preprocess_image(small, size=32), direct)


def test_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        media.load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a folder"):
        media.load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        media.load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("this is not an image at all")
    with pytest.raises(ValueError, match="not an image"):
        media.load_image(tmp_path / "text.png")
    random_image(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        media.load_image(tmp_path / "truncated.png")
    (tmp_path / "broken.png").write_bytes(data[:40] + bytes(200) + data[240:])
    with pytest.raises(ValueError, match="broken"):
        media.load_image(tmp_path / "broken.png")
    assert np.asarray(media.load_image(Image.new("I;16", (8, 8), 65535))).min() == 255    # 16-bit grey is read
    with pytest.raises(ValueError, match="mode 'F'"):
        media.preprocess_image(Image.new("F", (8, 8)))
    with pytest.raises(ValueError, match="zero-size"):
        media.load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"uint8 of shape \(H, W, 3\)"):
        media.preprocess_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        media.preprocess_image([])


# ---------------------------------------------------------------- Kaldi fbank

def knf_fbank(waveform, sample_rate, num_bins, high_freq=0.0):
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = high_freq
    opts.use_energy = False
    opts.htk_compat = True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(sample_rate, waveform.tolist())
    fbank.input_finished()
    return torch.tensor(np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))


def chirp_signal(seconds, sample_rate=16000, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    chirp = 0.3 * torch.sin(2 * math.pi * (200 + 900 * t) * t)
    return (chirp + 0.02 * torch.randn(t.shape, generator=g) + 0.01).float()


@pytest.mark.parametrize("sample_rate, num_bins, high_freq", [(16000, 80, 0.0), (8000, 23, -400.0)])
def test_fbank_matches_kaldi_native_fbank(sample_rate, num_bins, high_freq):
    x = chirp_signal(1.3, sample_rate)
    ref = knf_fbank(x, sample_rate, num_bins, high_freq)
    ours = media.kaldi_fbank(x, sample_rate, num_bins, high_freq=high_freq)
    assert ours.shape == ref.shape == (1 + (len(x) - sample_rate // 40) // (sample_rate // 100), num_bins)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def kaldi_fbank_transcribed(x, sample_rate=16000, num_bins=128, low_freq=20.0):
    """Kaldi's feature-window.cc / mel-computations.cc, sample by sample, in float64."""
    x = np.asarray(x, np.float64)
    length, shift = sample_rate * 25 // 1000, sample_rate * 10 // 1000
    n_fft = 2 ** math.ceil(math.log2(length))
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(low_freq), mel(sample_rate / 2)
    delta = (hi - lo) / (num_bins + 1)
    banks = np.zeros((num_bins, n_fft // 2))
    for b in range(num_bins):
        left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        for i in range(n_fft // 2):
            m = mel(i * sample_rate / n_fft)
            if left < m < right:
                banks[b, i] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (length - 1)) for i in range(length)])
    out = []
    for f in range(1 + (len(x) - length) // shift):
        frame = x[f * shift: f * shift + length].copy()
        frame -= frame.mean()
        for i in range(length - 1, 0, -1):
            frame[i] -= 0.97 * frame[i - 1]
        frame[0] -= 0.97 * frame[0]
        spectrum = np.fft.rfft(frame * window, n=n_fft)
        power = spectrum.real[: n_fft // 2] ** 2 + spectrum.imag[: n_fft // 2] ** 2
        out.append(np.log(np.maximum(banks @ power, np.finfo(np.float32).eps)))
    return torch.tensor(np.array(out), dtype=torch.float32), banks


def test_fbank_128_bins_matches_kaldi_formulas():
    x = chirp_signal(0.6)
    ref, banks = kaldi_fbank_transcribed(x)
    torch.testing.assert_close(media.kaldi_fbank(x), ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(media.mel_filterbank(128, 512, 16000)[:, :256], torch.from_numpy(banks))
    # why kaldi-native-fbank refuses 128 bins at 16 kHz / 512 points: some low filters are empty
    assert (banks.sum(1) == 0).any()


def test_fbank_errors():
    with pytest.raises(ValueError, match="shorter than one"):
        media.kaldi_fbank(torch.zeros(399))
    with pytest.raises(ValueError, match="NaN"):
        media.kaldi_fbank(torch.tensor([0.0, float("nan")] * 300))
    with pytest.raises(ValueError, match="one channel"):
        media.kaldi_fbank(torch.zeros(2, 1000))
    with pytest.raises(ValueError, match="low_freq"):
        media.mel_filterbank(10, 512, 16000, low_freq=9000)


# ---------------------------------------------------------------- resampling

def sinc_resample_direct(x, orig_sr, new_sr, m, width=6, rolloff=0.99):
    """Output sample m as the windowed-sinc sum over all inputs, written from the formula."""
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    cutoff = min(orig, new) * rolloff
    i = np.arange(len(x))
    t = (i / orig - m / new) * cutoff
    inside = np.abs(t) < width
    sinc = np.sinc(t)
    window = np.cos(np.pi * t / (2 * width)) ** 2
    return float((np.asarray(x, np.float64) * sinc * window * inside).sum() * cutoff / orig)


@pytest.mark.parametrize("orig_sr, new_sr", [(44100, 16000), (8000, 16000), (22050, 16000)])
def test_resample_matches_sinc_formula_and_keeps_frequency(orig_sr, new_sr):
    seconds, freq = 0.5, 1000.0
    t = np.arange(int(seconds * orig_sr)) / orig_sr
    x = torch.tensor(0.5 * np.sin(2 * np.pi * freq * t), dtype=torch.float32)
    y = media.resample(x, orig_sr, new_sr)
    assert y.shape == (math.ceil(len(x) * new_sr / orig_sr),)
    for m in [0, 1, 7, len(y) // 2, len(y) - 1]:
        assert abs(y[m].item() - sinc_resample_direct(x.numpy(), orig_sr, new_sr, m)) < 1e-5
    spectrum = np.abs(np.fft.rfft(y.numpy() * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) * new_sr / len(y) - freq) <= new_sr / len(y)
    middle = slice(len(y) // 4, 3 * len(y) // 4)  # away from the zero-padded edges
    expected = 0.5 * np.sin(2 * np.pi * freq * np.arange(len(y)) / new_sr)
    np.testing.assert_allclose(y.numpy()[middle], expected[middle], atol=2e-3)


def test_resample_removes_frequencies_above_the_new_nyquist():
    t = np.arange(44100 // 2) / 44100
    x = torch.tensor(np.sin(2 * np.pi * 10000 * t), dtype=torch.float32)  # above 8 kHz
    y = media.resample(x, 44100, 16000)
    assert y[len(y) // 4: -len(y) // 4].abs().max() < 0.02
    batch = media.resample(torch.stack([x, 2 * x]), 44100, 16000)
    torch.testing.assert_close(batch, torch.stack([y, 2 * y]))


# ---------------------------------------------------------------- WAV files

def write_pcm(path, ints, width, sample_rate=16000):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(ints.shape[0])
        f.setsampwidth(width)
        f.setframerate(sample_rate)
        interleaved = ints.T.reshape(-1)
        if width == 1:
            raw = (interleaved + 128).astype(np.uint8).tobytes()
        elif width == 3:
            raw = np.stack([(interleaved >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8).tobytes()
        else:
            raw = interleaved.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
        f.writeframes(raw)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_pcm_widths(tmp_path, width):
    bits = 8 * width
    ints = RNG.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (2, 500), dtype=np.int64)
    write_pcm(tmp_path / "x.wav", ints, width, 22050)
    x, sr = media.read_wav(tmp_path / "x.wav")
    assert sr == 22050 and x.dtype == torch.float32 and x.shape == (2, 500)
    torch.testing.assert_close(x, torch.tensor(ints / 2.0 ** (bits - 1), dtype=torch.float32))


def test_wav_round_trip_and_no_overwrite(tmp_path):
    x = (torch.rand(2, 1000, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.9
    path = media.write_wav(tmp_path / "a.wav", x, 16000)
    y, sr = media.read_wav(path)
    assert sr == 16000 and y.shape == (2, 1000)
    assert (y - x).abs().max() <= 0.5 / 32768 + 1e-7
    with pytest.raises(FileExistsError, match="overwrite=True"):
        media.write_wav(path, -x, 16000)
    torch.testing.assert_close(media.read_wav(path)[0], y)  # untouched
    media.write_wav(path, -x, 16000, overwrite=True)
    torch.testing.assert_close(media.read_wav(path)[0], -y, atol=1 / 32768, rtol=0)
    mono, _ = media.load_audio(path)
    stereo, _ = media.load_audio(path, mono=False)
    assert mono.shape == (1, 1000) and stereo.shape == (2, 1000)
    torch.testing.assert_close(mono[0], stereo.mean(0))


def test_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        media.load_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        media.load_audio(tmp_path / "empty.wav")
    write_pcm(tmp_path / "silent.wav", np.zeros((1, 0), np.int64), 2)
    with pytest.raises(ValueError, match="zero-length"):
        media.load_audio(tmp_path / "silent.wav")
    (tmp_path / "noise.wav").write_bytes(b"RIFF" + bytes(60))
    with pytest.raises(ValueError, match="not a readable WAV file"):
        media.load_audio(tmp_path / "noise.wav")
    # an IEEE-float WAV (format tag 3), which the stdlib wave module does not read, is read
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little") \
        + (64000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + (8).to_bytes(4, "little") + bytes(8)
    (tmp_path / "float.wav").write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    assert media.load_audio(tmp_path / "float.wav")[0].shape == (1, 2)
    (tmp_path / "song.mp3").write_bytes(b"ID3" + bytes(100))
    with pytest.raises(ValueError, match="not a readable WAV file .* convert other formats"):
        media.load_audio(tmp_path / "song.mp3")
    nan = torch.zeros(32000)
    nan[5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        media.waveform_to_imagebind_audio(nan, 16000)
    with pytest.raises(ValueError, match="NaN"):
        media.write_wav(tmp_path / "nan.wav", nan, 16000)
    assert not (tmp_path / "nan.wav").exists()
    with pytest.raises(ValueError, match="empty"):
        media.waveform_to_imagebind_audio(torch.zeros(0), 16000)
    with pytest.raises(ValueError, match=r"transpose an \(n, channels\) array"):
        media.waveform_to_imagebind_audio(torch.zeros(32000, 2), 16000)
    with pytest.raises(ValueError, match="shorter than one"):
        media.waveform_to_imagebind_audio(torch.zeros(300), 16000)  # a zero-length clip of frames


# ---------------------------------------------------------------- ImageBind audio path

def test_clip_timepoints_follow_constant_clips_per_video():
    assert media.clip_timepoints(5, 3, 2.0) == [(0, 2), (1.5, 3.5), (3, 5)]
    assert media.clip_timepoints(1, 3, 2.0) == [(0, 2)] * 3
    assert media.clip_timepoints(4, 1, 2.0) == [(0, 2)]


def test_waveform_to_imagebind_audio_stage_by_stage():
    sr = 16000
    x = chirp_signal(5.0, sr, seed=3)
    out = media.waveform_to_imagebind_audio(torch.stack([x, x + 0.1]), sr)
    assert out.shape == (3, 1, 128, 204)
    # clip 1 of a 5-s recording covers 1.5-3.5 s; stereo is averaged before anything else
    piece = (x + 0.05)[24000:56000].numpy()
    fbank, _ = kaldi_fbank_transcribed(piece - piece.mean())
    assert fbank.shape == (198, 128)
    expected = torch.nn.functional.pad(fbank.T, (0, 6))
    expected = (expected + 4.268) / 9.138
    torch.testing.assert_close(out[1, 0], expected, atol=2e-4, rtol=0)
    # padding frames hold the normalised zero
    torch.testing.assert_close(out[:, 0, :, 198:], torch.full((3, 128, 6), 4.268 / 9.138))
    # a 44.1 kHz recording is resampled to 16 kHz first
    x44 = media.resample(x, sr, 44100)
    out44 = media.waveform_to_imagebind_audio(x44, 44100, clips=2, target_length=100, num_mel_bins=64)
    assert out44.shape == (2, 1, 64, 100)
    direct = media.waveform_to_imagebind_audio(media.resample(x44, 44100, sr), sr, clips=2, target_length=100,
                                               num_mel_bins=64)
    torch.testing.assert_close(out44, direct)


def test_short_audio_repeats_one_padded_clip():
    out = media.waveform_to_imagebind_audio(chirp_signal(0.5), 16000)
    assert out.shape == (3, 1, 128, 204)
    torch.testing.assert_close(out[0], out[2])
    assert torch.all(out[0, 0, :, 48:] == out[0, 0, 0, -1])  # 0.5 s = 48 frames, the rest is padding


# ---------------------------------------------------------------- video

def index_video(t, h, w):
    """Frame k is a flat grey of value 5k (so the frame index can be read back)."""
    return np.repeat((np.arange(t, dtype=np.uint8) * 5)[:, None, None, None], h * w * 3).reshape(t, h, w, 3)


def test_gif_and_folder_round_trip(tmp_path):
    frames = np.zeros((6, 20, 30, 3), np.uint8)
    colours = RNG.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    for k in range(6):
        for q in range(4):
            frames[k, :, q * 8: q * 8 + 8] = colours[k, q]
    path = media.write_gif(tmp_path / "v.gif", frames, fps=4)
    np.testing.assert_array_equal(media.load_video(path), frames)
    with pytest.raises(FileExistsError):
        media.write_gif(path, frames[::-1])
    np.testing.assert_array_equal(media.load_video(path), frames)
    media.write_gif(path, frames[::-1], overwrite=True)
    np.testing.assert_array_equal(media.load_video(path), frames[::-1])
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(6):
        Image.fromarray(frames[k]).save(folder / f"{k:03d}.png")
    (folder / "notes.txt").write_text("ignored")
    np.testing.assert_array_equal(media.load_video(folder), frames)
    np.testing.assert_array_equal(media.load_video(torch.from_numpy(frames).float() / 255), frames)


def test_video_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        media.load_video(tmp_path / "empty")
    random_image(10, 10).save(tmp_path / "still.png")
    with pytest.raises(ValueError, match="not a GIF"):
        media.load_video(tmp_path / "still.png")
    (tmp_path / "fake.gif").write_text("GIF? no")
    with pytest.raises(ValueError, match="not a GIF"):
        media.load_video(tmp_path / "fake.gif")
    with pytest.raises(FileNotFoundError):
        media.load_video(tmp_path / "missing.gif")
    (tmp_path / "mixed").mkdir()
    random_image(10, 10).save(tmp_path / "mixed" / "a.png")
    random_image(12, 10).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="differ in size"):
        media.load_video(tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        media.load_video(np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        media.load_video(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="without NaN"):
        media.load_video(np.full((2, 8, 8, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"float in \[0, 1\]"):
        media.load_video(np.full((2, 8, 8, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="holds no frames"):  # a zero-length clip
        media.video_to_imagebind_clips(index_video(3, 8, 8), clips=5, size=8, fps=0.25)
    with pytest.raises(ValueError, match="crops must be 1"):
        media.video_to_imagebind_clips(index_video(3, 8, 8), size=8, crops=2)


def normalised(pixels):
    x = torch.as_tensor(pixels, dtype=torch.float32) / 255
    return (x - torch.tensor(media.CLIP_MEAN)) / torch.tensor(media.CLIP_STD)


def test_video_clips_sample_time_like_imagebind():
    # 40 frames at 8 fps = 5 s; 5 clips of 2 s start at 0, 0.75, 1.5, 2.25, 3 s, i.e. frames
    # [0,16), [6,22), [12,28), [18,34), [24,40); two evenly spaced frames each: first and last.
    out = media.video_to_imagebind_clips(index_video(40, 16, 16), clips=5, frames_per_clip=2, size=16, crops=1)
    assert out.shape == (5, 3, 2, 16, 16)
    expected = [[0, 15], [6, 21], [12, 27], [18, 33], [24, 39]]
    for c, pair in enumerate(expected):
        for f, k in enumerate(pair):
            torch.testing.assert_close(out[c, :, f], normalised([5 * k] * 3)[:, None, None].expand(3, 16, 16))


@pytest.mark.parametrize("h, w", [(16, 25), (25, 16)])
def test_video_spatial_crops(h, w):
    video = RNG.integers(0, 256, (4, h, w, 3), dtype=np.uint8)
    out = media.video_to_imagebind_clips(video, clips=1, frames_per_clip=2, size=16, crops=3, fps=2.0)
    assert out.shape == (3, 3, 2, 16, 16)
    full = normalised(video[[0, 3]]).permute(3, 0, 1, 2)  # (3, T, H, W); short side is already 16
    for i, offset in enumerate([0, 5, 9]):  # left/centre/right or top/centre/bottom; centre rounds up
        crop = full[..., offset: offset + 16, :] if h > w else full[..., offset: offset + 16]
        torch.testing.assert_close(out[i], crop)


def test_video_short_side_scale_is_bilinear():
    video = RNG.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    out = media.video_to_imagebind_clips(video, clips=1, size=10, crops=1)
    # halving with bilinear, align_corners=False, no antialias = mean of each 2x2 block
    blocks = video.astype(np.float64).reshape(2, 10, 2, 15, 2, 3).mean((2, 4))
    full = normalised(blocks).permute(3, 0, 1, 2)  # 10x15; the centre crop starts at ceil(5 / 2) = 3
    torch.testing.assert_close(out[0], full[..., 3:13], atol=1e-5, rtol=0)
