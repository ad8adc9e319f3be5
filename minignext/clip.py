"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", arXiv 2103.00020): the byte-level BPE tokenizer, the vision transformer and the
causal text transformer, in the on-disk layout of Hugging Face transformers' CLIP models
(transformers/models/clip/modeling_clip.py), so their checkpoints load without a key remap.

LLaVA sees images through the ViT-L/14 tower; Stable Diffusion 1.5 conditions on the text
tower's last hidden state (after `final_layer_norm`).
"""

import html
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from minignext import weights
from minignext.attention import attention
from minignext.utils import config_from_dict


# ---------------------------------------------------------------- tokenizer

# CLIP's word splitter: the special tokens, English contractions, runs of letters,
# single digits, runs of anything else that is not a space.
CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def clean_text(text: str) -> str:
    """CLIP's text cleaning: undo HTML escapes, NFC, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def _special(value, default):
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...} in some tokenizer configs
        value = value.get("content")
    return value or default


class CLIPTokenizer:
    """Text -> (B, max_length) ids: <|startoftext|> words... <|endoftext|> pad..., truncated
    so that the end token always survives."""

    def __init__(self, tokenizer: Tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", model_max_length=77):
        self.tokenizer = tokenizer
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        self.model_max_length = model_max_length

    def _id(self, token):
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise weights.WeightsError(f"tokenizer vocabulary has no {token!r} token")
        return i

    @classmethod
    def from_pretrained(cls, path):
        folder = weights.resolve(path, folders=("tokenizer",))
        if (folder / "tokenizer").is_dir() and not (folder / "vocab.json").is_file():
            folder = folder / "tokenizer"        # a whole pipeline repo (SD 1.5 layout)
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text()))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = cls.build(folder / "vocab.json", folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tok.no_padding()
            tok.no_truncation()
        else:
            raise weights.WeightsError(f"{folder}: found neither vocab.json + merges.txt nor tokenizer.json")
        max_len = settings.get("model_max_length", 77)
        return cls(tok, bos_token=_special(settings.get("bos_token"), "<|startoftext|>"),
                   eos_token=_special(settings.get("eos_token"), "<|endoftext|>"),
                   pad_token=_special(settings.get("pad_token"), "<|endoftext|>"),
                   model_max_length=max_len if isinstance(max_len, int) and max_len < 10**6 else 77)

    @staticmethod
    def build(vocab_file, merges_file) -> Tokenizer:
        """CLIP BPE from its two files: words end in '</w>', bytes map to printable characters."""
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        tok = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of one text, without start/end tokens."""
        return self.tokenizer.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts, max_length=None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"CLIPTokenizer wants a string or a list of strings, got {type(texts).__name__}")
        max_length = max_length or self.model_max_length
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        out = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id] + self.encode(text)[: max_length - 2] + [self.eos_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.bos_token_id, self.eos_token_id, self.pad_token_id)]
        return self.tokenizer.decode(ids).replace("</w>", " ").strip()


# ---------------------------------------------------------------- configs

@dataclass
class CLIPVisionConfig:
    """Defaults are transformers' CLIPVisionConfig defaults (ViT-B/32); `tiny()` for tests."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    with_projection: bool = True       # False for CLIPVisionModel (no visual_projection)
    hidden_act: str = "quick_gelu"     # "quick_gelu" (OpenAI weights) or "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_common(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = self.image_size // self.patch_size
        self.num_positions = self.grid ** 2 + 1

    @classmethod
    def from_hf(cls, d: dict, **overrides):
        if "vision_config" in d:   # a whole CLIPModel config: the tower's part plus the shared projection_dim
            d = {**d["vision_config"], **{k: d[k] for k in ("projection_dim",) if k in d}}
        return config_from_dict(cls, d, **overrides)

    @classmethod
    def tiny(cls, **overrides):
        return cls(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8, projection_dim=32), **overrides})

    @classmethod
    def vit_l_14(cls, image_size=224):
        """openai/clip-vit-large-patch14 (LLaVA uses 336: pass image_size=336)."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=image_size, patch_size=14, projection_dim=768)


@dataclass
class CLIPTextConfig:
    """Defaults are transformers' CLIPTextConfig defaults; `tiny()` for tests."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    projection_dim: int = 512
    with_projection: bool = False      # True for CLIPTextModelWithProjection (text_projection)
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407          # 2 in old configs: then pool at argmax(ids), as CLIP did

    def __post_init__(self):
        _check_common(self)

    @classmethod
    def from_hf(cls, d: dict, **overrides):
        if "text_config" in d:   # a whole CLIPModel config: the tower's part plus the shared projection_dim
            d = {**d["text_config"], **{k: d[k] for k in ("projection_dim",) if k in d}}
        return config_from_dict(cls, d, **overrides)

    @classmethod
    def tiny(cls, **overrides):
        return cls(**{**dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, projection_dim=32), **overrides})

    @classmethod
    def sd15_text(cls):
        """The text encoder of Stable Diffusion 1.5 (CLIP ViT-L/14's text tower, no projection)."""
        return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768)


