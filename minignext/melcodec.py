"""A codec on log-mel frames: EnCodec's encoder, residual vector quantiser and decoder
(minignext.encodec; Défossez et al. 2022, arXiv 2210.13438) run over the frames of a log-mel
spectrogram, its bins as the channels, and a Griffin-Lim vocoder (minignext.vocoder) turns the
decoded mels back into sound.

    wave (B, 1, samples) -> log-mel (B, bins, frames) -> EnCodec encoder -> RVQ codes (B, n_q, frames / hop)
    codes -> EnCodec decoder -> log-mel (B, bins, frames) -> Griffin-Lim -> wave (B, 1, frames * mel hop)

EnCodec on the waveform learns to oscillate over days of training with adversarial losses; a
decoder that only has to draw a spectrogram learns in minutes, and the waveform is left to a
vocoder. Coding mel frames is what Tortoise-TTS's discrete VAE does (Betker 2023, arXiv
2305.07243, sec. 3.1). The toy AnyGPT's audio tokenizer is one (minignext/toy/train_anygpt.py
has the measurements that led there).

On disk it is an EncodecModel folder (config.json and model.safetensors in transformers' layout,
so `Encodec.from_pretrained` reads the codec alone) whose config.json also holds "mel": the log-mel
settings, GriffinLimConfig's fields, and "mel_floor", the magnitude clamped to before the log.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from minignext import weights
from minignext.encodec import Encodec, EncodecConfig
from minignext.media import mel_filterbank
from minignext.vocoder import GriffinLim, GriffinLimConfig


class MelCodec(nn.Module):
    def __init__(self, codec: Encodec, mel: GriffinLimConfig, mel_floor: float = 1.0):
        super().__init__()
        c = codec.config
        frames_per_second = mel.sampling_rate / mel.hop_length
        if c.audio_channels != mel.model_in_dim or c.sampling_rate != frames_per_second:
            raise ValueError(f"the codec must read mel frames: audio_channels = {mel.model_in_dim} mel bins and "
                             f"sampling_rate = {frames_per_second:g} frames per second; got audio_channels "
                             f"{c.audio_channels} and sampling_rate {c.sampling_rate}")
        self.codec, self.mel, self.mel_floor = codec, mel, mel_floor
        self.vocoder = GriffinLim(mel)
        bank = mel_filterbank(mel.model_in_dim, mel.n_fft, mel.sampling_rate, low_freq=mel.f_min, high_freq=mel.f_max)
        self.register_buffer("mel_bank", bank.float(), persistent=False)
        self.register_buffer("window", torch.hann_window(mel.n_fft), persistent=False)

    @property
    def config(self) -> EncodecConfig:
        return self.codec.config

    @property
    def codebook_size(self) -> int:
        return self.codec.codebook_size

    @property
    def quantizer(self):
        return self.codec.quantizer

    @property
    def sampling_rate(self) -> int:
        """Of the waveforms it takes and makes."""
        return self.mel.sampling_rate

    def log_mel(self, wave):
        """Waveforms (B, samples) -> log-mel (B, bins, samples // hop): |STFT| (Hann, centred), mel
        bands, clamped at mel_floor, natural log; frame i is centred on sample i * hop."""
        m = self.mel
        spec = torch.stft(wave, m.n_fft, m.hop_length, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True).abs()
        mel = self.mel_bank @ spec[..., :wave.shape[-1] // m.hop_length]
        return mel.clamp(min=self.mel_floor).log()

    def _check_audio(self, audio):
        if audio.dim() != 3 or audio.shape[1] != 1 or audio.shape[-1] < self.mel.n_fft // 2 + 1:
            raise ValueError(f"audio must be (batch, 1 channel, samples) at {self.sampling_rate} Hz with at least "
                             f"{self.mel.n_fft // 2 + 1} samples, got shape {tuple(audio.shape)}")

    def encode(self, audio, bandwidth=None, num_quantizers=None):
        """audio (B, 1, samples) -> codes (B, n_q, ceil(mel frames / hop)); n_q as Encodec.encode."""
        self._check_audio(audio)
        return self.codec.encode(self.log_mel(audio[:, 0]), bandwidth, num_quantizers)

    def decode_mel(self, codes):
        """codes (B, n_q, T) -> log-mel (B, bins, T * hop)."""
        return self.codec.decode(codes)

    def decode(self, codes):
        """codes (B, n_q, T) -> audio (B, 1, T * hop * mel hop)."""
        return self.vocoder(self.decode_mel(codes).transpose(1, 2))[:, None]

    def forward(self, audio, bandwidth=None):
        """-> (codes, audio decoded from them, trimmed to the input length)."""
        codes = self.encode(audio, bandwidth)
        return codes, self.decode(codes)[..., :audio.shape[-1]]

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "MelCodec":
        folder = weights.resolve(path)
        config = weights.read_config(folder)
        if "mel" not in config:
            raise ValueError(f"{folder}/config.json has no 'mel' settings: it is a waveform EnCodec; load it "
                             f"with minignext.encodec.Encodec.from_pretrained")
        mel = GriffinLimConfig.from_hf(config["mel"])
        return cls(Encodec.from_pretrained(folder, dtype, device), mel, config.get("mel_floor", 1.0)).to(device)

    def save_pretrained(self, folder, dtype=torch.float16, overwrite=False):
        """folder/{config.json, model.safetensors}: the codec in transformers' EncodecModel layout, plus "mel"."""
        folder = Path(folder)
        if (folder / "config.json").exists() and not overwrite:
            raise FileExistsError(f"{folder / 'config.json'} exists; pass overwrite=True to replace it")
        folder.mkdir(parents=True, exist_ok=True)
        config = {"architectures": ["EncodecModel"], "model_type": "encodec", **asdict(self.codec.config),
                  "mel": asdict(self.mel), "mel_floor": self.mel_floor}
        weights.save_safetensors({k: v.to(dtype) for k, v in self.codec.state_dict().items()},
                                 folder / "model.safetensors", overwrite=overwrite)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return folder


def load_audio_tokenizer(path, dtype=None, device=None):
    """An EncodecModel folder: a MelCodec if its config.json has "mel", else a waveform Encodec."""
    folder = weights.resolve(path)
    if "mel" in weights.read_config(folder):
        return MelCodec.from_pretrained(folder, dtype, device)
    return Encodec.from_pretrained(folder, dtype, device)
