"""ImageBind (Girdhar et al. 2023, "ImageBind: One Embedding Space To Bind Them All",
arXiv 2305.05665): one ViT per modality whose pooled, L2-normalised outputs share a space.

Mirrors facebookresearch/ImageBind `models/imagebind_model.py` with all six branches: vision,
text, audio, depth, thermal and IMU. Module names are the keys of the official
`imagebind_huge.pth`, so that checkpoint loads without a remap: modality_preprocessors (stems,
class tokens, position tables) -> modality_trunks (pre-norm transformers) -> modality_heads
(LayerNorm, pick a token, Linear) -> modality_postprocessors (L2 normalise, then a logit scale
for every modality but vision). A config may build fewer branches (`modalities`): the toy world
trains vision, text and audio only.

NExT-GPT and PandaGPT feed the LLM `embed(modality, x)`: the normalised embedding without a
logit scale. `ImageBindVisionTower` keeps the vision branch's patch tokens instead, for a model
that resamples them (the toy Flamingo).
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minignext import weights
from minignext.attention import MultiheadAttention
from minignext.utils import config_from_dict

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")
IMU_CHANNELS = 6                         # accelerometer and gyroscope, 3 axes each
# The fixed scale of each modality's postprocessor (text's is learned, vision has none).
LOGIT_SCALES = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}


@dataclass
class ImageBindConfig:
    # Names and defaults of the official ImageBindModel(...) keyword arguments.
    video_frames: int = 2                    # frames per vision clip (an image is repeated to 2)
    kernel_size: tuple = (2, 14, 14)         # vision Conv3d kernel = stride (time, height, width)
    audio_kernel_size: int = 16              # audio Conv2d kernel over the (mel, frame) picture
    audio_stride: int = 10
    out_embed_dim: int = 768                 # the shared embedding space
    vision_embed_dim: int = 1024
    vision_num_blocks: int = 24
    vision_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204              # fbank frames per clip
    audio_drop_path: float = 0.1             # stochastic depth, training only
    text_embed_dim: int = 768
    text_num_blocks: int = 12
    text_num_heads: int = 12
    depth_embed_dim: int = 384
    depth_kernel_size: int = 16              # Conv2d kernel = stride over the one-channel disparity map
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_drop_path: float = 0.0
    thermal_embed_dim: int = 768
    thermal_kernel_size: int = 16
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    thermal_drop_path: float = 0.0
    imu_embed_dim: int = 512
    imu_kernel_size: int = 8                 # readings per IMU patch (the official code always uses 8)
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    imu_drop_path: float = 0.7
    # Fixed in the official code; fields here so small worlds can shrink them.
    image_size: int = 224                    # vision, depth and thermal inputs are image_size squared
    imu_length: int = 2000                   # IMU readings per clip, per channel
    vocab_size: int = 49408
    context_length: int = 77
    modalities: tuple = MODALITIES           # the branches to build

    def __post_init__(self):
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {tuple(self.modalities)}")
        self.modalities = tuple(m for m in MODALITIES if m in self.modalities)
        for name in MODALITIES:
            dim, heads = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if dim % heads:
                raise ValueError(f"{name}_embed_dim {dim} is not divisible by {name}_num_heads {heads}")
        kt, kh, kw = self.kernel_size
        if self.image_size % kh or self.image_size % kw or max(self.video_frames, 2) % kt:
            raise ValueError(f"kernel_size {tuple(self.kernel_size)} does not tile {max(self.video_frames, 2)} "
                             f"frames of {self.image_size}x{self.image_size}")
        self.vision_grid = (max(self.video_frames, 2) // kt, self.image_size // kh, self.image_size // kw)
        self.audio_grid = tuple((n - self.audio_kernel_size) // self.audio_stride + 1
                                for n in (self.audio_num_mel_bins, self.audio_target_len))
        if min(self.audio_grid) < 1:
            raise ValueError(f"a {self.audio_num_mel_bins}x{self.audio_target_len} fbank is smaller than "
                             f"audio_kernel_size {self.audio_kernel_size}")
        for name in ("depth", "thermal"):
            k = getattr(self, f"{name}_kernel_size")
            if k > self.image_size:
                raise ValueError(f"{name}_kernel_size {k} is larger than image_size {self.image_size}")
            setattr(self, f"{name}_grid", (self.image_size // k,) * 2)
        if not 1 <= self.imu_kernel_size <= self.imu_length:
            raise ValueError(f"imu_kernel_size {self.imu_kernel_size} must be between 1 and imu_length {self.imu_length}")
        self.imu_tokens = self.imu_length // self.imu_kernel_size

    @classmethod
    def from_hf(cls, d: dict, **overrides):
        return config_from_dict(cls, d, **overrides)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def width(self, modality) -> tuple:
        """(embed_dim, num_blocks, num_heads) of a branch."""
        return tuple(getattr(self, f"{modality}_{f}") for f in ("embed_dim", "num_blocks", "num_heads"))

    @classmethod
    def huge(cls):
        """imagebind_huge: ViT-H/14 vision, 24-block text, 1024-d space; the other four branches
        at the constructor's defaults."""
        return cls(out_embed_dim=1024, vision_embed_dim=1280, vision_num_blocks=32, text_embed_dim=1024,
                   text_num_blocks=24, text_num_heads=16)

    @classmethod
    def tiny(cls, **overrides):
        """Every branch 32 wide and 2 blocks deep, 32x32 images: for tests and small worlds."""
        small = {f"{m}_{f}": v for m in MODALITIES for f, v in (("embed_dim", 32), ("num_blocks", 2), ("num_heads", 4))}
        return cls(**{**small, "out_embed_dim": 32, "image_size": 32, "kernel_size": (2, 8, 8),
                      "depth_kernel_size": 8, "thermal_kernel_size": 8, **overrides})