def _check_common(c):
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(f"hidden_size {c.hidden_size} is not divisible by {c.num_attention_heads} heads")
    if c.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {c.hidden_act!r}")


ACTIVATIONS = {
    # OpenAI's sigmoid approximation x * sigmoid(1.702 x), computed as silu(1.702 x) / 1.702:
    # one fused kernel and one buffer fewer than the literal formula.
    "quick_gelu": lambda x: F.silu(1.702 * x).div_(1.702),
    "gelu": F.gelu,
}


@dataclass
class CLIPOutput:
    last_hidden_state: torch.Tensor                   # (B, T, D)
    pooled: torch.Tensor                              # (B, D): CLS after post_layernorm / EOS token
    embeds: torch.Tensor | None = None                # (B, projection_dim) when the model projects
    hidden_states: tuple | None = None                # input of layer 0, then every layer's output


# ---------------------------------------------------------------- layers (HF names)

class CLIPAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, causal=False, key_padding_mask=None):
        split = lambda t: rearrange(t, "b t (h d) -> b h t d", h=self.num_heads)
        y = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                      causal=causal, key_padding_mask=key_padding_mask)
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-norm transformer block. `attention_cls` swaps the attention (BLIP-2's ViT uses EVA's)."""

    def __init__(self, c, attention_cls=None):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = (attention_cls or CLIPAttention)(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x, causal=False, key_padding_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), causal, key_padding_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c, attention_cls=None):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c, attention_cls) for _ in range(c.num_hidden_layers))

    def forward(self, x, causal=False, key_padding_mask=None):
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], causal, key_padding_mask))
        return states


# ---------------------------------------------------------------- vision tower

def patchify(images, patch_size):
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p): patches in reading order, each flattened
    channel-first like a Conv2d weight, so patchify(x) @ conv.weight.flatten(1).T == conv(x)."""
    if images.dim() != 4 or images.shape[-1] % patch_size or images.shape[-2] % patch_size:
        raise ValueError(f"patchify wants (B, C, H, W) with H and W multiples of {patch_size}, "
                         f"got {tuple(images.shape)}")
    return rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=patch_size, q=patch_size)


