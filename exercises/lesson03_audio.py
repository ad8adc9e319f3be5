"""Lesson 3 exercises: the mel filterbank behind ImageBind's audio input, then the whole features.

ImageBind hears a 2-s clip as a 128 x 204 log-mel image. The power spectrum of each 25-ms frame
has 257 FFT bins; the mel filterbank pools them into 128 bands that are narrow at low and wide at
high frequencies, like the ear.

Solve these before you read minignext/media.py; then compare. Each function raises
NotImplementedError with a first hint; more hints, each closer to code, are in HINTS at the
bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson03_audio.py --exercises=mine
"""

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def hz_to_mel(hz):
    """Kaldi's (HTK) mel scale, mel = 1127 ln(1 + f / 700), for a float or tensor of frequencies in
    Hz; return float64."""
    raise _stuck("hz_to_mel")


def mel_to_hz(mel):
    """The inverse of hz_to_mel; return float64."""
    raise _stuck("mel_to_hz")


def mel_filterbank(num_bins, n_fft, sample_rate, low_freq=20.0, high_freq=0.0):
    """Kaldi's triangular mel filters: a float64 tensor (num_bins, n_fft // 2 + 1).

    high_freq <= 0 means Nyquist + high_freq (so 0 is Nyquist). Take num_bins + 2 edges equally
    spaced in mel from hz_to_mel(low_freq) to hz_to_mel(high). Filter b has left edge b, centre
    b + 1 and right edge b + 2; its weight for FFT bin i (at i * sample_rate / n_fft Hz, for
    i < n_fft // 2) rises linearly in mel from 0 at the left edge to 1 at the centre and falls
    back to 0 at the right edge; 0 outside. The last column (the Nyquist bin) is all zeros.
    Raise ValueError unless 0 <= low_freq < high <= Nyquist."""
    raise _stuck("mel_filterbank")


def log_mel_features(wave, sample_rate, num_mel_bins):
    """Kaldi's log mel filterbank features of a mono float waveform (N,), with your mel_filterbank:
    a float64 tensor (num_frames, num_mel_bins). Settings (ImageBind's): frames of 25 ms every 10 ms
    (whole frames only); per frame, remove the mean, pre-emphasise (x[t] - 0.97 x[t-1], the first
    sample using itself as x[-1]), multiply by a symmetric Hann window; FFT size: the next power of
    two of the frame length; power spectrum; mel filters from 20 Hz to Nyquist; natural log with a
    floor of float32's epsilon (1.1920929e-07)."""
    raise _stuck("log_mel_features")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "hz_to_mel": [
        "The formula is in the docstring; the work is in doing it precisely: accept a number or a "
        "tensor, compute in double precision, and keep accuracy for small frequencies.",
        "Turn the input into a float64 tensor first. For ln(1 + y) with small y, torch has a "
        "function that does not lose digits (log1p).",
        "return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)",
    ],
    "mel_to_hz": [
        "Solve the mel formula for the frequency: undo the scale, undo the logarithm, undo the "
        "shift by one, undo the division by 700.",
        "f = 700 (e^(mel / 1127) - 1). For e^y - 1 with small y there is expm1, the twin of log1p.",
        "return 700.0 * torch.expm1(torch.as_tensor(mel, dtype=torch.float64) / 1127.0)",
    ],
    "mel_filterbank": [
        "Work in mel, where the filters are evenly spaced triangles. For every filter and every "
        "FFT bin, the weight is the lower of two straight lines: the rising edge (0 at the left "
        "edge, 1 at the centre) and the falling edge (1 at the centre, 0 at the right edge), never "
        "below zero.",
        "Make num_bins + 2 edges with linspace in mel. Filter b uses edges b, b + 1, b + 2: three "
        "column vectors of num_bins rows. The bins' mel values form a row vector over i < "
        "n_fft // 2, so broadcasting gives (num_bins, n_fft // 2) matrices for both lines. Take the "
        "minimum, clamp at 0, and add one zero column for the Nyquist bin.",
        "edges = torch.linspace(hz_to_mel(low_freq).item(), hz_to_mel(high).item(), num_bins + 2, "
        "dtype=torch.float64); left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]; "
        "m = hz_to_mel(torch.arange(n_fft // 2) * sample_rate / n_fft)[None]; w = torch.minimum((m - left) "
        "/ (centre - left), (right - m) / (right - centre)).clamp(min=0); return F.pad(w, (0, 1))",
    ],
    "log_mel_features": [
        "Cut the waveform into overlapping frames, clean and window each frame, measure how much "
        "energy each frequency has (the squared magnitude of its Fourier transform), pool the "
        "frequencies into mel bands with your filterbank, and take the logarithm.",
        "25 ms and 10 ms are 400 and 160 samples at 16 kHz; Tensor.unfold(0, size, step) cuts the "
        "frames. Pre-emphasis subtracts 0.97 times the frame shifted right by one sample (the first "
        "sample repeated in front). The window is torch.hann_window(400, periodic=False). "
        "torch.fft.rfft with n=512 gives 257 bins; multiply the power spectrum by the transposed "
        "filterbank.",
        "frames = wave.double().unfold(0, L, S); frames = frames - frames.mean(1, keepdim=True); frames "
        "= frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], 1); frames = frames * "
        "torch.hann_window(L, periodic=False, dtype=torch.float64); power = torch.fft.rfft(frames, "
        "n=n_fft).abs() ** 2; return (power @ mel_filterbank(num_mel_bins, n_fft, sample_rate).T)"
        ".clamp(min=1.1920929e-07).log()",
    ],
}
