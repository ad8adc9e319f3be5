"""The KL-regularised autoencoder of latent diffusion (diffusers `AutoencoderKL` layout).

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv 2112.10752), sec. 3.1 and appendix G: an encoder maps a 512x512 image to a 4x64x64
Gaussian posterior, a decoder maps latents back; diffusion runs on the latents times
`scaling_factor` (0.18215 for SD-1.5) so that they have roughly unit variance. Reference code:
huggingface/diffusers `models/autoencoders/autoencoder_kl.py` and `vae.py`.

AudioLDM uses the same autoencoder on 1-channel mel spectrograms.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minignext import weights
from minignext.unet import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from minignext.utils import config_from_dict


@dataclass
class AutoencoderKLConfig:
    """Defaults are diffusers' AutoencoderKL defaults; `tiny()` for tests and lessons."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 32
    scaling_factor: float = 0.18215          # latents * scaling_factor have about unit variance
    shift_factor: float | None = None        # subtracted before scaling (SD3-style VAEs; None in SD-1.5)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        kinds = set(self.down_block_types) | set(self.up_block_types)
        if not kinds <= {"DownEncoderBlock2D", "UpDecoderBlock2D"} or self.act_fn != "silu":
            raise ValueError(f"AutoencoderKL supports DownEncoderBlock2D/UpDecoderBlock2D with silu, "
                             f"got {sorted(kinds)} and {self.act_fn!r}")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("AutoencoderKL needs one block_out_channels entry per down block")

    @classmethod
    def from_hf(cls, d: dict):
        return config_from_dict(cls, d)

    @classmethod
    def tiny(cls, **overrides):
        """Two levels of 32 and 64 channels (a scale factor of 2)."""
        return cls(**{**dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(32, 64), sample_size=64), **overrides})


class VAEAttention(Attention):
    """One-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels, groups, eps=1e-6):
        super().__init__(channels, None, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)              # (B, H*W, C)
        return super().forward(tokens).transpose(1, 2).reshape(b, c, h, w) + x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels, groups, add_attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups) if add_attention else nn.Identity()])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin, cout, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups)
                                      for i in range(layers)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, cout, padding=0)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin, cout, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups)
                                      for i in range(layers)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(cout, cout)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class Encoder(nn.Module):
    """double_z: output a mean and a log-variance per latent channel (the KL autoencoder);
    False outputs the latent itself (the VQ autoencoder, minignext.vq)."""

    def __init__(self, c: AutoencoderKLConfig, double_z=True):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, i < n - 1)
                                          for i in range(n)])
        self.mid_block = UNetMidBlock2D(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], (2 if double_z else 1) * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        rev, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, g,
                                                         i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), per latent element."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise          # the reparameterisation trick

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over latent elements: the "KL-reg" of LDM sec. 3.1."""
        return 0.5 * (self.mean ** 2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @property
    def scale_factor(self):
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x) -> DiagonalGaussian:
        moments = self.encoder(x)
        return DiagonalGaussian(self.quant_conv(moments) if self.quant_conv is not None else moments)

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, sample_posterior=False, generator=None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        folder = weights.resolve(path)
        return cls.from_checkpoint(weights.read_config(folder),
                                   weights.load_checkpoint(folder, stem="diffusion_pytorch_model"), dtype, device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict, dtype=None, device=None):
        """A published config.json dict and the tensors as its file stores them -> the model
        (from_pretrained without the files; the tensors may be on meta)."""
        return weights.load_model(cls, AutoencoderKLConfig.from_hf(config), tensors, legacy_key, dtype, device)


# diffusers before 0.17 named the mid-block attention so; SD-1.5's and AudioLDM's published VAEs still do
LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def legacy_key(key, tensor):
    """`encoder.mid_block.attentions.0.query.weight` -> `...to_q.weight`, as diffusers renames on load."""
    module, _, leaf = key.rpartition(".")
    block, _, name = module.rpartition(".")
    if ".mid_block.attentions." in f"{block}." and name in LEGACY_NAMES:
        return [(f"{block}.{LEGACY_NAMES[name]}.{leaf}", tensor)]
    return [(key, tensor)]