def interpolate_pos_embed(pos_embed, old_grid, new_grid):
    """Resize a ViT position table (1 + old_h * old_w, D) to (1 + new_h * new_w, D): the class
    position stays, the patch positions are resampled as a (D, old_h, old_w) picture (bicubic)."""
    old_h, old_w = (old_grid, old_grid) if isinstance(old_grid, int) else old_grid
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    if pos_embed.shape[0] != 1 + old_h * old_w:
        raise ValueError(f"a position table for a {old_h}x{old_w} grid has {1 + old_h * old_w} rows, "
                         f"got {pos_embed.shape[0]}")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    cls_pos, grid = pos_embed[:1], pos_embed[1:]
    grid = rearrange(grid, "(h w) d -> 1 d h w", h=old_h)
    grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False)
    grid = rearrange(grid, "1 d h w -> (h w) d").to(pos_embed.dtype)
    return torch.cat([cls_pos, grid])


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixels):
        c = self.config
        h, w = pixels.shape[-2] // c.patch_size, pixels.shape[-1] // c.patch_size
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = rearrange(patches, "b d h w -> b (h w) d")
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        pos = interpolate_pos_embed(self.position_embedding.weight, c.grid, (h, w))
        return torch.cat([cls, patches], dim=1) + pos


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)    # sic: HF's spelling
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPVision(nn.Module):
    """Images (B, 3, H, W), CLIP-normalised -> CLIPOutput. H and W must be multiples of the patch
    size; other sizes than the trained one interpolate the position table."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        if config.with_projection:
            self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values, output_hidden_states=False) -> CLIPOutput:
        c = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(f"CLIPVision wants images (B, {c.num_channels}, H, W), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[-1] % c.patch_size or pixel_values.shape[-2] % c.patch_size:
            raise ValueError(f"image size {tuple(pixel_values.shape[-2:])} is not a multiple of the "
                             f"patch size {c.patch_size}")
        m = self.vision_model
        states = m.encoder(m.pre_layrnorm(m.embeddings(pixel_values)))
        pooled = m.post_layernorm(states[-1][:, 0])
        return CLIPOutput(last_hidden_state=states[-1], pooled=pooled,
                          embeds=self.visual_projection(pooled) if c.with_projection else None,
                          hidden_states=tuple(states) if output_hidden_states else None)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return _from_pretrained(cls, path, dtype, device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict, dtype=None, device=None):
        """A config.json dict and the tensors as the file stores them -> the vision tower."""
        return _from_checkpoint(cls, CLIPVisionConfig, "vision_model.", "visual_projection.", config, tensors,
                                dtype, device)


# ---------------------------------------------------------------- text tower

class CLIPTextEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPText(nn.Module):
    """Token ids (B, T) -> CLIPOutput. Causal; `last_hidden_state` is after `final_layer_norm`
    (what Stable Diffusion conditions on); `pooled` is the state at the end token."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPOutput:
        c = self.config
        if input_ids.dim() != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"CLIPText wants ids (B, T) with T <= {c.max_position_embeddings}, "
                             f"got {tuple(input_ids.shape)}")
        m = self.text_model
        mask = attention_mask.bool() if attention_mask is not None else None
        states = m.encoder(m.embeddings(input_ids), causal=True, key_padding_mask=mask)
        last = m.final_layer_norm(states[-1])
        if c.eos_token_id == 2:
            eos = input_ids.argmax(dim=-1)                      # the end token had the largest id
        else:
            eos = (input_ids == c.eos_token_id).int().argmax(dim=-1)   # first end token
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        return CLIPOutput(last_hidden_state=last, pooled=pooled,
                          embeds=self.text_projection(pooled) if c.with_projection else None,
                          hidden_states=tuple(states) if output_hidden_states else None)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return _from_pretrained(cls, path, dtype, device, pipeline_folder="text_encoder")

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict, dtype=None, device=None):
        """A config.json dict and the tensors as the file stores them -> the text tower."""
        return _from_checkpoint(cls, CLIPTextConfig, "text_model.", "text_projection.", config, tensors,
                                dtype, device)


# ---------------------------------------------------------------- loading

# Buffers that transformers before 4.31 saved with CLIP weights (SD-1.5's text encoder has one);
# the model indexes its positions itself.
LEGACY_BUFFERS = ("embeddings.position_ids",)


def add_tower_prefix(key, tensor, prefix):
    """transformers 5 saves CLIPTextModel / CLIPVisionModel without the `text_model.` /
    `vision_model.` prefix that every other CLIP checkpoint (and this module) uses: add it.
    Drop the legacy buffers."""
    if key.endswith(LEGACY_BUFFERS):
        return []
    if key.startswith(("text_model.", "vision_model.", "text_projection.", "visual_projection.", "logit_scale")):
        return [(key, tensor)]
    return [(prefix + key, tensor)]


def _from_pretrained(cls, path, dtype, device, pipeline_folder=None):
    folder = weights.resolve(path, folders=(pipeline_folder,) if pipeline_folder else ())
    if pipeline_folder and (folder / pipeline_folder).is_dir() and not (folder / "config.json").is_file():
        folder = folder / pipeline_folder           # a Stable Diffusion pipeline repo
    return cls.from_checkpoint(weights.read_config(folder), weights.load_checkpoint(folder), dtype, device)


def _from_checkpoint(cls, config_cls, tower, projection, config, tensors, dtype, device):
    tensors = weights.remap_state_dict(tensors, lambda k, t: add_tower_prefix(k, t, tower))
    # a full CLIPModel holds both towers: keep ours
    sd = {k: t for k, t in tensors.items() if k.startswith((tower, projection))}
    config = config_cls.from_hf(config, with_projection=any(k.startswith(projection) for k in sd))
    return weights.load_model(cls, config, sd, dtype=dtype, device=device)
