"""The video UNet of ModelScope text-to-video / ZeroScope, in the diffusers `UNet3DConditionModel` layout.

Paper: Wang et al. 2023, "ModelScope Text-to-Video Technical Report" (arXiv 2308.06571),
sec. 3: the Stable Diffusion UNet with a temporal convolution after every ResNet block
and a temporal transformer after every spatial one. Reference code: huggingface/diffusers
`models/unets/unet_3d_condition.py`, `unet_3d_blocks.py`, `resnet.py` (TemporalConvLayer)
and `transformers/transformer_temporal.py`. Attribute names equal the checkpoint keys.

Every spatial layer is the 2D one from `minignext.unet`, run on the frames folded into the
batch: (B, C, F, H, W) -> (B*F, C, H, W). The temporal layers unfold them again:
    TemporalConvLayer       (B, C, F, H, W), convolutions of kernel (3, 1, 1): each pixel
                            looks at its neighbours in time only;
    TransformerTemporalModel  (B*H*W, F, C): each pixel is a sequence of F frames that
                            attends to itself (self-attention twice, no text). ZeroScope's
                            carry no frame positions (only the temporal convolutions' zero
                            padding tells the first frame from the last); with the config's
                            temporal_positions they get a sine-cosine table, as AnimateDiff's
                            motion modules do, and with temporal_cross_attention the blocks'
                            ones read the text in their second attention.
Both end in a residual connection, so a model with those layers zeroed is a per-frame
image UNet.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import weights
from .unet import (BasicTransformerBlock, Downsample2D, ResnetBlock2D, TimestepEmbedding, Timesteps,
                   Transformer2DModel, Upsample2D, check_block_types, down_path)
from .utils import config_from_dict


@dataclass
class UNet3DConditionConfig:
    """Defaults are diffusers' UNet3DConditionModel defaults (ModelScope / ZeroScope); `tiny()` for tests."""
    sample_size: int | None = None              # latent height and width the model was trained at
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D")
    up_block_types: tuple = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024             # width of the text states
    attention_head_dim: int = 64                # channels per head (in the 3D UNet the name is right; the
                                                # 2D UNet reads the same key as a number of heads)
    transformer_in_heads: int = 8               # heads of transformer_in; diffusers fixes it at 8
    temporal_positions: int | None = None       # not in ZeroScope (None): a sine-cosine table of this many
                                                # frames in every temporal attention, as AnimateDiff's motion
                                                # modules have (diffusers positional_embeddings="sinusoidal")
    temporal_cross_attention: bool = False      # not in ZeroScope (False): the blocks' temporal attentions
                                                # attend to the text in their second attention (attn2)
    act_fn: str = "silu"

    def __post_init__(self):
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(f"down_block_types, up_block_types and block_out_channels need one entry per "
                             f"level; got {n}, {len(self.up_block_types)}, {len(self.block_out_channels)}")
        if not isinstance(self.attention_head_dim, int):
            raise ValueError(f"attention_head_dim must be one int (the 3D UNet uses it for every block "
                             f"and for transformer_in); got {self.attention_head_dim!r}")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn {self.act_fn!r} is not supported; the UNet uses 'silu'")
        self.time_embed_dim = self.block_out_channels[0] * 4

    @classmethod
    def tiny(cls, **overrides) -> "UNet3DConditionConfig":
        """Two levels of 32 and 64 channels, one cross-attention level, 32-wide text."""
        return cls(**{**dict(sample_size=32, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                             up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64),
                             layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8),
                      **overrides})

    def per_block(self, name):
        """One value per level, as UNet2DConditionConfig.per_block (the pipelines read widths this way)."""
        value = getattr(self, name)
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.down_block_types)

    @classmethod
    def from_hf(cls, d: dict) -> "UNet3DConditionConfig":
        for key in ("num_attention_heads", "time_cond_proj_dim"):
            if d.get(key) is not None:
                raise ValueError(f"UNet3D config has {key}={d[key]!r}; minignext supports only None")
        return config_from_dict(cls, d)


# ---------------------------------------------------------------- the frame axis, folded and unfolded

def fold_frames(x):
    """(B, C, F, H, W) -> (B*F, C, H, W), clip-major: the frames of clip 0 come first."""
    return rearrange(x, "b c f h w -> (b f) c h w")


def unfold_frames(x, num_frames):
    """(B*F, C, H, W) -> (B, C, F, H, W)."""
    return rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)


def pixels_as_sequences(x, num_frames):
    """(B*F, C, H, W) -> (B*H*W, F, C): one sequence over time per pixel, for temporal attention."""
    return rearrange(x, "(b f) c h w -> (b h w) f c", f=num_frames)


