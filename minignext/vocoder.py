"""Vocoders: mel spectrogram -> waveform. HiFi-GAN, trained, as AudioLDM uses it; Griffin-Lim, with no
weights, for the toy audio decoder.

Kong, Kim and Bae, "HiFi-GAN: Generative Adversarial Networks for Efficient and
High Fidelity Speech Synthesis" (NeurIPS 2020, arXiv 2010.05646). Only the
generator (section 2.1, Figure 1) is needed at inference. AudioLDM decodes its
mel spectrograms with it, stored in the layout of transformers'
`SpeechT5HifiGan` (conv_pre, upsampler.N, resblocks.N.convs1/convs2,
conv_post, mean, scale), with the weight norm already folded into the weights.

The generator upsamples the mel frames with transposed convolutions until one
frame becomes prod(upsample_rates) samples. After each upsampling a
multi-receptive-field fusion (MRF) averages |resblock_kernel_sizes| residual
blocks, each a stack of dilated convolutions with a different kernel size, so
the output sees both short and long periodic patterns.

GriffinLim (Griffin & Lim 1984) inverts a log-mel with no training; load_vocoder in
minignext.diffusion picks it when an AudioLDM folder's vocoder/config.json names it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import weights
from .media import mel_filterbank
from .utils import config_from_dict


@dataclass
class HifiGanConfig:
    """Defaults are transformers' SpeechT5HifiGanConfig defaults; `tiny()` for tests."""
    model_in_dim: int = 80                          # mel bins per frame
    sampling_rate: int = 16000                      # of the output waveform
    upsample_initial_channel: int = 512             # channels after conv_pre; halved at each upsampling
    upsample_rates: tuple = (4, 4, 4, 4)            # their product = samples per mel frame
    upsample_kernel_sizes: tuple = (8, 8, 8, 8)
    resblock_kernel_sizes: tuple = (3, 7, 11)       # one residual block per kernel size (the MRF)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1
    normalize_before: bool = True                   # standardise the mel with the `mean`/`scale` buffers

    def __post_init__(self):
        self.upsample_rates = tuple(self.upsample_rates)
        self.upsample_kernel_sizes = tuple(self.upsample_kernel_sizes)
        self.resblock_kernel_sizes = tuple(self.resblock_kernel_sizes)
        self.resblock_dilation_sizes = tuple(tuple(d) for d in self.resblock_dilation_sizes)
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError(f"upsample_rates {self.upsample_rates} and upsample_kernel_sizes "
                             f"{self.upsample_kernel_sizes} must have the same length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError(f"resblock_kernel_sizes {self.resblock_kernel_sizes} and resblock_dilation_sizes "
                             f"{self.resblock_dilation_sizes} must have the same length")
        self.hop_length = math.prod(self.upsample_rates)

    @classmethod
    def from_hf(cls, d: dict) -> "HifiGanConfig":
        return config_from_dict(cls, d)

    @classmethod
    def tiny(cls, **overrides) -> "HifiGanConfig":
        return cls(**{**dict(model_in_dim=16, upsample_initial_channel=32, upsample_rates=(4, 4),
                             upsample_kernel_sizes=(8, 8), resblock_kernel_sizes=(3, 5),
                             resblock_dilation_sizes=((1, 3), (1, 3)), normalize_before=False), **overrides})


class ResBlock(nn.Module):
    """One branch of the MRF: for each dilation d, x += conv2(lrelu(conv1_d(lrelu(x)))).
    Padding keeps the length, so the branches can be summed."""

    def __init__(self, channels, kernel_size=3, dilations=(1, 3, 5), slope=0.1):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=d * (kernel_size - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)

    def forward(self, x):
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, self.slope)), self.slope))
        return x


def mrf(x, branches):
    """Multi-receptive-field fusion: the mean of the branches, all applied to the same input."""
    return sum(branch(x) for branch in branches) / len(branches)


