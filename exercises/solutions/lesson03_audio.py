"""Lesson 3 solutions (audio), written out. minignext/media.py has the same (`hz_to_mel`,
`mel_to_hz`, `mel_filterbank`, and `kaldi_fbank`, which also checks its input and rounds the
frame sizes for any sample rate)."""

import torch
import torch.nn.functional as F


def hz_to_mel(hz):
    return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)   # log1p: exact near 0 Hz


def mel_to_hz(mel):
    return 700.0 * torch.expm1(torch.as_tensor(mel, dtype=torch.float64) / 1127.0)


def mel_filterbank(num_bins, n_fft, sample_rate, low_freq=20.0, high_freq=0.0):
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist} Hz, got {low_freq} and {high}")
    edges = torch.linspace(hz_to_mel(low_freq).item(), hz_to_mel(high).item(), num_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]     # one row per filter
    mel = hz_to_mel(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)[None, :]
    # each triangle is the lower of its rising and its falling line, never negative
    bank = torch.minimum((mel - left) / (centre - left), (right - mel) / (right - centre)).clamp(min=0.0)
    return F.pad(bank, (0, 1))            # the Nyquist bin, which Kaldi leaves out


def log_mel_features(wave, sample_rate, num_mel_bins):
    length, shift = sample_rate * 25 // 1000, sample_rate * 10 // 1000
    n_fft = 1 << (length - 1).bit_length()                  # 400 samples -> 512
    frames = wave.double().unfold(0, length, shift)         # (num_frames, length), whole frames only
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(length, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(frames, n=n_fft).abs() ** 2
    mel = power @ mel_filterbank(num_mel_bins, n_fft, sample_rate).T
    return mel.clamp(min=torch.finfo(torch.float32).eps).log()
