"""A VQ-VAE image tokenizer in diffusers' `VQModel` layout: an image becomes a grid of codebook indices.

Papers: van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv 1711.00937),
sec. 3: the encoder output z_e is replaced by its nearest codebook vector e_k; the gradient skips
the non-differentiable lookup (the straight-through estimator) and eq. 3 adds two terms,
||sg[z_e] - e||^2 that moves the codebook and beta * ||z_e - sg[e]||^2 (the commitment loss) that
keeps the encoder near its codes. Esser et al. 2021 (VQGAN, arXiv 2012.09841) put this codebook
between the convolutional encoder and decoder that latent diffusion's autoencoder (minignext.vae)
also uses. Reference code: diffusers `models/autoencoders/vq_model.py` and `VectorQuantizer`
in `models/autoencoders/vae.py`.

    image -> encoder -> quant_conv -> nearest codebook row (quantize.embedding) -> codes (B, h, w)
    codes -> codebook rows -> post_quant_conv -> decoder -> image
"""

from dataclasses import dataclass

import torch
from torch import nn

from minignext import weights
from minignext.utils import config_from_dict
from minignext.vae import AutoencoderKLConfig, Decoder, Encoder


@dataclass
class VQModelConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3                 # channels out of the encoder and into the decoder
    sample_size: int = 32                    # the image side the model was trained on
    num_vq_embeddings: int = 256             # codebook rows: the image vocabulary
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None          # width of a codebook row; latent_channels if None
    scaling_factor: float = 0.18215          # kept for the file format; a VQ tokenizer does not use it
    norm_type: str = "group"                 # "spatial" (MoVQ's conditioned norm) is not implemented
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = False       # diffusers' decode() flag; codes are decoded by decode_codes here
    force_upcast: bool = False

    def __post_init__(self):
        if self.vq_embed_dim is None:
            self.vq_embed_dim = self.latent_channels
        if self.norm_type != "group":
            raise ValueError(f"VQModel supports norm_type 'group', got {self.norm_type!r} (the 'spatial' "
                             f"norm of MoVQ is not implemented)")
        self.autoencoder()   # validates the block types, activation and channel lists

    @classmethod
    def from_hf(cls, d: dict) -> "VQModelConfig":
        return config_from_dict(cls, d)

    @classmethod
    def tiny(cls) -> "VQModelConfig":
        """A 32x32 image -> 8x8 = 64 codes from a 64-row codebook."""
        return cls(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, latent_channels=4,
                   num_vq_embeddings=64, sample_size=32)

    def autoencoder(self) -> AutoencoderKLConfig:
        """The encoder/decoder part, in minignext.vae's terms."""
        return AutoencoderKLConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, down_block_types=self.down_block_types,
            up_block_types=self.up_block_types, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
            mid_block_add_attention=self.mid_block_add_attention)


def straight_through(z, z_q):
    """z_q in the forward pass, the identity in the backward pass: the decoder's gradient
    reaches the encoder as if the codebook lookup were not there."""
    return z + (z_q - z).detach()


def vq_loss(z, z_q, beta=0.25, legacy=True):
    """The codebook and commitment terms of van den Oord et al. eq. 3.

    codebook term   mean (z_q - sg[z])^2  moves the chosen codebook rows towards the encoder outputs;
    commitment term mean (z - sg[z_q])^2  keeps the encoder outputs near their rows.
    The paper weights the commitment term by beta. taming-transformers, and diffusers after it,
    put beta on the codebook term instead and keep that by default for old checkpoints (legacy).
    """
    codebook = torch.mean((z_q - z.detach()) ** 2)
    commitment = torch.mean((z - z_q.detach()) ** 2)
    return commitment + beta * codebook if legacy else codebook + beta * commitment


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings, dim, beta=0.25, legacy=True):
        super().__init__()
        self.beta, self.legacy = beta, legacy
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def codes(self, z):
        """z (B, C, H, W) -> index of the nearest codebook row per position (B, H, W)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        return torch.cdist(flat, self.embedding.weight).argmin(dim=1).view(b, h, w)

    def lookup(self, codes):
        """codes (B, H, W) -> codebook rows (B, C, H, W)."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be (batch, height, width), got shape {tuple(codes.shape)}")
        n = self.embedding.num_embeddings
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise ValueError(f"codes must lie in 0..{n - 1}, got {int(codes.min())}..{int(codes.max())}")
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z):
        """-> (z_q with the straight-through gradient, codebook + commitment loss, codes)."""
        codes = self.codes(z)
        z_q = self.lookup(codes)
        return straight_through(z, z_q), vq_loss(z, z_q, self.beta, self.legacy), codes


class VQModel(nn.Module):
    def __init__(self, config: VQModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.autoencoder(), double_z=False)
        self.quant_conv = nn.Conv2d(c.latent_channels, c.vq_embed_dim, 1)
        self.quantize = VectorQuantizer(c.num_vq_embeddings, c.vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(c.vq_embed_dim, c.latent_channels, 1)
        self.decoder = Decoder(c.autoencoder())

    @property
    def scale_factor(self):
        """Pixels per code along each side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def codebook_size(self):
        return self.config.num_vq_embeddings

    def encode(self, x):
        """Images (B, C, H, W) -> continuous latents (B, vq_embed_dim, h, w), before the codebook."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h, quantize=True):
        """Latents -> images, through the codebook unless quantize=False (diffusers' force_not_quantize)."""
        if quantize:
            h = self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(h))

    def encode_codes(self, x):
        """Images (B, C, H, W) -> codes (B, H / scale_factor, W / scale_factor)."""
        return self.quantize.codes(self.encode(x))

    def decode_codes(self, codes):
        """Codes (B, h, w) -> images (B, C, h * scale_factor, w * scale_factor)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))

    def forward(self, x):
        """For training: -> (reconstruction, codebook + commitment loss, codes)."""
        z_q, loss, codes = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(z_q)), loss, codes

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "VQModel":
        """A diffusers VQModel folder: config.json + diffusion_pytorch_model.safetensors."""
        folder = weights.resolve(path)
        model = weights.build_on_meta(cls, VQModelConfig.from_hf(weights.read_config(folder)))
        sd = weights.load_safetensors(folder, stem="diffusion_pytorch_model")
        return weights.load_into(model, sd, dtype=dtype, device=device).eval()