# ---------------------------------------------------------------- trunk (official names)

class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, add_bias_kv=False, drop_path=0.0):
        super().__init__()
        self.attn = MultiheadAttention(dim, heads, add_bias_kv)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = drop_path

    def forward(self, x, causal=False):
        x = x + self._drop(self.attn(self.norm_1(x), causal=causal))
        return x + self._drop(self.mlp(self.norm_2(x)))

    def _drop(self, branch):
        """Stochastic depth (Huang et al. 2016): drop the whole branch per sample while training."""
        if not self.training or self.drop_path == 0.0:
            return branch
        keep = 1.0 - self.drop_path
        mask = branch.new_empty(branch.shape[0], 1, 1).bernoulli_(keep)
        return branch * mask / keep


class Trunk(nn.Module):
    def __init__(self, dim, blocks, heads, pre_ln=False, add_bias_kv=False, drop_path=0.0):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if pre_ln else nn.Identity())
        rates = torch.linspace(0, drop_path, blocks, device="cpu").tolist()   # deeper blocks drop more
        self.blocks = nn.Sequential(*(Block(dim, heads, add_bias_kv, r) for r in rates))

    def forward(self, x, causal=False):
        x = self.pre_transformer_layer(x)
        for block in self.blocks:
            x = block(x, causal)
        return x


# ---------------------------------------------------------------- stems (official names)

class RepeatFrames(nn.Module):
    """An image (N, C, H, W) or a one-frame clip becomes a clip of `frames` identical frames."""

    def __init__(self, frames=2):
        super().__init__()
        self.frames = frames

    def forward(self, x):
        if x.dim() == 4:
            x = x.unsqueeze(2)                       # (N, C, 1, H, W)
        return x.repeat(1, 1, self.frames, 1, 1) if x.shape[2] == 1 else x


class PatchStem(nn.Module):
    def __init__(self, proj, norm_layer=None):
        super().__init__()
        self.proj = proj
        if norm_layer is not None:
            self.norm_layer = norm_layer

    def forward(self, x):
        x = rearrange(self.proj(x), "n d ... -> n (...) d")
        return self.norm_layer(x) if hasattr(self, "norm_layer") else x


class PositionTable(nn.Module):
    def __init__(self, tokens, dim):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * dim ** -0.5)


