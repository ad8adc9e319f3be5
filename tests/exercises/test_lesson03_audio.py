import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from conftest import check

LESSON = "lesson03_audio"


def test_hz_to_mel_is_the_htk_scale(ex):
    f = torch.tensor([0.0, 20.0, 700.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    want = 2595.0 * torch.log10(1 + f / 700.0)  # HTK's spelling of the same curve
    assert_close(ex.hz_to_mel(f), want, atol=0.05, rtol=0)  # 2595 is 1127 * ln(10), rounded
    assert ex.hz_to_mel(700.0).dtype == torch.float64
    assert abs(ex.hz_to_mel(700.0).item() - 1127.0 * math.log(2.0)) < 1e-9


def test_mel_to_hz_inverts_hz_to_mel(ex):
    f = torch.linspace(0, 24000, 97, dtype=torch.float64)
    assert_close(ex.mel_to_hz(ex.hz_to_mel(f)), f, atol=1e-7, rtol=0)
    assert abs(ex.mel_to_hz(1127.0 * math.log(2.0)).item() - 700.0) < 1e-9


def kaldi_banks(num_bins, n_fft, sample_rate, low_freq, high_freq):
    """mel-computations.cc, written as loops."""
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    high = high_freq if high_freq > 0 else sample_rate / 2 + high_freq
    lo, delta = mel(low_freq), (mel(high) - mel(low_freq)) / (num_bins + 1)
    banks = np.zeros((num_bins, n_fft // 2 + 1))
    for b in range(num_bins):
        left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        for i in range(n_fft // 2):
            m = mel(i * sample_rate / n_fft)
            if left < m < right:
                banks[b, i] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    return torch.from_numpy(banks)


@pytest.mark.parametrize("num_bins, n_fft, sample_rate, low, high", [
    (128, 512, 16000, 20.0, 0.0),  # ImageBind's setting (some low filters come out empty)
    (80, 512, 16000, 20.0, 0.0),
    (23, 256, 8000, 64.0, -400.0),
    (10, 1024, 44100, 0.0, 8000.0),
])
def test_mel_filterbank_matches_kaldi(ex, num_bins, n_fft, sample_rate, low, high):
    got = ex.mel_filterbank(num_bins, n_fft, sample_rate, low, high)
    assert got.dtype == torch.float64, f"expected float64 filters, got {got.dtype}"
    want = kaldi_banks(num_bins, n_fft, sample_rate, low, high)
    check(got, want, f"{num_bins} filters for n_fft={n_fft} at {sample_rate} Hz vs Kaldi's loops", atol=1e-9, rtol=0,
          wrong=[("the filters are spaced evenly in Hz; Kaldi spaces their edges evenly in mel",
                  hz_spaced(num_bins, n_fft, sample_rate, low, high))])


def hz_spaced(num_bins, n_fft, sample_rate, low, high):
    high = high if high > 0 else sample_rate / 2 + high
    edges = torch.linspace(low, high, num_bins + 2, dtype=torch.float64)
    f = torch.arange(n_fft // 2, dtype=torch.float64)[None] * sample_rate / n_fft
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = torch.minimum((f - left) / (centre - left), (right - f) / (right - centre)).clamp(min=0)
    return torch.nn.functional.pad(bank, (0, 1))


def kaldi_native(x, num_bins=40):
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = num_bins
    opts.use_energy = False
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, x.tolist())
    fbank.input_finished()
    return torch.tensor(np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]), dtype=torch.float64)


def test_log_mel_features_equal_kaldi_native_fbank(ex):
    g = torch.Generator().manual_seed(1)
    t = torch.arange(12000) / 16000
    x = 0.4 * torch.sin(2 * math.pi * (300 + 400 * t) * t) + 0.02 * torch.randn(12000, generator=g)
    want = kaldi_native(x, 64)
    got = ex.log_mel_features(x, 16000, 64)
    check(got, want, "log_mel_features of a 0.75 s sweep vs kaldi-native-fbank (64 bins)", atol=2e-3, rtol=0)


def test_mel_filterbank_reproduces_kaldi_native_fbank(ex):
    """Your filters, with the rest of Kaldi's frame pipeline, give kaldi-native-fbank's features."""
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.sin(torch.arange(8000) * 0.07) + 0.05 * torch.randn(8000, generator=g)
    want = kaldi_native(x, 40)
    frames = x.double().unfold(0, 400, 160)
    frames = frames - frames.mean(1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], 1)
    frames = frames * torch.hann_window(400, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames, n=512).abs() ** 2
    got = (power @ ex.mel_filterbank(40, 512, 16000).T).clamp(min=1.1920929e-07).log()
    check(got, want, "Kaldi's pipeline with your filters vs kaldi-native-fbank", atol=1e-3, rtol=0)


def test_mel_filterbank_rejects_bad_frequencies(ex):
    with pytest.raises(ValueError):
        ex.mel_filterbank(10, 512, 16000, low_freq=9000.0)
    with pytest.raises(ValueError):
        ex.mel_filterbank(10, 512, 16000, low_freq=100.0, high_freq=50.0)
