"""Media loading and preprocessing for the encoders: images, WAV audio, GIF/frame videos.

Pillow, numpy, torch and the standard library only. The pipelines reproduce what the
encoders were trained with:
- images: transformers' CLIPImageProcessor / ImageBind `load_and_transform_vision_data`
  (shortest side to `size` bicubic, centre crop, CLIP mean/std);
- audio: ImageBind `load_and_transform_audio_data` and `waveform2melspec` (16 kHz mono,
  3 evenly spaced 2-s clips, Kaldi fbank as torchaudio.compliance.kaldi.fbank computes it,
  pad/crop to 204 frames, mean -4.268, std 9.138);
- video: ImageBind `load_and_transform_video_data` (pytorchvideo's
  ConstantClipsPerVideoSampler, UniformTemporalSubsample, ShortSideScale, SpatialCrop);
- thermal, depth, IMU: ImageBind's other branches. Its repository ships no loader for them;
  thermal follows PandaGPT's `load_and_transform_thermal_data`, depth the disparity conversion
  ImageBind's authors published for SUN RGB-D (facebookresearch/omnivore issue 12).

Paper: ImageBind (Girdhar et al., CVPR 2023), code facebookresearch/ImageBind `data.py`.

Files are opened through minignext.mediafile, which checks them against LIMITS before anything is
decoded, and reads only what the encoders use: three 2-s windows of a long recording, the
sampled frames of a video. Every function checks its input and raises MediaError (a
ValueError) or FileNotFoundError with a message that names the file, says what was wrong and
what is expected.
"""

import io
import math
import wave
from bisect import bisect_left
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minignext.mediafile import (  # noqa: F401  (LIMITS, MediaLimits and friends are media's public API)
    LIMITS, MediaError, MediaLimits, VideoSource, WavFile, check_media_path, check_pixels, decoding, gif_frames,
    gif_info, open_media, opened, source_name, timed_video)
from minignext.utils import atomic_write

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEBIND_AUDIO_MEAN, IMAGEBIND_AUDIO_STD = -4.268, 9.138
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RGB_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}     # 16-bit grey (PNG, TIFF): scaled to 8 bits


def _check_finite(x: torch.Tensor, what: str):
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); expected at least one sample")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values; expected finite samples")


# ---------------------------------------------------------------- images

def load_image(source) -> Image.Image:
    """An RGB PIL image from a path (a file or a pipe), an open binary file, a PIL image or a
    uint8 (H, W, 3) array. A file's pixel count is checked against LIMITS from its header,
    before decoding; 16-bit grey is scaled to 8 bits, alpha dropped, palettes expanded."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _as_pil(source)
    if isinstance(source, Image.Image):
        img, name = source, "image"
    else:
        with opened(source) as f:
            name = source_name(f)
            with decoding(name, "image"):
                img = Image.open(f)
                check_pixels(img.width, img.height, name)
                img.load()              # decode now, so a truncated file fails here and not later
    if img.width == 0 or img.height == 0:
        raise MediaError(f"{name}: zero-size image ({img.width}x{img.height})")
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64).clip(0, 65535) / 257
        img = Image.fromarray(grey.round().astype(np.uint8), "L")
    if img.mode not in RGB_CONVERTIBLE_MODES:
        raise MediaError(f"{name}: unsupported image mode {img.mode!r} (float or multi-band); "
                         f"expected an 8- or 16-bit mode such as RGB, RGBA, L, P or I;16")
    return img if img.mode == "RGB" else img.convert("RGB")


def _as_pil(item) -> Image.Image:
    if isinstance(item, (torch.Tensor, np.ndarray)):
        arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else item
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise MediaError(f"an image array must be uint8 of shape (H, W, 3); got {arr.dtype} {arr.shape}")
        item = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    return load_image(item)


def write_image(path, image, overwrite=False) -> Path:
    """Save a PIL image (or uint8 (H, W, 3) array) as PNG, atomically; never replaces a file unless overwrite."""
    image = load_image(image)
    with atomic_write(path, overwrite) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` (bicubic, Pillow's antialiasing filter).

    The long side is truncated, int(size * long / short), as torchvision and transformers do.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """A size x size crop; the offset rounds down, like transformers' center_crop.

    torchvision rounds half to even instead, so the two differ by one pixel when the
    excess is 3, 7, 11, ... pixels.
    """
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"cannot crop {size}x{size} from a {w}x{h} image; resize it first")
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img, size=224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP / ImageBind image preprocessing: a (3, size, size) float tensor.

    `img` is a path, a PIL image or a uint8 (H, W, 3) array; a list of those, or a uint8
    (N, H, W, 3) array, gives (N, 3, size, size).
    """
    if isinstance(img, (list, tuple)) or (isinstance(img, (np.ndarray, torch.Tensor)) and img.ndim == 4):
        if len(img) == 0:
            raise ValueError("preprocess_image got an empty batch; expected at least one image")
        return torch.stack([preprocess_image(i, size, mean, std) for i in img])
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels; got {size}")
    pil = center_crop(resize_short_side(_as_pil(img), size), size)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---------------------------------------------------------------- audio files