class PatchPreprocessor(nn.Module):
    """Patches -> [CLS, patches] + position table. The stem sits under the checkpoint's name:
    `rgbt_stem` for vision, audio and thermal, `depth_stem` for depth."""

    def __init__(self, stem, num_patches, dim, stem_name="rgbt_stem"):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.pos_embedding_helper = PositionTable(num_patches + 1, dim)

    def forward(self, x):
        tokens = getattr(self, self.stem_name)(x)
        table = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] + 1 != table.shape[1]:
            raise ValueError(f"input {tuple(x.shape[1:])} gives {tokens.shape[1]} patches, the model's position "
                             f"table has {table.shape[1] - 1}: resize the input to the size the model was built for")
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + table


class IMUPreprocessor(nn.Module):
    """(B, 6, L) readings -> L / k patches of k readings on all 6 channels -> Linear, LayerNorm ->
    [CLS, patches] + position table."""

    def __init__(self, stem, num_patches, dim, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.01)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.imu_stem = stem

    def forward(self, x):
        k = self.kernel_size
        patches = rearrange(x[..., :x.shape[-1] // k * k], "b c (n k) -> b n (c k)", k=k)
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(patches))
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed


class TextPreprocessor(nn.Module):
    def __init__(self, vocab_size, context_length, dim):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, dim) * 0.01)
        # Kept only because the official checkpoint stores it; attention uses causal=True.
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf")).triu(1))

    def forward(self, ids):
        return self.token_embedding(ids) + self.pos_embed


# ---------------------------------------------------------------- heads and postprocessors

class SelectToken(nn.Module):
    def forward(self, x):
        return x[:, 0]


