"""The conditional UNet of latent diffusion, in the diffusers `UNet2DConditionModel` layout.

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (arXiv 2112.10752), sec. 3.3: a UNet whose ResNet blocks receive the time step
and whose spatial transformers cross-attend to a text encoding. Reference code:
huggingface/diffusers `models/unets/unet_2d_condition.py`, `unet_2d_blocks.py`,
`resnet.py`, `attention.py`, `transformers/transformer_2d.py`. Attribute names equal
the diffusers checkpoint keys, so a Stable Diffusion (or AudioLDM) UNet loads as is.

The blocks are public and composable; the 3D UNet of the video decoder reuses them.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minignext import weights
from minignext.attention import attention
from minignext.utils import config_from_dict

# diffusers options this file does not implement, with the value that means "off"
_UNSUPPORTED = {"addition_embed_type": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
                "resnet_time_scale_shift": "default", "dual_cross_attention": False, "time_cond_proj_dim": None,
                "timestep_post_act": None, "time_embedding_act_fn": None, "center_input_sample": False,
                "attention_type": "default", "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
                "time_embedding_dim": None, "reverse_transformer_layers_per_block": None}


@dataclass
class UNet2DConditionConfig:
    """Defaults are diffusers' UNet2DConditionModel defaults; `tiny()` for tests and lessons."""
    sample_size: int | None = None             # latent height and width the model was trained at
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    transformer_layers_per_block: int | tuple = 1
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280    # a tuple gives one width per block (AudioLDM)
    attention_head_dim: int | tuple = 8        # diffusers' misnomer: this is the number of heads
    num_attention_heads: int | tuple | None = None
    only_cross_attention: bool | tuple = False
    use_linear_projection: bool = False        # 1x1 conv or Linear around the transformer
    upcast_attention: bool = False             # attention in fp32 when running in half precision
    flip_sin_to_cos: bool = True               # time embedding as [cos, sin] rather than [sin, cos]
    freq_shift: int = 0
    act_fn: str = "silu"
    dropout: float = 0.0
    class_embed_type: str | None = None        # None, "simple_projection" or "projection"
    num_class_embeds: int | None = None        # with class_embed_type None: a class-id lookup table
    projection_class_embeddings_input_dim: int | None = None
    class_embeddings_concat: bool = False      # concatenate the class embedding to the time embedding
    # derived
    time_embed_dim: int = field(init=False)
    blocks_time_embed_dim: int = field(init=False)

    def __post_init__(self):
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(f"down_block_types, up_block_types and block_out_channels need one entry per "
                             f"level; got {n}, {len(self.up_block_types)}, {len(self.block_out_channels)}")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn {self.act_fn!r} is not supported; the UNet uses 'silu'")
        if self.class_embed_type not in (None, "simple_projection", "projection"):
            raise ValueError(f"class_embed_type {self.class_embed_type!r} is not supported; "
                             f"use None, 'simple_projection' or 'projection'")
        self.time_embed_dim = self.block_out_channels[0] * 4
        self.blocks_time_embed_dim = self.time_embed_dim * (2 if self.class_embeddings_concat else 1)

    @classmethod
    def tiny(cls, **overrides):
        """Two levels of 32 and 64 channels, one cross-attention level, 32-wide text."""
        return cls(**{**dict(sample_size=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                             layers_per_block=1, cross_attention_dim=32), **overrides})

    def per_block(self, name):
        value = getattr(self, name)
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.down_block_types)

    @property
    def heads(self):
        return self.per_block("num_attention_heads" if self.num_attention_heads else "attention_head_dim")

    @classmethod
    def from_hf(cls, d: dict):
        for key, off in _UNSUPPORTED.items():
            if d.get(key, off) != off:
                raise ValueError(f"UNet config has {key}={d[key]!r}; minignext supports only {off!r}")
        return config_from_dict(cls, d)


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """Sinusoidal embedding of (B,) time steps (Vaswani et al. 2017, sec. 3.5; DDPM appendix B):
    frequencies max_period ** (-i / (dim / 2 - freq_shift)), features [sin, cos] or [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    angles = t[:, None].float() * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Timesteps(nn.Module):
    def __init__(self, num_channels, flip_sin_to_cos=True, freq_shift=0.0):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.freq_shift = num_channels, flip_sin_to_cos, freq_shift

    def forward(self, t):
        return timestep_embedding(t, self.num_channels, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the projected time embedding added in between."""

    def __init__(self, in_channels, out_channels=None, temb_channels=512, groups=32, eps=1e-6,
                 output_scale_factor=1.0, dropout=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h if self.output_scale_factor == 1.0 else (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    def __init__(self, channels, out_channels=None, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:            # the VAE pads right and bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention on (B, T, C) tokens; keys and values come from `context`
    when given (cross-attention), else from the tokens themselves."""

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, bias=False, upcast=False):
        super().__init__()
        inner, kv_dim = heads * dim_head, cross_attention_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        b, t, _ = x.shape
        q, k, v = (p.view(b, -1, self.heads, p.shape[-1] // self.heads).transpose(1, 2)
                   for p in (self.to_q(x), self.to_k(context), self.to_v(context)))   # (B, H, T, D)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = attention(q, k, v).to(dtype).transpose(1, 2).reshape(b, t, -1)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Shazeer 2020: one projection gives a value half and a gate half; value * GELU(gate)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class SinusoidalPositions(nn.Module):
    """Adds the fixed sine-cosine table of Vaswani et al. 2017 (sec. 3.5) to a (B, T, dim) sequence."""

    def __init__(self, dim, max_len):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        freqs = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(1, max_len, dim)
        table[0, :, 0::2], table[0, :, 1::2] = torch.sin(position * freqs), torch.cos(position * freqs)
        self.register_buffer("pe", table)              # saved, as diffusers saves it

    def forward(self, x):
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"a sequence of {x.shape[1]} is longer than the {self.pe.shape[1]} positions "
                             f"this block was built for")
        return x + self.pe[:, :x.shape[1]]


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm: self-attention (attn1), cross-attention (attn2), GEGLU feed-forward.
    Without a context, attn2 attends to the tokens themselves, as diffusers does. With
    `positions` (a maximum length), a sine-cosine position table is added to the normalised input
    of both attentions, as diffusers' positional_embeddings="sinusoidal"."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim=None, only_cross_attention=False,
                 upcast_attention=False, dropout=0.0, positions=None):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.pos_embed = SinusoidalPositions(dim, positions) if positions else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, heads, dim_head,
                               upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context=None):
        pos = self.pos_embed or (lambda y: y)
        x = x + self.attn1(pos(self.norm1(x)), context if self.only_cross_attention else None)
        x = x + self.attn2(pos(self.norm2(x)), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """A spatial transformer: GroupNorm, project in, treat the H*W pixels as tokens, project out, add."""

    def __init__(self, num_attention_heads, attention_head_dim, in_channels, num_layers=1,
                 cross_attention_dim=None, norm_num_groups=32, use_linear_projection=False,
                 only_cross_attention=False, upcast_attention=False, dropout=0.0):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        proj = (lambda i, o: nn.Linear(i, o)) if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim,
                                  only_cross_attention, upcast_attention, dropout) for _ in range(num_layers)])
        self.proj_out = proj(inner, in_channels)

    def forward(self, x, context=None):
        b, _, h, w = x.shape
        residual, x = x, self.norm(x)
        if not self.use_linear_projection:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)                                   # (B, H*W, C)
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear_projection:
            x = self.proj_out(x)
        return x + residual


# ---------------------------------------------------------------- down, mid and up blocks

def _transformer(cfg, level, channels, mid=False):
    heads = cfg.heads[level]
    only_cross = cfg.per_block("only_cross_attention")[level] and not mid   # diffusers' mid block ignores it
    return Transformer2DModel(heads, channels // heads, channels, cfg.per_block("transformer_layers_per_block")[level],
                              cfg.per_block("cross_attention_dim")[level], cfg.norm_num_groups,
                              cfg.use_linear_projection, only_cross, cfg.upcast_attention, cfg.dropout)


def _resnet(cfg, cin, cout, scale=1.0):
    return ResnetBlock2D(cin, cout, cfg.blocks_time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, scale, cfg.dropout)


class DownBlock2D(nn.Module):
    """`layers` ResNet blocks (each followed by a spatial transformer in the CrossAttn variant),
    then a stride-2 conv; every intermediate output is kept as a skip connection."""

    def __init__(self, cfg, level, cin, cout, cross_attention=False):
        super().__init__()
        layers = cfg.per_block("layers_per_block")[level]
        self.resnets = nn.ModuleList([_resnet(cfg, cin if i == 0 else cout, cout) for i in range(layers)])
        if cross_attention:
            self.attentions = nn.ModuleList([_transformer(cfg, level, cout) for _ in range(layers)])
        if level < len(cfg.block_out_channels) - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, cout, cfg.downsample_padding)])

    def forward(self, x, temb, context=None):
        def layer(i, x):
            x = self.resnets[i](x, temb)
            return self.attentions[i](x, context) if hasattr(self, "attentions") else x
        return down_path(self, x, layer)


def down_path(block, x, layer):
    """A down block's pass: `layer(i, x)` for each of its layers, then its downsampler, if any;
    every output is kept as a skip connection for the up path."""
    skips = []
    for i in range(len(block.resnets)):
        x = layer(i, x)
        skips.append(x)
    if hasattr(block, "downsamplers"):
        x = block.downsamplers[0](x)
        skips.append(x)
    return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    def __init__(self, cfg, level, cin, cout):
        super().__init__(cfg, level, cin, cout, cross_attention=True)


class UpBlock2D(nn.Module):
    """`layers + 1` ResNet blocks, each fed the concatenation of the path and one skip."""

    def __init__(self, cfg, level, cin, cout, prev, cross_attention=False):
        super().__init__()
        n = len(cfg.block_out_channels)
        layers = cfg.per_block("layers_per_block")[n - 1 - level] + 1
        self.resnets = nn.ModuleList([
            _resnet(cfg, (prev if i == 0 else cout) + (cin if i == layers - 1 else cout), cout) for i in range(layers)])
        if cross_attention:
            self.attentions = nn.ModuleList([_transformer(cfg, n - 1 - level, cout) for _ in range(layers)])
        if level < n - 1:
            self.upsamplers = nn.ModuleList([Upsample2D(cout, cout)])

    def forward(self, x, skips, temb, context=None, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    def __init__(self, cfg, level, cin, cout, prev):
        super().__init__(cfg, level, cin, cout, prev, cross_attention=True)


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, level = cfg.block_out_channels[-1], len(cfg.block_out_channels) - 1
        self.resnets = nn.ModuleList([_resnet(cfg, c, c, cfg.mid_block_scale_factor) for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(cfg, level, c, mid=True)])

    def forward(self, x, temb, context=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}


def check_block_types(cfg, down_blocks, up_blocks):
    for kind in (*cfg.down_block_types, *cfg.up_block_types):
        if kind not in down_blocks and kind not in up_blocks:
            raise ValueError(f"block type {kind!r} is not supported; use one of "
                             f"{', '.join([*down_blocks, *up_blocks])}")


class UNet2DCondition(nn.Module):
    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        cfg, ch = config, config.block_out_channels
        check_block_types(cfg, DOWN_BLOCKS, UP_BLOCKS)
        if cfg.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise ValueError(f"mid_block_type {cfg.mid_block_type!r} is not supported")
        self.config = cfg
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        if cfg.class_embed_type == "simple_projection":
            self.class_embedding = nn.Linear(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        elif cfg.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        elif cfg.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, cfg.time_embed_dim)
        else:
            self.class_embedding = None
        self.down_blocks = nn.ModuleList([DOWN_BLOCKS[kind](cfg, i, ch[max(i - 1, 0)], ch[i])
                                          for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = UNetMidBlock2DCrossAttn(cfg) if cfg.mid_block_type else None
        rev = ch[::-1]
        # up block i: path from rev[i - 1]; skips of width rev[i], the last one rev[i + 1]; output rev[i]
        self.up_blocks = nn.ModuleList([
            UP_BLOCKS[kind](cfg, i, rev[min(i + 1, len(ch) - 1)], rev[i], rev[max(i - 1, 0)])
            for i, kind in enumerate(cfg.up_block_types)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def time_embed(self, sample, timestep, class_labels=None):
        """The embedding every ResNet block receives: MLP(sinusoid(t)), plus or concatenated with
        the projected class labels (AudioLDM's CLAP vector enters here)."""
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditioned: pass class_labels")
            c = self.class_embedding(class_labels).to(sample.dtype)
            emb = torch.cat([emb, c], dim=-1) if self.config.class_embeddings_concat else emb + c
        return emb

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None):
        emb = self.time_embed(sample, timestep, class_labels)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, encoder_hidden_states)
            skips.extend(s)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, encoder_hidden_states)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None      # so odd sizes round-trip
            x = block(x, mine, emb, encoder_hidden_states, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        folder = weights.resolve(path)
        return cls.from_checkpoint(weights.read_config(folder),
                                   weights.load_checkpoint(folder, stem="diffusion_pytorch_model"), dtype, device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict, dtype=None, device=None):
        """A published config.json dict and the tensors as its file stores them -> the model."""
        return weights.load_model(cls, UNet2DConditionConfig.from_hf(config), tensors, dtype=dtype, device=device)
