"""Media inputs at a bounded cost: limits read from headers, windowed audio, sampled video frames,
pipes that never block, the valid files that used to be refused, and a fuzz of every format."""

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minignext import media
from minignext.media import MediaError

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_media import bomb_png, gif_bytes, tone, wav_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    with pytest.raises(MediaError, match=r"bomb\.png: too many pixels \(Image size \(400000000 pixels\)"):
        media.load_image(path)
    assert time.perf_counter() - start < 1.0


def test_a_gif_of_many_huge_frames_is_refused_before_decoding(tmp_path):
    path = tmp_path / "frames.gif"
    path.write_bytes(gif_bytes(3000, 401))
    assert Image.open(path).n_frames == 401             # a GIF Pillow would decode, frame after frame
    for read in (media.load_video, media.video_to_imagebind_clips):
        with pytest.raises(MediaError, match=r"frames\.gif: 401 frames of 3000x3000 pixels; the limit"):
            read(path)


def test_wav_headers_over_the_limits_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(media.LIMITS, "max_audio_seconds", 1.5)
    cases = {"1 Hz": (wav_bytes(np.zeros(16000, np.int16), 1), "sample rate of 1 Hz"),
             "long": (wav_bytes(np.zeros(32000, np.int16), 16000), "2 s of audio; the limit is 1.5 s"),
             "64 channels": (wav_bytes(np.zeros(64 * 10, np.int16), 16000, channels=64), "64 channels")}
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.wav"
        path.write_bytes(data)
        with pytest.raises(MediaError, match=message):
            media.audio_to_imagebind(path)
    with pytest.raises(MediaError, match="44101:16000"):      # a polyphase filter of gigabytes
        media.resample(torch.zeros(100), 44101, 16000)


def test_long_audio_reads_only_the_clips_and_matches_the_whole_waveform(tmp_path):
    """The windows are resampled exactly as the whole file would be, so ImageBind's input is the
    same as resampling everything first (the reference's way), at the cost of 6 s of audio."""
    rate = 44100
    x = tone(12, rate, 330) + tone(12, rate, 2750)
    (tmp_path / "long.wav").write_bytes(wav_bytes(x, rate))
    windowed = media.audio_to_imagebind(tmp_path / "long.wav")
    whole = media.resample(torch.from_numpy(x / 32768.0).float(), rate, 16000)
    mels = []
    for start, end in media.clip_timepoints(whole.shape[0] / 16000, 3, 2.0):
        piece = whole[int(start * 16000): int(end * 16000)]
        fbank = media.kaldi_fbank(piece - piece.mean(), 16000, 128).T[:, :204]
        mels.append(torch.nn.functional.pad(fbank, (0, 204 - fbank.shape[1]))[None])
    reference = (torch.stack(mels) - media.IMAGEBIND_AUDIO_MEAN) / media.IMAGEBIND_AUDIO_STD
    torch.testing.assert_close(windowed, reference, atol=1e-4, rtol=0)


def test_extensible_and_float_wavs_read_like_plain_pcm(tmp_path):
    x = tone(0.3, 16000)
    for name, data in (("plain", wav_bytes(x, 16000)), ("extensible", wav_bytes(x, 16000, extensible=True)),
                       ("float", wav_bytes(x / 32768.0, 16000, float32=True, extensible=True))):
        (tmp_path / f"{name}.wav").write_bytes(data)
    plain, sr = media.read_wav(tmp_path / "plain.wav")
    assert sr == 16000 and plain.shape == (1, 4800)
    torch.testing.assert_close(media.read_wav(tmp_path / "extensible.wav")[0], plain)
    torch.testing.assert_close(media.read_wav(tmp_path / "float.wav")[0], plain)


def test_a_16_bit_png_is_read_as_8_bit(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = media.load_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and img.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.round(ramp / 257).astype(np.uint8))