class TextHead(nn.Module):
    """The state at the end token (the largest id, as in CLIP) -> LayerNorm -> Linear."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim, bias=False))

    def forward(self, x, ids):
        return self.proj(x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)])


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """x * min(exp(log_logit_scale), 100); learnable for text (init 1/0.07), fixed for audio (20)."""

    def __init__(self, init, learnable):
        super().__init__()
        value = torch.tensor(math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x):
        return x * self.log_logit_scale.exp().clamp(max=100.0)

# ---------------------------------------------------------------- the model

class ImageBind(nn.Module):
    """forward({modality: input}) -> {modality: (B, out_embed_dim)}.

    vision   (B, 3, H, W) images; clips (B, S, 3, T, H, W) of T frames, or (B, S, 3, H, W)
    audio    (B, 1, mels, frames) or clips (B, S, 1, mels, frames)
    text     (B, context_length) token ids
    depth    (B, 1, H, W) disparity maps, or clips (B, S, 1, H, W)
    thermal  (B, 1, H, W) thermal images, or clips (B, S, 1, H, W)
    imu      (B, 6, imu_length) accelerometer and gyroscope readings
    Any input with 5 or more dims carries a clips axis S: each clip is embedded and normalised,
    then the S results are averaged, as the official forward does.
    """

    def __init__(self, config: ImageBindConfig):
        super().__init__()
        self.config = c = config
        stems = {m: self._stem(m) for m in c.modalities if m != "text"}
        self.modality_preprocessors = nn.ModuleDict({m: self._preprocessor(m, stems.get(m)) for m in c.modalities})
        self.modality_trunks = nn.ModuleDict({m: self._trunk(m) for m in c.modalities})
        self.modality_heads = nn.ModuleDict({m: self._head(m) for m in c.modalities})
        self.modality_postprocessors = nn.ModuleDict({
            m: Normalize() if m == "vision" else
            nn.Sequential(Normalize(), LogitScale(1 / 0.07, learnable=True) if m == "text" else
                          LogitScale(LOGIT_SCALES[m], learnable=False))
            for m in c.modalities})

    def _stem(self, m):
        c, dim = self.config, self.config.width(m)[0]
        if m == "vision":
            return PatchStem(nn.Sequential(RepeatFrames(2), nn.Conv3d(3, dim, c.kernel_size, c.kernel_size, bias=False)))
        if m == "imu":
            proj = nn.Linear(IMU_CHANNELS * c.imu_kernel_size, dim, bias=False)
        else:
            kernel, stride = ((c.audio_kernel_size, c.audio_stride) if m == "audio" else
                              (getattr(c, f"{m}_kernel_size"),) * 2)
            proj = nn.Conv2d(1, dim, kernel, stride, bias=False)
        return PatchStem(proj, norm_layer=nn.LayerNorm(dim))

    def _preprocessor(self, m, stem):
        c, dim = self.config, self.config.width(m)[0]
        if m == "text":
            return TextPreprocessor(c.vocab_size, c.context_length, dim)
        if m == "imu":
            return IMUPreprocessor(stem, c.imu_tokens, dim, c.imu_kernel_size)
        return PatchPreprocessor(stem, math.prod(getattr(c, f"{m}_grid")), dim,
                                 stem_name="depth_stem" if m == "depth" else "rgbt_stem")

    def _trunk(self, m):
        if m in ("vision", "text"):
            return Trunk(*self.config.width(m), pre_ln=m == "vision")
        return Trunk(*self.config.width(m), add_bias_kv=True, drop_path=getattr(self.config, f"{m}_drop_path"))

    def _head(self, m):
        dim, out = self.config.width(m)[0], self.config.out_embed_dim
        if m == "text":
            return TextHead(dim, out)
        dropout = [nn.Dropout(0.5)] if m == "imu" else []      # the official IMU head has one
        return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SelectToken(), *dropout, nn.Linear(dim, out, bias=False))

    def forward(self, inputs: dict) -> dict:
        if not isinstance(inputs, dict):
            raise ValueError(f"ImageBind wants a dict {{modality: tensor}} with modalities {self.config.modalities}")
        return {m: self._embed(m, x, scale=True) for m, x in inputs.items()}

    def embed(self, modality: str, x) -> torch.Tensor:
        """(B, out_embed_dim): L2-normalised (then averaged over clips), no logit scale."""
        return self._embed(modality, x, scale=False)

    def _embed(self, modality, x, scale):
        x = self._check(modality, x)
        clips = x.shape[:2] if x.dim() >= 5 else None
        if clips is not None:
            x = x.flatten(0, 1)
        tokens = self.modality_preprocessors[modality](x)
        tokens = self.modality_trunks[modality](tokens, causal=modality == "text")
        head = self.modality_heads[modality]
        out = head(tokens, x) if modality == "text" else head(tokens)
        post = self.modality_postprocessors[modality]
        out = post(out) if scale or modality == "vision" else post[0](out)
        return out.reshape(*clips, -1).mean(dim=1) if clips is not None else out

    def _check(self, modality, x):
        c = self.config
        if modality not in c.modalities:
            built = "is not an ImageBind modality" if modality not in MODALITIES else "was not built in this model"
            raise ValueError(f"modality {modality!r} {built}; this ImageBind takes {c.modalities}")
        if not torch.is_tensor(x):
            raise ValueError(f"{modality}: expected a tensor, got {type(x).__name__}")
        if modality == "text":
            if x.dim() != 2 or x.shape[1] != c.context_length or x.is_floating_point():
                raise ValueError(f"text: expected token ids (B, {c.context_length}), got {x.dtype} {tuple(x.shape)}")
            return x
        size = (c.image_size, c.image_size)
        if modality == "vision":
            item = x.shape[-3:] if x.dim() in (4, 5) else x.shape[-4:] if x.dim() == 6 else None
            want = f"(B, 3, H, W), (B, S, 3, H, W) or (B, S, 3, T, H, W) at {c.image_size}x{c.image_size}"
            ok = item is not None and item[0] == 3 and tuple(item[-2:]) == size
        elif modality == "audio":
            want = f"(B, 1, {c.audio_num_mel_bins}, {c.audio_target_len}) or (B, S, 1, ...)"
            ok = x.dim() in (4, 5) and tuple(x.shape[-3:]) == (1, c.audio_num_mel_bins, c.audio_target_len)
        elif modality == "imu":
            want = f"(B, {IMU_CHANNELS}, {c.imu_length}) readings"
            ok = x.dim() == 3 and tuple(x.shape[1:]) == (IMU_CHANNELS, c.imu_length)
        else:
            want = f"(B, 1, {c.image_size}, {c.image_size}) or (B, S, 1, {c.image_size}, {c.image_size})"
            ok = x.dim() in (4, 5) and tuple(x.shape[-3:]) == (1, *size)
        if not ok:
            raise ValueError(f"{modality}: expected {want}, got {tuple(x.shape)}")
        return x.to(self.modality_trunks[modality].blocks[0].norm_1.weight.dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """A folder with config.json and model.safetensors in the official key names."""
        folder = weights.resolve(path)
        config = ImageBindConfig.from_hf(weights.read_config(folder))
        state = weights.load_safetensors(folder)
        absent = [m for m in config.modalities if not any(k.split(".")[1:2] == [m] for k in state)]
        if absent:
            raise weights.WeightsError(
                f"{folder}: config.json builds the {', '.join(absent)} branch(es), but the checkpoint has no weights "
                f"for them. A folder converted when minignext dropped depth, thermal and IMU lacks those: convert "
                f"imagebind_huge.pth again, or name the branches it has in config.json's \"modalities\"")
        model = weights.build_on_meta(cls, config)
        return weights.load_into(model, state, dtype=dtype, device=device).eval()


# ---------------------------------------------------------------- the vision branch as a tower of tokens

@dataclass
class VisionTowerConfig:
    """What a model reading patch tokens asks of its vision tower, under CLIPVisionConfig's names."""
    hidden_size: int
    image_size: int