def read_wav(source) -> tuple[torch.Tensor, int]:
    """(waveform float32 (channels, n) in [-1, 1), sample_rate) from a whole WAV file (a path, a
    pipe or an open file): integer PCM of 8-32 bits or IEEE float, plain or WAVE_FORMAT_EXTENSIBLE.

    Scaling follows torchaudio.load: int16 / 2**15, int24 / 2**23, int32 / 2**31,
    and unsigned 8-bit (x - 128) / 128.
    """
    with opened(source) as f:
        wav = WavFile.open(f)
        if wav.num_frames * wav.channels > LIMITS.max_audio_samples:
            raise MediaError(f"{wav.name}: {wav.num_frames} frames of {wav.channels} channels are more than "
                             f"the {LIMITS.max_audio_samples} samples read at once; encoders read windows "
                             f"of it with audio_to_imagebind")
        return torch.from_numpy(wav.read()), wav.sample_rate


def write_wav(path, waveform, sample_rate: int, overwrite=False) -> Path:
    """Write (channels, n) or (n,) float samples in [-1, 1] as 16-bit PCM, atomically; values outside clip."""
    x = torch.as_tensor(waveform, dtype=torch.float32).detach().cpu()
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"waveform must be (n,) or (channels, n); got shape {tuple(x.shape)}")
    _check_finite(x, "waveform")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer; got {sample_rate}")
    pcm = (x * 32768.0).round().clamp(-32768, 32767).to(torch.int16).T.contiguous().numpy()
    with atomic_write(path, overwrite) as tmp, wave.open(str(tmp), "wb") as f:
        f.setnchannels(x.shape[0])
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.astype("<i2").tobytes())
    return Path(path)


def to_mono(waveform: torch.Tensor) -> torch.Tensor:
    """(channels, n) -> (1, n) by averaging the channels; (n,) -> (1, n)."""
    x = torch.as_tensor(waveform)
    if x.ndim == 1:
        return x[None]
    if x.ndim != 2 or x.shape[0] > x.shape[1]:
        raise ValueError(f"waveform must be (n,) or (channels, n) with fewer channels than samples; "
                         f"got shape {tuple(x.shape)} (transpose an (n, channels) array)")
    return x.mean(0, keepdim=True)


def load_audio(source, mono=True) -> tuple[torch.Tensor, int]:
    """(waveform (channels, n), sample_rate) from a whole WAV file, checked.

    mono=True mixes a stereo file down to (1, n), which is what every encoder here expects;
    mono=False keeps the channels for the caller to handle.
    """
    waveform, sr = read_wav(source)
    if waveform.shape[1] == 0:
        raise MediaError(f"{source}: the WAV file holds no samples (zero-length audio)")
    _check_finite(waveform, f"{source}")
    return (to_mono(waveform) if mono else waveform), sr