def sequences_as_pixels(x, height, width):
    """(B*H*W, F, C) -> (B*F, C, H, W), the inverse of pixels_as_sequences."""
    return rearrange(x, "(b h w) f c -> (b f) c h w", h=height, w=width)


class TemporalConvLayer(nn.Module):
    """Four GroupNorm-SiLU-Conv3d(3,1,1) stages over the frame axis, added to the input.
    The indices inside each Sequential (norm 0, conv 2 or 3) are the checkpoint's."""

    def __init__(self, channels, groups=32):
        super().__init__()

        def stage(dropout):
            layers = [nn.GroupNorm(groups, channels), nn.SiLU()] + ([nn.Dropout(0.1)] if dropout else [])
            return nn.Sequential(*layers, nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = stage(False), stage(True), stage(True), stage(True)

    def forward(self, x, num_frames):
        x = unfold_frames(x, num_frames)
        return fold_frames(x + self.conv4(self.conv3(self.conv2(self.conv1(x)))))


class TransformerTemporalModel(nn.Module):
    """Attention across frames: every pixel of every clip is one sequence of F tokens."""

    def __init__(self, heads, dim_head, in_channels, groups=32, positions=None, cross_attention_dim=None):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        # diffusers builds it with double_self_attention: attn2 is a second self-attention, unless
        # the block is given a cross_attention_dim (then attn2 reads the text)
        self.cross = cross_attention_dim is not None
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim,
                                                                       positions=positions)])
        self.proj_out = nn.Linear(inner, in_channels)

    def forward(self, x, num_frames, context=None):
        """x (B*F, C, H, W); context (B*F, T, D), the per-frame text states, read only by a block
        built with a cross_attention_dim."""
        h, w = x.shape[-2:]
        # GroupNorm statistics are taken over the whole clip (all frames), not per frame
        y = fold_frames(self.norm(unfold_frames(x, num_frames)))
        y = self.proj_in(pixels_as_sequences(y, num_frames))
        if self.cross:          # one copy of the clip's text per pixel sequence, (B*H*W, T, D)
            context = context[::num_frames].repeat_interleave(h * w, dim=0)
        for block in self.transformer_blocks:
            y = block(y, context if self.cross else None)
        return x + sequences_as_pixels(self.proj_out(y), h, w)


# ---------------------------------------------------------------- down, mid and up blocks
# Each spatial layer is followed by its temporal twin: resnet -> temp_conv, attention -> temp_attention.

def _resnet(cfg, cin, cout, scale=1.0):
    return ResnetBlock2D(cin, cout, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, scale)


def _attentions(cfg, channels):
    heads, d = channels // cfg.attention_head_dim, cfg.attention_head_dim
    spatial = Transformer2DModel(heads, d, channels, 1, cfg.cross_attention_dim, cfg.norm_num_groups,
                                 use_linear_projection=True)
    return spatial, TransformerTemporalModel(heads, d, channels, cfg.norm_num_groups, cfg.temporal_positions,
                                             cfg.cross_attention_dim if cfg.temporal_cross_attention else None)


class DownBlock3D(nn.Module):
    def __init__(self, cfg, level, cin, cout, cross_attention=False):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([_resnet(cfg, cin if i == 0 else cout, cout) for i in range(n)])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(cout, cfg.norm_num_groups) for _ in range(n)])
        if cross_attention:
            pairs = [_attentions(cfg, cout) for _ in range(n)]
            self.attentions = nn.ModuleList([s for s, _ in pairs])
            self.temp_attentions = nn.ModuleList([t for _, t in pairs])
        if level < len(cfg.block_out_channels) - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, cout, cfg.downsample_padding)])

    def forward(self, x, temb, context, num_frames):
        def layer(i, x):
            x = self.temp_convs[i](self.resnets[i](x, temb), num_frames)
            if hasattr(self, "attentions"):
                x = self.temp_attentions[i](self.attentions[i](x, context), num_frames, context)
            return x
        return down_path(self, x, layer)


class CrossAttnDownBlock3D(DownBlock3D):
    def __init__(self, cfg, level, cin, cout):
        super().__init__(cfg, level, cin, cout, cross_attention=True)


