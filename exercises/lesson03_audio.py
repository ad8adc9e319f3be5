"""Lesson 3 exercises: the mel filterbank behind ImageBind's audio input.

ImageBind hears a 2-s clip as a 128 x 204 log-mel image (minignext.media.kaldi_fbank). The
power spectrum of each 25-ms frame has 257 FFT bins; the mel filterbank pools them into
128 bands that are narrow at low and wide at high frequencies, like the ear.

Check your work:  python -m pytest tests/exercises/test_lesson03_audio.py --exercises=mine
"""

import torch


def hz_to_mel(hz):
    """Kaldi's (HTK) mel scale for a float or tensor of frequencies in Hz; return float64."""
    raise NotImplementedError(
        "mel = 1127 * ln(1 + f / 700). Convert with torch.as_tensor(hz, dtype=torch.float64) and use "
        "torch.log1p(f / 700) for accuracy near 0 Hz.")


def mel_to_hz(mel):
    """The inverse of hz_to_mel; return float64."""
    raise NotImplementedError(
        "Solve mel = 1127 * ln(1 + f / 700) for f: f = 700 * (exp(mel / 1127) - 1), i.e. "
        "700 * torch.expm1(mel / 1127) on a float64 tensor.")


def mel_filterbank(num_bins, n_fft, sample_rate, low_freq=20.0, high_freq=0.0):
    """Kaldi's triangular mel filters: a float64 tensor (num_bins, n_fft // 2 + 1).

    high_freq <= 0 means Nyquist + high_freq (so 0 is Nyquist). Take num_bins + 2 edges equally
    spaced in mel from hz_to_mel(low_freq) to hz_to_mel(high). Filter b has left edge b, centre
    b + 1 and right edge b + 2; its weight for FFT bin i (at i * sample_rate / n_fft Hz, for
    i < n_fft // 2) rises linearly in mel from 0 at the left edge to 1 at the centre and falls
    back to 0 at the right edge; 0 outside. The last column (the Nyquist bin) is all zeros.
    Raise ValueError unless 0 <= low_freq < high <= Nyquist."""
    raise NotImplementedError(
        "edges = torch.linspace(mel_low, mel_high, num_bins + 2); left, centre, right = edges[:-2, None], "
        "edges[1:-1, None], edges[2:, None]; m = hz_to_mel(torch.arange(n_fft // 2) * sample_rate / n_fft); "
        "weights = min((m - left) / (centre - left), (right - m) / (right - centre)) clamped at 0; "
        "finally pad one zero column on the right (F.pad(w, (0, 1))).")