@dataclass
class VisionTowerOutput:
    last_hidden_state: torch.Tensor          # (B, 1 + patches, D): the class token first


class ImageBindVisionTower(nn.Module):
    """ImageBind's vision branch read the way Flamingo reads its frozen CLIP ViT: images (B, 3, H, W)
    -> the trunk's output tokens, before the head (no norm, no pooling, no projection). Keys are the
    ImageBind checkpoint's vision keys without the head's."""

    def __init__(self, config: ImageBindConfig):
        super().__init__()
        if "vision" not in config.modalities:
            raise ValueError(f"this ImageBind has no vision branch (modalities {config.modalities})")
        branch = ImageBind(ImageBindConfig(**{**asdict(config), "modalities": ("vision",)}))
        self.config = VisionTowerConfig(hidden_size=config.vision_embed_dim, image_size=config.image_size)
        self.modality_preprocessors = nn.ModuleDict({"vision": branch.modality_preprocessors["vision"]})
        self.modality_trunks = nn.ModuleDict({"vision": branch.modality_trunks["vision"]})

    def forward(self, pixel_values) -> VisionTowerOutput:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"the vision tower wants images (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        x = pixel_values.to(self.modality_trunks["vision"].blocks[0].norm_1.weight.dtype)
        return VisionTowerOutput(self.modality_trunks["vision"](self.modality_preprocessors["vision"](x)))

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "ImageBindVisionTower":
        """An ImageBind folder (config.json + model.safetensors); only its vision stem and trunk are kept."""
        folder = weights.resolve(path)
        config = ImageBindConfig.from_hf(weights.read_config(folder))
        model = weights.build_on_meta(cls, config)
        wanted = model.state_dict().keys()
        state = {k: v for k, v in weights.load_safetensors(folder).items() if k in wanted}
        return weights.load_into(model, state, dtype=dtype, device=device).eval()


# ---------------------------------------------------------------- the official checkpoint

def convert_checkpoint(src, dst, overwrite=False, config: ImageBindConfig | None = None):
    """imagebind_huge.pth (pickle) -> folder with config.json + model.safetensors (official keys).

    `config` defaults to huge(); the tensors are checked against it before anything is written."""
    config = config or ImageBindConfig.huge()
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        raise ValueError(f"{dst}: give a folder; it will hold config.json and model.safetensors")
    for name in ("config.json", "model.safetensors"):
        if (dst / name).exists() and not overwrite:
            raise FileExistsError(f"{dst / name} exists; pass overwrite=True (or --overwrite) to replace it")
    state = weights.load_pickle(src)
    weights.check_state_dict(weights.build_on_meta(ImageBind, config).state_dict(), state,
                             where=f"ImageBind {config}")
    dst.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(state, dst / "model.safetensors", overwrite=overwrite)
    (dst / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return dst