# ---------------------------------------------------------------- resampling

def resample(waveform, orig_sr: int, new_sr: int, width: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling along the last axis with a Hann-windowed sinc (polyphase).

    The rates are reduced by their gcd to orig -> new; output sample j of each block of `new`
    is a dot product of the input with a sinc low-passed at rolloff * min(orig, new) / 2 Hz,
    windowed over `width` zero crossings. This is the scheme torchaudio.functional.resample
    uses by default (sinc_interp_hann, width 6, rolloff 0.99), which ImageBind ran.
    """
    x = torch.as_tensor(waveform, dtype=torch.float32)
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"sample rates must be positive integers; got {orig_sr} -> {new_sr}")
    _check_finite(x, "waveform")
    if orig_sr == new_sr:
        return x.clone()
    orig, new, half = _polyphase(orig_sr, new_sr, width, rolloff)
    cutoff = min(orig, new) * rolloff  # in units where one input sample spacing is 1/orig
    # t[j, k]: distance (in cutoff periods) from output phase j to input tap k.
    taps = torch.arange(-half, half + orig, dtype=torch.float64) / orig
    t = (taps[None, :] - torch.arange(new, dtype=torch.float64)[:, None] / new) * cutoff
    t = t.clamp(-width, width)
    window = torch.cos(t * math.pi / (2 * width)) ** 2
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t))
    kernels = (sinc * window * cutoff / orig).to(x.dtype)[:, None, :]  # (new, 1, taps)

    shape, n = x.shape[:-1], x.shape[-1]
    flat = F.pad(x.reshape(-1, 1, n), (half, half + orig))
    y = F.conv1d(flat, kernels, stride=orig)  # (batch, new, blocks): phase j of block b
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)
    return y[:, : -(-new * n // orig)].reshape(*shape, -1)


MAX_KERNEL = 2 ** 22        # polyphase filter coefficients: rates with a small ratio, such as 44100 -> 16000


def _polyphase(orig_sr, new_sr, width, rolloff):
    """(orig, new, half): the rates reduced by their gcd and the kernel half-length in input samples."""
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"sample rates must be positive integers; got {orig_sr} -> {new_sr}")
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    half = math.ceil(width * orig / (min(orig, new) * rolloff))
    if new * (2 * half + orig) > MAX_KERNEL:
        raise MediaError(f"resampling {orig_sr} Hz to {new_sr} Hz (a ratio of {orig}:{new}) would need a filter "
                         f"of {new * (2 * half + orig)} coefficients; resample to a common rate (e.g. 44100 or "
                         f"48000 Hz) first")
    return orig, new, half


def resample_window(read, n, orig_sr: int, new_sr: int, start: int, stop: int, width=6, rolloff=0.99):
    """Samples start..stop of resample(x, orig_sr, new_sr), reading only the input they depend on:
    read(s, e) gives x[s:e] of the n input samples. Input sample blocks of `orig` map to output
    blocks of `new`, so a window that starts on a block boundary resamples exactly as the whole."""
    if orig_sr == new_sr or stop <= start:
        return read(start, stop) if stop > start else torch.zeros(0)
    orig, new, half = _polyphase(orig_sr, new_sr, width, rolloff)
    first, last = start // new, (stop - 1) // new               # output blocks
    s = max(0, (first * orig - half) // orig) * orig
    e = min(n, last * orig + half + orig)
    offset = s // orig * new
    return resample(read(s, e), orig_sr, new_sr, width, rolloff)[start - offset: stop - offset]


# ---------------------------------------------------------------- Kaldi fbank

def hz_to_mel(hz):
    """Kaldi's (HTK) mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * torch.expm1(torch.as_tensor(mel, dtype=torch.float64) / 1127.0)


def mel_filterbank(num_bins: int, n_fft: int, sample_rate: float, low_freq: float = 20.0,
                   high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters as a (num_bins, n_fft // 2 + 1) float64 matrix.

    Filter b rises linearly in mel from edge b to its centre b + 1 and falls to edge b + 2,
    the num_bins + 2 edges being equally spaced in mel between low_freq and high_freq
    (high_freq <= 0 means Nyquist + high_freq). FFT bin i sits at i * sample_rate / n_fft Hz.
    Kaldi uses bins 0 .. n_fft/2 - 1; the Nyquist column is kept (as zeros) so the matrix
    multiplies a full rfft power spectrum. Low filters may be empty (all zeros) when
    num_bins is large for the FFT size; Kaldi's torchaudio port allows that.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not (0 <= low_freq < high <= nyquist) or num_bins < 1 or n_fft < 2:
        raise ValueError(f"need num_bins >= 1, n_fft >= 2 and 0 <= low_freq < high_freq <= Nyquist "
                         f"({nyquist} Hz); got num_bins={num_bins}, n_fft={n_fft}, "
                         f"low_freq={low_freq}, high_freq={high_freq} (-> {high})")
    edges = torch.linspace(hz_to_mel(low_freq).item(), hz_to_mel(high).item(), num_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    mel = hz_to_mel(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)[None, :]
    rising, falling = (mel - left) / (centre - left), (right - mel) / (right - centre)
    bank = torch.minimum(rising, falling).clamp(min=0.0)
    return F.pad(bank, (0, 1))


def kaldi_fbank(waveform, sample_rate: int = 16000, num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Log mel filterbank energies (num_frames, num_mel_bins), as torchaudio.compliance.kaldi.fbank
    computes them with ImageBind's settings: Hanning window, dither 0, DC offset removed per frame,
    pre-emphasis 0.97, FFT padded to a power of two, power spectrum, no energy term, snip_edges
    (only whole frames), log floored at float32 epsilon. htk_compat only moves the energy term,
    which is off, so it changes nothing here.
    """
    x = torch.as_tensor(waveform)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"kaldi_fbank takes one channel, (n,) or (1, n); got shape {tuple(x.shape)}. "
                         f"Mix stereo down with to_mono first")
    _check_finite(x, "waveform")
    length = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if x.shape[0] < length:
        raise ValueError(f"audio of {x.shape[0]} samples is shorter than one {frame_length_ms} ms frame "
                         f"({length} samples at {sample_rate} Hz); expected a longer clip")
    n_fft = 1 << (length - 1).bit_length()
    frames = x.double().unfold(0, length, shift)  # (num_frames, length)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # first sample pre-emphasises itself
    frames = frames - 0.97 * previous
    frames = frames * torch.hann_window(length, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames, n=n_fft).abs() ** 2  # (num_frames, n_fft // 2 + 1)
    mel = power @ mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq).T
    return mel.clamp(min=torch.finfo(torch.float32).eps).log().float()


# ---------------------------------------------------------------- ImageBind clip sampling

def clip_timepoints(duration, clips: int, clip_seconds: float) -> list[tuple[Fraction, Fraction]]:
    """`clips` windows of clip_seconds, starts evenly spaced from 0 to duration - clip_seconds.

    pytorchvideo's ConstantClipsPerVideoSampler, with its arithmetic: the latest start is a
    float subtraction, the rest exact fractions. A recording shorter than one clip gives
    `clips` copies of (0, clip_seconds).
    """
    if clips < 1 or clip_seconds <= 0:
        raise ValueError(f"need clips >= 1 and clip_seconds > 0; got {clips}, {clip_seconds}")
    step = Fraction(max(float(duration) - clip_seconds, 0)) / max(clips - 1, 1)
    return [(step * i, step * i + Fraction(clip_seconds)) for i in range(clips)]


def waveform_to_imagebind_audio(waveform, sample_rate: int, clips: int = 3, clip_seconds: float = 2.0,
                                target_length: int = 204, num_mel_bins: int = 128) -> torch.Tensor:
    """ImageBind's audio input: (clips, 1, num_mel_bins, target_length).

    Mono mix-down (stereo is averaged, never passed on as 2 channels; ImageBind's torchaudio
    fbank silently used only the first channel), resample to 16 kHz, evenly spaced clips,
    per-clip mean removal, Kaldi fbank, transpose to (mel, frames), zero-pad or crop the
    frames to target_length, normalise with ImageBind's mean and std.
    ImageBind subtracts each clip's mean in place on a view of the whole waveform, so
    overlapping clips see earlier clips' means too; here every clip is centred on its own
    (the difference is a step of the size of the DC offset, normally ~1e-4).
    """
    x = to_mono(torch.as_tensor(waveform, dtype=torch.float32))[0]
    _check_finite(x, "waveform")
    return _imagebind_audio(lambda s, e: x[s:e], x.shape[0], sample_rate, clips, clip_seconds, target_length,
                            num_mel_bins)


def audio_to_imagebind(source, clips: int = 3, clip_seconds: float = 2.0, target_length: int = 204,
                       num_mel_bins: int = 128) -> torch.Tensor:
    """waveform_to_imagebind_audio of a WAV file (a path, a pipe or an open file), reading only
    the windows its clips use: an hour costs what a few seconds do."""
    with opened(source) as f:
        wav = WavFile.open(f)
        if wav.num_frames == 0:
            raise MediaError(f"{wav.name}: the WAV file holds no samples (zero-length audio)")

        def read(s, e):
            x = torch.from_numpy(wav.read(s, e)).mean(0)
            if x.numel():
                _check_finite(x, "its samples")
            return x
        try:
            return _imagebind_audio(read, wav.num_frames, wav.sample_rate, clips, clip_seconds, target_length,
                                    num_mel_bins)
        except MediaError:
            raise
        except ValueError as e:
            raise MediaError(f"{wav.name}: {e}") from None


def _imagebind_audio(read, n, sample_rate, clips, clip_seconds, target_length, num_mel_bins):
    sr = 16000
    orig, new, _ = _polyphase(sample_rate, sr, 6, 0.99)
    length = -(-new * n // orig)                    # samples after resampling
    mels = []
    for start, end in clip_timepoints(length / sr, clips, clip_seconds):
        piece = resample_window(read, n, sample_rate, sr, int(start * sr), min(int(end * sr), length))
        fbank = kaldi_fbank(piece - piece.mean(), sr, num_mel_bins).T  # (mel, frames)
        fbank = fbank[:, :target_length]
        mels.append(F.pad(fbank, (0, target_length - fbank.shape[1]))[None])
    return (torch.stack(mels) - IMAGEBIND_AUDIO_MEAN) / IMAGEBIND_AUDIO_STD


# ---------------------------------------------------------------- video

def _frames_from_array(arr) -> np.ndarray:
    arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"video frames must be (T, H, W, 3); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        # floats may overshoot [0, 1] by rounding (e.g. a VAE decode); anything further is an error
        if (not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all() or arr.size == 0
                or arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
            raise ValueError(f"video frames must be uint8, or float in [0, 1] without NaN; got {arr.dtype}")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if 0 in arr.shape:
        raise ValueError(f"video has no frames or zero-size frames: shape {arr.shape}")
    return arr


def open_video(source, fps=None) -> VideoSource:
    """A video from frames (T, H, W, 3) (uint8, or float in [0, 1]), a folder of images (sorted by
    name) or an animated GIF (a path, a pipe or an open file), checked against LIMITS.
    Frame timing: a number `fps`; else a GIF's own delays; else 8 fps (write_gif's default)."""
    if isinstance(source, VideoSource):
        return source
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number; got {fps}")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        frames = _frames_from_array(source)
        return timed_video("video", len(frames), fps, lambda picks: {i: frames[i] for i in picks})
    if not hasattr(source, "read") and Path(source).expanduser().is_dir():
        return _folder_video(Path(source).expanduser(), fps)
    with opened(source) as f:
        name, info = source_name(f), gif_info(f)
        data = f if f is source or isinstance(f, io.BytesIO) else Path(f.name)    # a file is reopened to decode
    return timed_video(name, len(info.delays_ms), fps, lambda picks: gif_frames(data, name, picks), info.delays_ms)


def _folder_video(path, fps) -> VideoSource:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"{path}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) > LIMITS.max_video_frames:
        raise MediaError(f"{path}: {len(files)} frames; the limit is {LIMITS.max_video_frames}")
    sizes = set()
    for p in files:
        with decoding(p, "image"), Image.open(p) as im:
            sizes.add(im.size)
    if len(sizes) > 1:
        raise MediaError(f"{path}: frames differ in size {sorted(sizes)}; expected one size")
    check_pixels(*sizes.pop(), path, frames=len(files))
    return timed_video(str(path), len(files), fps, lambda picks: {i: np.asarray(load_image(files[i])) for i in picks})


def video_or_still(source) -> tuple:
    """("video", the opened video, None), or ("image", its frame, a notice) for a video of one frame."""
    video = open_video(source)
    if video.num_frames > 1:
        return "video", video, None
    return "image", video.read([0])[0], f"{video.name} holds a single frame, so it was read as an image, not a video"


def load_video(source, fps=None) -> np.ndarray:
    """uint8 frames (T, H, W, 3) of anything open_video takes, all decoded (within LIMITS)."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _frames_from_array(source)
    video = open_video(source, fps)
    frames = video.read(range(video.num_frames))
    return np.stack([frames[i] for i in range(video.num_frames)])


def write_gif(path, frames, fps: float = 8, overwrite=False) -> Path:
    """Save frames (T, H, W, 3) as a looping GIF, atomically. GIF stores 256 colours per frame
    and delays in hundredths of a second (so 8 fps is stored as 120 ms), and Pillow merges
    identical consecutive frames, so reading back may differ slightly."""
    if not 0 < fps <= 50:
        raise ValueError(f"fps must be in (0, 50] (GIF delays under 20 ms play slower); got {fps}")
    images = [Image.fromarray(f, "RGB") for f in load_video(frames)]
    with atomic_write(path, overwrite) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
    return Path(path)


def _short_side_scale(video: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo ShortSideScale: bilinear, no antialiasing, long side floored."""
    h, w = video.shape[-2:]
    new = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
    return F.interpolate(video, size=new, mode="bilinear", align_corners=False)


def _spatial_crop(video: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """SpatialCrop's uniform_crop: index 0/1/2 = left/centre/right for a wide frame,
    top/centre/bottom for a tall one (centre offsets round up)."""
    h, w = video.shape[-2:]
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if index != 1:
        if h > w:
            y = 0 if index == 0 else h - size
        else:
            x = 0 if index == 0 else w - size
    return video[..., y: y + size, x: x + size]


def video_to_imagebind_clips(frames, clips: int = 5, frames_per_clip: int = 2, size: int = 224, crops: int = 3,
                             fps: float | None = None, clip_seconds: float = 2.0, mean=CLIP_MEAN,
                             std=CLIP_STD) -> torch.Tensor:
    """ImageBind's video input: (clips * crops, 3, frames_per_clip, size, size).

    `frames` is anything open_video takes, and `fps` sets its timing as there (a GIF's own
    delays by default). Clips are placed like the audio ones; a clip holds the frames that
    start at start <= t < end (the decord reader's rule), subsampled to frames_per_clip evenly
    spaced indices (truncated, as UniformTemporalSubsample does). Only those frames are
    decoded. Order: clip-major, then crop.
    """
    if crops not in (1, 3):
        raise ValueError(f"crops must be 1 (centre) or 3 (SpatialCrop's three); got {crops}")
    if frames_per_clip < 1 or size < 1:
        raise ValueError(f"need frames_per_clip >= 1 and size >= 1; got {frames_per_clip}, {size}")
    video = open_video(frames, fps)
    plan = []
    for start, end in clip_timepoints(video.duration, clips, clip_seconds):
        first, stop = bisect_left(video.times, start), bisect_left(video.times, end)
        if stop <= first:
            raise ValueError(f"the clip {float(start):.2f}-{float(end):.2f} s holds no frames "
                             f"({video.num_frames} frames in {video.duration:.2f} s); expected a longer video")
        plan.append((first + torch.linspace(0, stop - 1 - first, frames_per_clip).long()).tolist())
    picked = video.read(sorted({i for picks in plan for i in picks}))
    norm_mean, norm_std = torch.tensor(mean).view(3, 1, 1, 1), torch.tensor(std).view(3, 1, 1, 1)
    out = []
    for picks in plan:
        clip = torch.from_numpy(np.stack([picked[i] for i in picks])).permute(3, 0, 1, 2).float() / 255.0
        clip = (_short_side_scale(clip, size) - norm_mean) / norm_std     # (3, T, size, ...)
        out += [_spatial_crop(clip, size, i) for i in ([0, 1, 2] if crops == 3 else [1])]
    return torch.stack(out)


# ---------------------------------------------------------------- thermal, depth and IMU (ImageBind)

def thermal_to_imagebind(img, size=224) -> torch.Tensor:
    """A thermal image (path, PIL image or uint8 array) -> (1, size, size) grey levels in [0, 1]:
    shortest side to `size` (bicubic), centre crop, no normalisation."""
    grey = (_as_pil(img) if isinstance(img, (np.ndarray, torch.Tensor)) else load_image(img)).convert("L")
    pil = center_crop(resize_short_side(grey, size), size)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]


def depth_to_disparity(depth_m, focal_length: float, baseline: float = 0.075, min_depth: float = 0.01,
                       max_depth: float = 50.0) -> torch.Tensor:
    """Metric depth (H, W) in metres -> disparity baseline * focal_length / depth, the scale-free
    form ImageBind's depth branch was trained on. focal_length in pixels; baseline in metres
    (0.075 for Kinect, 0.095 for RealSense and Xtion in SUN RGB-D)."""
    depth = torch.as_tensor(np.asarray(depth_m, dtype=np.float32))
    if depth.dim() != 2:
        raise ValueError(f"depth must be one map (H, W) in metres; got shape {tuple(depth.shape)}")
    _check_finite(depth, "depth")
    if focal_length <= 0 or baseline <= 0:
        raise ValueError(f"focal_length and baseline must be positive; got {focal_length}, {baseline}")
    return baseline * focal_length / depth.clamp(min_depth, max_depth)


def depth_to_imagebind(disparity, size=224) -> torch.Tensor:
    """A disparity map (H, W) -> (1, size, size): shortest side to `size` (bicubic), centre crop."""
    x = np.asarray(disparity.detach().cpu() if torch.is_tensor(disparity) else disparity, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"a disparity map must be (H, W); got shape {x.shape}")
    _check_finite(torch.from_numpy(x), "disparity")
    pil = center_crop(resize_short_side(Image.fromarray(x), size), size)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32).copy())[None]


def imu_to_imagebind(readings, length=2000) -> torch.Tensor:
    """IMU readings (6, T): accelerometer x, y, z then gyroscope x, y, z, one column per time
    step -> (6, length), the first `length` steps, zero-padded at the end if shorter."""
    x = torch.as_tensor(np.asarray(readings, dtype=np.float32))
    if x.dim() != 2 or x.shape[0] != 6:
        hint = "; transpose it" if x.dim() == 2 and x.shape[1] == 6 else ""
        raise ValueError(f"IMU readings must be (6, T): 3 accelerometer and 3 gyroscope channels; "
                         f"got shape {tuple(x.shape)}{hint}")
    _check_finite(x, "IMU readings")
    return F.pad(x[:, :length], (0, max(0, length - x.shape[1])))