def test_pipes_are_read_and_a_fifo_without_writer_does_not_block(tmp_path, monkeypatch):
    data = wav_bytes(tone(0.5, 16000), 16000)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        wave, sr = media.load_audio(f"/dev/fd/{r}")              # what the shell's <(cat x.wav) passes
    finally:
        writer.join()
        os.close(r)
    assert sr == 16000 and wave.shape == (1, 8000)
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setattr(media.LIMITS, "pipe_timeout", 0.3)
    start = time.perf_counter()
    with pytest.raises(MediaError, match="fifo: the pipe gave no data for 0.3 s"):
        media.load_image(tmp_path / "fifo")
    assert time.perf_counter() - start < 2
    with pytest.raises(MediaError, match="device"):
        media.load_image("/dev/zero")


def index_frames(t, side=8):
    """Frame k is a flat grey of 5k, so which frames were picked can be read back."""
    return np.repeat((np.arange(t, dtype=np.uint8) * 5)[:, None, None, None], side * side * 3).reshape(t, side, side, 3)


def test_gif_timing_is_honoured(tmp_path):
    frames = index_frames(12)
    Image.fromarray(frames[0]).save(tmp_path / "slow.gif", save_all=True, loop=0, duration=500,
                                    append_images=[Image.fromarray(f) for f in frames[1:]])
    assert media.open_video(tmp_path / "slow.gif").duration == 6.0           # 12 frames of 0.5 s, not 1.5 s at 8 fps
    from_file = media.video_to_imagebind_clips(tmp_path / "slow.gif", size=8, crops=1)
    torch.testing.assert_close(from_file, media.video_to_imagebind_clips(frames, size=8, crops=1, fps=2))
    assert not torch.allclose(from_file, media.video_to_imagebind_clips(frames, size=8, crops=1, fps=8))
    uneven = [100, 100, 1000, 0, 100, 100]      # 0 plays as 100 ms, as browsers show it
    Image.fromarray(frames[0]).save(tmp_path / "uneven.gif", save_all=True, loop=0, duration=uneven,
                                    append_images=[Image.fromarray(f) for f in frames[1:6]])
    video = media.open_video(tmp_path / "uneven.gif")
    assert [float(t) for t in video.times] == [0, 0.1, 0.2, 1.2, 1.3, 1.4] and video.duration == 1.5


def test_only_the_sampled_frames_are_decoded(tmp_path, monkeypatch):
    media.write_gif(tmp_path / "v.gif", index_frames(40), fps=8)
    read, original = [], media.gif_frames

    def counting(data, name, picks):
        read.append(list(picks))
        return original(data, name, picks)
    monkeypatch.setattr(media, "gif_frames", counting)
    media.video_to_imagebind_clips(tmp_path / "v.gif", size=8, crops=1)
    assert len(read) == 1 and len(read[0]) == 10          # 5 clips x 2 frames, not 40


def capped_run(argv, cap_bytes, timeout=120):
    """Run argv in a fresh process whose address space is capped at cap_bytes (RLIMIT_AS)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MINIGNEXT_PROGRESS": "0"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=cap, env=env, cwd=ROOT)
    return r


FUZZ_CAP = 2 ** 30


def test_fuzz_every_format_ends_in_a_clear_error_or_a_result(tmp_path):
    """210 corrupted files per format (truncated, bit-flipped, header bytes and length fields
    overwritten, spans deleted or repeated), read in a fresh process capped at 1 GB of address
    space and a time limit: each one is a clear error naming the file or a finite result."""
    r = capped_run([sys.executable, str(ROOT / "tests" / "fixtures_media.py"), str(tmp_path), "210"], FUZZ_CAP)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    print("fuzz:", report)
    for fmt, tally in report["counts"].items():
        assert sum(tally.values()) == 210 and set(tally) <= {"ok", "error"}, (fmt, tally, r.stderr[-2000:])
        assert tally.get("error", 0) > 0, fmt
    assert report["slowest_s"] < 5