class HifiGan(nn.Module):
    def __init__(self, config: HifiGanConfig):
        super().__init__()
        self.config = c = config
        ch = c.upsample_initial_channel
        self.conv_pre = nn.Conv1d(c.model_in_dim, ch, 7, padding=3)
        self.upsampler = nn.ModuleList(
            nn.ConvTranspose1d(ch // 2 ** i, ch // 2 ** (i + 1), k, stride=r, padding=(k - r) // 2)
            for i, (r, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock(ch // 2 ** (i + 1), k, d, c.leaky_relu_slope)
            for i in range(len(c.upsample_rates))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(ch // 2 ** len(c.upsample_rates), 1, 7, padding=3)
        # Per-bin statistics of the training mels; persistent, so they load with the weights.
        self.register_buffer("mean", torch.zeros(c.model_in_dim))
        self.register_buffer("scale", torch.ones(c.model_in_dim))

    def forward(self, mel):
        """mel (B, frames, model_in_dim) -> waveform (B, frames * hop_length); unbatched
        (frames, model_in_dim) -> (frames * hop_length,)."""
        c = self.config
        if mel.dim() not in (2, 3) or mel.shape[-1] != c.model_in_dim:
            raise ValueError(f"HifiGan expects a mel spectrogram of shape (batch, frames, {c.model_in_dim}) "
                             f"or (frames, {c.model_in_dim}); got {tuple(mel.shape)}")
        if c.normalize_before:
            mel = (mel - self.mean) / self.scale
        unbatched = mel.dim() == 2
        x = self.conv_pre((mel.unsqueeze(0) if unbatched else mel).transpose(1, 2))   # (B, channels, frames)
        n = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.upsampler):
            x = up(F.leaky_relu(x, c.leaky_relu_slope))
            x = mrf(x, self.resblocks[i * n:(i + 1) * n])
        # The reference uses leaky_relu's default slope (0.01) here, not the config's.
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))                     # (B, 1, samples)
        return x[0, 0] if unbatched else x[:, 0]

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "HifiGan":
        folder = weights.resolve(path)
        return cls.from_checkpoint(weights.read_config(folder), weights.load_checkpoint(folder), dtype, device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict, dtype=None, device=None) -> "HifiGan":
        """A published config.json dict and the tensors as its file stores them -> the model."""
        return weights.load_model(cls, HifiGanConfig.from_hf(config), tensors, dtype=dtype, device=device)


# ---------------------------------------------------------------- Griffin-Lim: no weights

@dataclass
class GriffinLimConfig:
    model_in_dim: int = 32          # mel bins per frame
    sampling_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 250           # samples per mel frame
    f_min: float = 0.0              # the mel bands' range (HTK scale, minignext.media.mel_filterbank)
    f_max: float = 2000.0
    n_iter: int = 16

    @classmethod
    def from_hf(cls, d: dict) -> "GriffinLimConfig":
        return config_from_dict(cls, d)


class GriffinLim(nn.Module):
    """A vocoder without weights, for log-mels (natural log of the |STFT| mel bands): the magnitude comes
    back through the pseudo-inverse of the filterbank, the phase from Griffin & Lim 1984 ("Signal
    estimation from modified short-time Fourier transform"): `n_iter` rounds of keeping the magnitude
    and taking the phase of the STFT of the inverse STFT. Used where no trained HiFi-GAN is good enough
    (the toy audio decoder, minignext/toy/train_audio_decoder.py). Deterministic: the starting phase is
    seeded noise (zero phase locks steady tones into a buzz)."""

    def __init__(self, config: GriffinLimConfig):
        super().__init__()
        self.config = c = config
        bank = mel_filterbank(c.model_in_dim, c.n_fft, c.sampling_rate, low_freq=c.f_min, high_freq=c.f_max)
        self.register_buffer("inverse_bank", torch.linalg.pinv(bank).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)

    def forward(self, mel):
        """mel (B, frames, model_in_dim) -> waveform (B, frames * hop_length)."""
        c = self.config
        if mel.dim() != 3 or mel.shape[-1] != c.model_in_dim:
            raise ValueError(f"GriffinLim expects a mel spectrogram of shape (batch, frames, {c.model_in_dim}); "
                             f"got {tuple(mel.shape)}")
        mag = (self.inverse_bank @ mel.float().exp().transpose(1, 2)).clamp(min=0)     # (B, bins, frames)
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)             # a centred STFT has one frame more
        n = mel.shape[1] * c.hop_length
        stft = lambda x: torch.stft(x, c.n_fft, c.hop_length, window=self.window, return_complex=True)
        istft = lambda s: torch.istft(s, c.n_fft, c.hop_length, window=self.window, length=n)
        phase = torch.rand(mag.shape, generator=torch.Generator().manual_seed(0)).to(mag.device)
        spec = mag * torch.polar(torch.ones_like(phase), 2 * torch.pi * phase)
        for _ in range(c.n_iter):
            rebuilt = stft(istft(spec))
            spec = mag * rebuilt / rebuilt.abs().clamp(min=1e-8)
        return istft(spec)