class UpBlock3D(nn.Module):
    def __init__(self, cfg, level, cin, cout, prev, cross_attention=False):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList([
            _resnet(cfg, (prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout) for i in range(n)])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(cout, cfg.norm_num_groups) for _ in range(n)])
        if cross_attention:
            pairs = [_attentions(cfg, cout) for _ in range(n)]
            self.attentions = nn.ModuleList([s for s, _ in pairs])
            self.temp_attentions = nn.ModuleList([t for _, t in pairs])
        if level < len(cfg.block_out_channels) - 1:
            self.upsamplers = nn.ModuleList([Upsample2D(cout, cout)])

    def forward(self, x, skips, temb, context, num_frames, size=None):
        for i, (resnet, temp_conv) in enumerate(zip(self.resnets, self.temp_convs)):
            x = temp_conv(resnet(torch.cat([x, skips.pop()], dim=1), temb), num_frames)
            if hasattr(self, "attentions"):
                x = self.temp_attentions[i](self.attentions[i](x, context), num_frames, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size)
        return x


class CrossAttnUpBlock3D(UpBlock3D):
    def __init__(self, cfg, level, cin, cout, prev):
        super().__init__(cfg, level, cin, cout, prev, cross_attention=True)


class UNetMidBlock3DCrossAttn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList([_resnet(cfg, c, c, cfg.mid_block_scale_factor) for _ in range(2)])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(c, cfg.norm_num_groups) for _ in range(2)])
        spatial, temporal = _attentions(cfg, c)
        self.attentions, self.temp_attentions = nn.ModuleList([spatial]), nn.ModuleList([temporal])

    def forward(self, x, temb, context, num_frames):
        x = self.temp_convs[0](self.resnets[0](x, temb), num_frames)
        x = self.temp_attentions[0](self.attentions[0](x, context), num_frames, context)
        return self.temp_convs[1](self.resnets[1](x, temb), num_frames)


DOWN_BLOCKS = {"DownBlock3D": DownBlock3D, "CrossAttnDownBlock3D": CrossAttnDownBlock3D}
UP_BLOCKS = {"UpBlock3D": UpBlock3D, "CrossAttnUpBlock3D": CrossAttnUpBlock3D}


class UNet3DCondition(nn.Module):
    def __init__(self, config: UNet3DConditionConfig):
        super().__init__()
        cfg, ch = config, config.block_out_channels
        check_block_types(cfg, DOWN_BLOCKS, UP_BLOCKS)
        self.config = cfg
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos=True, freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.transformer_in = TransformerTemporalModel(cfg.transformer_in_heads, cfg.attention_head_dim, ch[0],
                                                       cfg.norm_num_groups, cfg.temporal_positions)
        self.down_blocks = nn.ModuleList([DOWN_BLOCKS[kind](cfg, i, ch[max(i - 1, 0)], ch[i])
                                          for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = UNetMidBlock3DCrossAttn(cfg)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([UP_BLOCKS[kind](cfg, i, rev[min(i + 1, len(ch) - 1)], rev[i], rev[max(i - 1, 0)])
                                        for i, kind in enumerate(cfg.up_block_types)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states):
        """sample (B, C, F, H, W), timestep scalar or (B,), encoder_hidden_states (B, T, D) -> (B, C, F, H, W)."""
        if sample.dim() != 5 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet3DCondition expects a sample of shape (batch, {self.config.in_channels}, "
                             f"frames, height, width); got {tuple(sample.shape)}")
        b, f = sample.shape[0], sample.shape[2]
        ctx, width = encoder_hidden_states, self.config.cross_attention_dim
        if not torch.is_tensor(ctx) or ctx.dim() != 3 or ctx.shape[0] != b or ctx.shape[-1] != width:
            shape = tuple(ctx.shape) if torch.is_tensor(ctx) else type(ctx).__name__
            raise ValueError(f"encoder_hidden_states must be a ({b}, tokens, {width}) tensor, got {shape}")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        # every frame is one image for the spatial layers: repeat the per-clip conditioning per frame
        temb = temb.repeat_interleave(f, dim=0)
        context = encoder_hidden_states.repeat_interleave(f, dim=0)
        x = self.conv_in(fold_frames(sample))
        x = self.transformer_in(x, f)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context, f)
            skips.extend(s)
        x = self.mid_block(x, temb, context, f)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None      # so odd sizes round-trip
            x = block(x, mine, temb, context, f, size)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return unfold_frames(x, f)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        folder = weights.resolve(path)
        return cls.from_checkpoint(weights.read_config(folder),
                                   weights.load_checkpoint(folder, stem="diffusion_pytorch_model"), dtype, device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict, dtype=None, device=None):
        """A published config.json dict and the tensors as its file stores them -> the model."""
        return weights.load_model(cls, UNet3DConditionConfig.from_hf(config), tensors, dtype=dtype, device=device)
