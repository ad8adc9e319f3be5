"""IDEFICS and OpenFlamingo: two open reproductions of Flamingo (Alayrac et al. 2022, arXiv
2204.14198) on a LLaMA-style LLM and a CLIP vision tower, built from minignext's parts.

    images -> CLIP ViT -> perceiver resampler -> latents --+
    text ids -> embeddings -> [gated cross-attention -> LLaMA layer] x L -> norm -> lm_head

IDEFICS (Laurençon et al. 2023, OBELICS, arXiv 2306.16527) mirrors transformers'
`IdeficsForVisionText2Text` (models/idefics/modeling_idefics.py) and loads its Hugging Face folder.
Compared with minignext's LLaMA and CLIP it differs in:
  - decoupled embeddings: the added tokens (`<image>`, `<fake_token_around_image>`) live in
    `embed_tokens.additional_embedding` and `lm_head.additional_fc`, so that the original rows can
    stay frozen while the new ones train (`freeze()`);
  - a gated cross-attention layer before every `cross_layer_interval`-th decoder layer
    (`idx % interval == 0`); its decoder layers are LLaMA's, key for key;
  - its vision tower is CLIP's ViT with exact GELU; the resampler reads the last hidden state
    (CLS included, no post-layernorm); other image sizes are refused rather than interpolated;
  - its RMSNorm multiplies the input before the fp32 cast (different rounding in half precision only).

OpenFlamingo (Awadalla et al. 2023, arXiv 2308.01390) mirrors open_flamingo/src (flamingo.py,
flamingo_lm.py, factory.py): a gated block before decoder layer i when (i + 1) % n == 0, media
locations from the `<image>` ids, and a released `checkpoint.pt` that holds only what it trained.
`OpenFlamingo.from_pretrained` loads the base LLaMA and CLIP tower strictly from their own folders,
then the trainables strictly against their own key set. The vision features are open_clip's
`visual` tokens as they were when the models were trained: the last layer's patch tokens, without
CLS and without ln_post (open_clip 2.24 and later apply ln_post first).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minignext import media as media_io
from minignext import weights
from minignext.clip import CLIPVision, CLIPVisionConfig, CLIPVisionTransformer
from minignext.generation import generate
from minignext.llama import Llama, LlamaConfig
from minignext.perceiver import (GatedCrossAttentionBlock, IdeficsGatedCrossAttentionLayer,
                                 IdeficsPerceiverResampler, PerceiverResampler, media_attention_mask)
from minignext.utils import config_from_dict

IMAGE_TOKEN = "<image>"
IDEFICS_FAKE_TOKEN = "<fake_token_around_image>"
END_OF_CHUNK = "<|endofchunk|>"


# ---------------------------------------------------------------- IDEFICS configs

@dataclass
class IdeficsVisionConfig:
    embed_dim: int = 768
    image_size: int = 224
    intermediate_size: int = 5120
    patch_size: int = 14
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def clip(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(hidden_size=self.embed_dim, intermediate_size=self.intermediate_size,
                                num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                                num_channels=self.num_channels, image_size=self.image_size,
                                patch_size=self.patch_size, with_projection=False, hidden_act=self.hidden_act,
                                layer_norm_eps=self.layer_norm_eps)


@dataclass
class IdeficsPerceiverConfig:
    resampler_n_latents: int = 64
    resampler_depth: int = 6
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    qk_layer_norms_perceiver: bool = False


@dataclass
class IdeficsConfig(LlamaConfig):
    """transformers' IdeficsConfig: the LLaMA fields with IDEFICS's defaults, plus its own."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    pad_token_id: int | None = 0
    additional_vocab_size: int = 0        # added tokens, embedded apart so that they alone can train
    hidden_act: str = "silu"
    cross_layer_interval: int = 1         # a gated layer before decoder layers 0, k, 2k, ...
    qk_layer_norms: bool = False          # RMSNorm on each head's q and k in the gated layers
    alpha_initializer: str = "zeros"
    alphas_initializer_range: float = 0.0
    alpha_type: str = "float"             # one gate value per layer, or "vector": one per channel
    use_resampler: bool = False           # False: text attends to every vision token
    freeze_text_layers: bool = True
    freeze_lm_head: bool = False
    freeze_vision_layers: bool = True
    vision_config: IdeficsVisionConfig = field(default_factory=IdeficsVisionConfig)
    perceiver_config: IdeficsPerceiverConfig = field(default_factory=IdeficsPerceiverConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; IDEFICS's LLaMA uses 'silu'")
        if self.num_hidden_layers % self.cross_layer_interval:
            raise ValueError(f"num_hidden_layers ({self.num_hidden_layers}) must be a multiple of "
                             f"cross_layer_interval ({self.cross_layer_interval})")

    @classmethod
    def from_hf(cls, d: dict) -> "IdeficsConfig":
        nested = {"vision_config": config_from_dict(IdeficsVisionConfig, d.get("vision_config") or {}),
                  "perceiver_config": config_from_dict(IdeficsPerceiverConfig, d.get("perceiver_config") or {})}
        return super().from_hf({**d, **nested})

    @classmethod
    def tiny(cls, **overrides) -> "IdeficsConfig":
        vision = IdeficsVisionConfig(embed_dim=24, image_size=16, intermediate_size=48, patch_size=8,
                                     num_hidden_layers=2, num_attention_heads=4)
        perceiver = IdeficsPerceiverConfig(resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                                           resampler_head_dim=8)
        return cls(**{**dict(vocab_size=64, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128,
                             cross_layer_interval=2, use_resampler=True, vision_config=vision,
                             perceiver_config=perceiver), **overrides})


class DecoupledEmbedding(nn.Module):
    """Rows 0..num_embeddings-1 from `weight`, the ids above from `additional_embedding`."""

    def __init__(self, num_embeddings, num_additional_embeddings, embedding_dim):
        super().__init__()
        self.num_embeddings, self.num_additional_embeddings = num_embeddings, num_additional_embeddings
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))
        if num_additional_embeddings:
            self.additional_embedding = nn.Embedding(num_additional_embeddings, embedding_dim)

    def forward(self, ids):
        total = self.num_embeddings + self.num_additional_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= total):
            raise ValueError(f"token ids must lie in 0..{total - 1}, got {int(ids.min())}..{int(ids.max())}")
        extra = ids >= self.num_embeddings
        x = F.embedding(ids.masked_fill(extra, 0), self.weight)
        if self.num_additional_embeddings:
            added = self.additional_embedding((ids - self.num_embeddings).clamp(min=0))
            x = torch.where(extra[..., None], added, x)
        return x


class DecoupledLinear(nn.Module):
    """The logits of the original vocabulary from `weight`, those of the added tokens from `additional_fc`."""

    def __init__(self, in_features, out_features, out_additional_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * in_features ** -0.5)
        if out_additional_features:
            self.additional_fc = nn.Linear(in_features, out_additional_features, bias=False)

    def forward(self, x):
        y = F.linear(x, self.weight)
        return torch.cat([y, self.additional_fc(x)], dim=-1) if hasattr(self, "additional_fc") else y


# ---------------------------------------------------------------- IDEFICS

class Idefics(Llama):
    """`IdeficsForVisionText2Text`: minignext's LLaMA (its layers, norm, KV cache and generation)
    with decoupled embeddings, a CLIP vision tower, an optional perceiver resampler and gated
    cross-attention layers, all under the reference's keys. With the gates at 0 (a new model) its
    logits are the LLM's, whatever the images."""

    def __init__(self, config: IdeficsConfig):
        super().__init__(config)
        c, m = config, self.model
        m.embed_tokens = DecoupledEmbedding(c.vocab_size, c.additional_vocab_size, c.hidden_size)
        self.lm_head = DecoupledLinear(c.hidden_size, c.vocab_size, c.additional_vocab_size)
        if c.tie_word_embeddings:
            self.tie_weights()
        v = c.vision_config
        m.vision_model = CLIPVisionTransformer(v.clip())
        if c.use_resampler:
            p = c.perceiver_config
            m.perceiver_resampler = IdeficsPerceiverResampler(v.embed_dim, p.resampler_depth, p.resampler_n_heads,
                                                              p.resampler_head_dim, p.resampler_n_latents,
                                                              p.qk_layer_norms_perceiver)
        m.gated_cross_attn_layers = nn.ModuleList(IdeficsGatedCrossAttentionLayer(c, v.embed_dim)
                                                  for _ in range(c.num_hidden_layers // c.cross_layer_interval))

    def tie_weights(self):
        self.lm_head.weight = self.model.embed_tokens.weight
        if self.config.additional_vocab_size:
            self.lm_head.additional_fc.weight = self.model.embed_tokens.additional_embedding.weight

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None) -> "Idefics":
        """A Hugging Face IDEFICS folder (config.json + safetensors, sharded or not)."""
        folder = weights.resolve(path_or_repo_id)
        config = IdeficsConfig.from_hf(weights.read_config(folder))
        model = weights.build_on_meta(cls, config)
        sd = weights.load_safetensors(folder, stem="model")
        if config.tie_word_embeddings:   # a tied matrix is saved once, under the embedding's name
            sd.setdefault("lm_head.weight", sd.get("model.embed_tokens.weight"))
            if config.additional_vocab_size:
                sd.setdefault("lm_head.additional_fc.weight", sd.get("model.embed_tokens.additional_embedding.weight"))
        weights.load_into(model, sd, dtype=dtype, device=device)
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.eval()

    def resize_token_embeddings(self, new_vocab):
        raise NotImplementedError("IDEFICS adds tokens through additional_vocab_size (decoupled embeddings); "
                                  "build the model with a larger additional_vocab_size instead")

    def freeze(self) -> "Idefics":
        """requires_grad as IDEFICS trains: `freeze_text_layers` freezes the LLM's layers, final norm
        and original embedding rows (the added rows train), `freeze_lm_head` the original output rows,
        `freeze_vision_layers` the vision tower. The resampler and gated layers always train."""
        c, m = self.config, self.model
        self.requires_grad_(True)
        if c.freeze_text_layers:
            m.layers.requires_grad_(False)
            m.norm.requires_grad_(False)
            m.embed_tokens.weight.requires_grad_(False)
        if c.freeze_lm_head:
            self.lm_head.weight.requires_grad_(False)
        if c.freeze_vision_layers:
            m.vision_model.requires_grad_(False)
        return self

    def encode_images(self, pixel_values):
        """(B, N, C, H, W) images, or (B, N, F, C, H, W) videos of F frames -> (B, N, n, D): the
        resampler's latents, or every vision token when there is no resampler."""
        v = self.config.vision_config
        if pixel_values.dim() == 5:
            pixel_values = pixel_values.unsqueeze(2)
        if pixel_values.dim() != 6 or tuple(pixel_values.shape[-3:]) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must be (batch, images, {v.num_channels}, {v.image_size}, {v.image_size}) "
                             f"or (batch, videos, frames, ...), got {tuple(pixel_values.shape)}")
        b, n, f = pixel_values.shape[:3]
        vm = self.model.vision_model
        pixels = pixel_values.flatten(0, 2).to(vm.embeddings.patch_embedding.weight.dtype)
        states = vm.encoder(vm.pre_layrnorm(vm.embeddings(pixels)))[-1]
        states = states.reshape(b * n, f * states.shape[1], states.shape[2])
        if self.config.use_resampler:
            states = self.model.perceiver_resampler(states)
        return states.reshape(b, n, -1, states.shape[-1])

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, media=None, media_mask=None, input_pos=None,
                      attention_mask=None):
        """media (B, N, n, D) from encode_images; media_mask (B, T, N): which item each token sees."""
        layers, interval = self.model.gated_cross_attn_layers, self.config.cross_layer_interval

        def before_layer(i, x):
            return x if i % interval else layers[i // interval](x, media, _as_mask(media_mask, media, x))

        return super().hidden_states(input_ids, inputs_embeds=inputs_embeds, input_pos=input_pos,
                                     attention_mask=attention_mask, before_layer=before_layer)

    def forward(self, input_ids=None, pixel_values=None, image_attention_mask=None, *, image_token_id=None,
                inputs_embeds=None, attention_mask=None, return_hidden=False):
        """Logits (B, T, vocab + added) for text with images, like IdeficsForVisionText2Text:
        pixel_values (B, N, 3, H, W), image_attention_mask (B, T, N) with 1 where a token sees an
        image (or give `image_token_id` and it is built from the `<image>` tokens)."""
        media = self.encode_images(pixel_values) if pixel_values is not None else None
        mask = self._mask_for(input_ids, media, image_attention_mask, image_token_id)
        hidden = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, media=media, media_mask=mask,
                                    attention_mask=attention_mask)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def generate(self, input_ids, pixel_values=None, image_attention_mask=None, max_new_tokens=32, *,
                 image_token_id=None, **kwargs):
        """Prompt + new tokens (B, T + N); kwargs as minignext.generation.generate."""
        media = self.encode_images(pixel_values) if pixel_values is not None else None
        mask = self._mask_for(input_ids, media, image_attention_mask, image_token_id)
        return generate(WithMedia(self, media, mask, self.config), input_ids, max_new_tokens, **kwargs)

    def _mask_for(self, input_ids, media, image_attention_mask, image_token_id):
        """The given mask, or the one IDEFICS's processor builds: the latest image, none after an eos."""
        if media is None or image_attention_mask is not None:
            return image_attention_mask
        if image_token_id is None or input_ids is None:
            raise ValueError("with pixel_values, give image_attention_mask (batch, tokens, images) or the "
                             "image_token_id and input_ids to build it from")
        eos = self.config.eos_token_id
        return media_attention_mask(input_ids, image_token_id, num_media=media.shape[1],
                                    reset_token_id=eos if isinstance(eos, int) else None)

    def chat(self, tokenizer, items, max_new_tokens=64, **kwargs) -> str:
        """Interleaved text and images (strings, PIL images, paths or (3, H, W) tensors) -> the reply,
        with the processor's `<fake_token_around_image><image><fake_token_around_image>` markers."""
        ids, pixels = interleave(tokenizer, items, self.config.vision_config.image_size, idefics_image_marker)
        image_id = _token(tokenizer, IMAGE_TOKEN)
        out = self.generate(ids, pixels, max_new_tokens=max_new_tokens, image_token_id=image_id, **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special=True).strip()


def idefics_image_marker(last_was_image):
    """The text IDEFICS's processor writes for one image (consecutive images share a fake token)."""
    return (IMAGE_TOKEN if last_was_image else IDEFICS_FAKE_TOKEN + IMAGE_TOKEN) + IDEFICS_FAKE_TOKEN


def _as_mask(media_mask, media, x):
    if media is None:
        return None
    if media_mask is None or tuple(media_mask.shape) != (x.shape[0], x.shape[1], media.shape[1]):
        got = None if media_mask is None else tuple(media_mask.shape)
        raise ValueError(f"the media mask must be (batch, tokens, images) = "
                         f"{(x.shape[0], x.shape[1], media.shape[1])}, got {got}")
    return media_mask.bool()


# ---------------------------------------------------------------- OpenFlamingo

@dataclass
class OpenFlamingoConfig:
    """What open_flamingo's create_model_and_transforms and Flamingo(...) are given. The default
    towers are OpenFlamingo-9B's (LLaMA-7B, CLIP ViT-L/14); the block settings are the
    reference's defaults, which every released model uses."""
    text_config: LlamaConfig = field(default_factory=LlamaConfig.vicuna_7b)      # the base LLM, as saved
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig.vit_l_14)
    cross_attn_every_n_layers: int = 1    # OpenFlamingo-9B: 4
    # The tokenizer gains <|endofchunk|>, <image> and, when it has no pad token (LLaMA), <PAD>.
    added_tokens: int = 3
    eoc_token_id: int | None = None       # default: the first added id
    media_token_id: int | None = None     # default: the second added id
    freeze_lm_embeddings: bool = False
    perceiver_depth: int = 6
    perceiver_dim_head: int = 64
    perceiver_heads: int = 8
    perceiver_num_latents: int = 64
    perceiver_ff_mult: int = 4
    max_num_media: int | None = None
    max_num_frames: int | None = None
    cross_attn_dim_head: int = 64
    cross_attn_heads: int = 8
    cross_attn_ff_mult: int = 4

    def __post_init__(self):
        base = self.text_config.vocab_size
        self.vocab_size = base + self.added_tokens
        self.vis_dim = self.vision_config.hidden_size
        self.eoc_token_id = base if self.eoc_token_id is None else self.eoc_token_id
        self.media_token_id = base + 1 if self.media_token_id is None else self.media_token_id
        for name in ("eoc_token_id", "media_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary of {self.vocab_size}")

    @classmethod
    def tiny(cls, **overrides) -> "OpenFlamingoConfig":
        text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, max_position_embeddings=128)
        vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=16, patch_size=8, with_projection=False)
        return cls(**{**dict(text_config=text, vision_config=vision, cross_attn_every_n_layers=2, perceiver_depth=2,
                             perceiver_dim_head=8, perceiver_heads=2, perceiver_num_latents=4, cross_attn_dim_head=8,
                             cross_attn_heads=4), **overrides})


class OpenFlamingo(nn.Module):
    """Keys as in OpenFlamingo's state dict: `vision_encoder` (a CLIPVision in the HF layout),
    `perceiver`, `lang_encoder` (a Llama), and each gated block inside the LLaMA layer it runs
    before, as `lang_encoder.model.layers.{i}.gated_cross_attn_layer` (FlamingoLayer's name)."""

    def __init__(self, config: OpenFlamingoConfig, vision_encoder=None, lang_encoder=None):
        super().__init__()
        c = self.config = config
        self.vision_encoder = vision_encoder if vision_encoder is not None else CLIPVision(c.vision_config)
        self.perceiver = PerceiverResampler(dim=c.vis_dim, depth=c.perceiver_depth, dim_head=c.perceiver_dim_head,
                                            heads=c.perceiver_heads, num_latents=c.perceiver_num_latents,
                                            max_num_media=c.max_num_media, max_num_frames=c.max_num_frames,
                                            ff_mult=c.perceiver_ff_mult)
        self.lang_encoder = lang_encoder if lang_encoder is not None else Llama(c.text_config)
        if self.lang_encoder.config.vocab_size != c.vocab_size:
            self.lang_encoder.resize_token_embeddings(c.vocab_size)
        for i, layer in enumerate(self.lang_encoder.model.layers):
            if (i + 1) % c.cross_attn_every_n_layers == 0:
                layer.gated_cross_attn_layer = GatedCrossAttentionBlock(
                    dim=c.text_config.hidden_size, dim_visual=c.vis_dim, dim_head=c.cross_attn_dim_head,
                    heads=c.cross_attn_heads, ff_mult=c.cross_attn_ff_mult)

    @property
    def lm_head(self):
        return self.lang_encoder.lm_head

    def setup_cache(self, *args, **kwargs):
        self.lang_encoder.setup_cache(*args, **kwargs)

    def clear_cache(self):
        self.lang_encoder.clear_cache()

    # ------------------------------------------------------------ trainables and checkpoint.pt

    def freeze(self) -> "OpenFlamingo":
        """As open_flamingo's factory: all frozen but the perceiver, the gated blocks and (unless
        freeze_lm_embeddings) the input embeddings."""
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        for layer in self.lang_encoder.model.layers:
            if hasattr(layer, "gated_cross_attn_layer"):
                layer.gated_cross_attn_layer.requires_grad_(True)
        if not self.config.freeze_lm_embeddings:
            self.lang_encoder.model.embed_tokens.requires_grad_(True)
        return self

    def is_checkpoint_key(self, key) -> bool:
        """What OpenFlamingo's checkpoint.pt holds: the trainables, and the embedding matrix even
        when frozen (its rows for the added tokens); a tied lm_head is saved under its own name too."""
        return (key.startswith("perceiver.") or ".gated_cross_attn_layer." in key
                or key == "lang_encoder.model.embed_tokens.weight"
                or (key == "lang_encoder.lm_head.weight" and self.lang_encoder.config.tie_word_embeddings))

    def trainable_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if self.is_checkpoint_key(k)}

    def save_checkpoint(self, path, overwrite=False) -> Path:
        """The trainables alone, as checkpoint.pt (torch.save) or as .safetensors with the same keys."""
        path = Path(path)
        state = {k: v.detach().cpu() for k, v in self.trainable_state_dict().items()}
        if path.suffix == ".safetensors":
            return weights.save_safetensors(state, path, overwrite=overwrite)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in state.items()}, path)
        return path

    @classmethod
    def from_pretrained(cls, checkpoint, lang_encoder, vision_encoder, dtype=None, device=None,
                        **settings) -> "OpenFlamingo":
        """checkpoint: the released checkpoint.pt (read with weights_only=True), a training checkpoint
        holding `model_state_dict`, or a .safetensors with the same keys. lang_encoder and
        vision_encoder: Hugging Face folders of the base LLaMA and the CLIP vision tower, each loaded
        strictly (or a tower already loaded whose output has `last_hidden_state`). settings:
        OpenFlamingoConfig fields (cross_attn_every_n_layers=4 for OpenFlamingo-9B)."""
        llm = Llama.from_pretrained(lang_encoder, dtype=dtype, device=device)
        vision = (vision_encoder if isinstance(vision_encoder, nn.Module)
                  else CLIPVision.from_pretrained(vision_encoder, dtype=dtype, device=device))
        config = OpenFlamingoConfig(text_config=llm.config, vision_config=vision.config, **settings)
        model = weights.build_on_meta(lambda c: cls(c, vision, llm), config)
        trainables = read_trainables(checkpoint)
        expected = model.trainable_state_dict()
        weights.check_state_dict(expected, trainables, where=f"OpenFlamingo's trainables (read from {checkpoint}; "
                                 f"cross_attn_every_n_layers={config.cross_attn_every_n_layers})")
        rest = {k: v for k, v in model.state_dict().items() if k not in expected}
        weights.load_into(model, {**rest, **trainables}, dtype=dtype, device=device)
        if llm.config.tie_word_embeddings:
            llm.lm_head.weight = llm.model.embed_tokens.weight
        return model.eval()

    # ------------------------------------------------------------ running

    def encode_vision_x(self, vision_x):
        """(B, N, F, C, H, W): N images (F = 1) or videos of F frames -> latents (B, N, n, D)."""
        if vision_x.dim() != 6:
            raise ValueError(f"vision_x must be (batch, media, frames, channels, height, width), "
                             f"got {tuple(vision_x.shape)}")
        b, n, f = vision_x.shape[:3]
        with torch.no_grad():   # the vision tower is frozen, as in the reference
            tokens = self.vision_encoder(vision_x.flatten(0, 2)).last_hidden_state[:, 1:]
        return self.perceiver(tokens.reshape(b, n, f, *tokens.shape[1:]))

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, media=None, media_mask=None, input_pos=None,
                      attention_mask=None):
        layers = self.lang_encoder.model.layers

        def before_layer(i, x):
            block = getattr(layers[i], "gated_cross_attn_layer", None)
            return x if block is None else block(x, media, _as_mask(media_mask, media, x))

        return self.lang_encoder.hidden_states(input_ids, inputs_embeds=inputs_embeds, input_pos=input_pos,
                                               attention_mask=attention_mask, before_layer=before_layer)

    def forward(self, vision_x, lang_x, attention_mask=None, return_hidden=False):
        """Logits (B, T, vocab) for token ids lang_x (B, T) whose `<image>` tokens mark where each
        item of vision_x (B, N, F, C, H, W) sits; attention_mask (B, T) marks right padding."""
        media = self.encode_vision_x(vision_x)
        mask = media_attention_mask(lang_x, self.config.media_token_id, num_media=media.shape[1])
        hidden = self.hidden_states(lang_x, media=media, media_mask=mask, attention_mask=attention_mask)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def generate(self, vision_x, lang_x, max_new_tokens=32, **kwargs):
        """Prompt + new tokens (B, T + N); stops at <|endofchunk|> unless stop_token_ids says otherwise."""
        media = self.encode_vision_x(vision_x)
        mask = media_attention_mask(lang_x, self.config.media_token_id, num_media=media.shape[1])
        kwargs.setdefault("stop_token_ids", [self.config.eoc_token_id])
        return generate(WithMedia(self, media, mask, self.lang_encoder.config), lang_x, max_new_tokens, **kwargs)

    def chat(self, tokenizer, items, max_new_tokens=64, **kwargs) -> str:
        """Interleaved text and images (or videos: `interleave`) -> the reply; each becomes `<image>`, and
        the text carries its own `<|endofchunk|>` after each example, as in OpenFlamingo's few-shot prompts."""
        ids, pixels = interleave(tokenizer, items, self.config.vision_config.image_size, lambda _: IMAGE_TOKEN)
        for name, want in ((IMAGE_TOKEN, self.config.media_token_id), (END_OF_CHUNK, self.config.eoc_token_id)):
            if _token(tokenizer, name) != want:
                raise ValueError(f"the tokenizer gives {name} the id {_token(tokenizer, name)}, the model expects {want}")
        out = self.generate(pixels if pixels.dim() == 6 else pixels.unsqueeze(2), ids, max_new_tokens, **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special=True).strip()


def checkpoint_key(key, tensor):
    """OpenFlamingo's saved keys -> this model's: a DDP `module.` prefix goes; the code of the
    first release also saved each gated block a second time as lang_encoder.gated_cross_attn_layers.{i}."""
    key = key.removeprefix("module.")
    alias = re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", key)
    if alias:
        key = f"lang_encoder.model.layers.{alias[1]}.gated_cross_attn_layer.{alias[2]}"
    return [(key, tensor)]


WRONG_FILES = (   # (a key prefix, what the file then is)
    ("lang_encoder.transformer.", "an OpenFlamingo checkpoint on an MPT language model; this OpenFlamingo wraps LLaMA"),
    ("lang_encoder.gpt_neox.", "an OpenFlamingo checkpoint on a GPT-NeoX language model; this OpenFlamingo wraps LLaMA"),
    ("model.gated_cross_attn_layers.", "an IDEFICS checkpoint; load its folder with Idefics.from_pretrained"),
    ("model.layers.", "a language model's own weights; pass its folder as lang_encoder="),
    ("vision_model.", "a CLIP vision tower; pass its folder as vision_encoder="),
)


def read_trainables(path) -> dict:
    """The trainables of an OpenFlamingo checkpoint under this model's keys, or a WeightsError
    that names the file and what it holds instead."""
    path = Path(path)
    raw = weights.load_safetensors(path) if path.suffix == ".safetensors" else weights.load_pickle(path)
    out = {}
    for key, tensor in raw.items():
        for k, t in checkpoint_key(key, tensor):
            if k in out and not torch.equal(out[k], t):
                raise weights.WeightsError(f"{path}: two different tensors for {k}")
            out[k] = t
    if not any(k.startswith("perceiver.") for k in out):
        for prefix, what in WRONG_FILES:
            if any(k.startswith(prefix) for k in out):
                raise weights.WeightsError(f"{path} is {what}, not OpenFlamingo's trainables (no perceiver.* keys)")
    return out


# ---------------------------------------------------------------- generation and prompts

class WithMedia:
    """A Flamingo-style model with its media fixed, shaped as minignext.generation wants: prompt
    tokens see the items their mask rows name, and each new token sees what the last prompt
    token saw (OpenFlamingo's cached media; IDEFICS repeats the last mask row)."""

    def __init__(self, model, media, media_mask, config):
        self.model, self.media, self.media_mask, self.config = model, media, media_mask, config
        self.lm_head = model.lm_head

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, input_pos=None):
        mask = self.media_mask
        if mask is not None and input_pos:
            mask = mask[:, -1:].expand(-1, input_ids.shape[1], -1)
        return self.model.hidden_states(input_ids, inputs_embeds=inputs_embeds, media=self.media, media_mask=mask,
                                        input_pos=input_pos)

    def setup_cache(self, *args, **kwargs):
        self.model.setup_cache(*args, **kwargs)

    def clear_cache(self):
        self.model.clear_cache()


def _token(tokenizer, name) -> int:
    i = tokenizer.token_to_id(name)
    if i is None:
        raise ValueError(f"the tokenizer has no {name} token; add it (tokenizer.add_special_tokens) as the model was trained")
    return i


def interleave(tokenizer, items, image_size, marker):
    """Strings and media in reading order -> ids (1, T) with BOS, and pixels (1, N, 3, S, S), or
    (1, N, F, 3, S, S) when every medium is a video of F frames (a uint8 (F, H, W, 3) array or an
    (F, 3, S, S) tensor). `marker(last_was_image)` is the text that stands for one medium."""
    text, media, last_was_image = "", [], False
    for item in items:
        if isinstance(item, str):
            text, last_was_image = text + item, False
            continue
        if torch.is_tensor(item):
            if item.dim() not in (3, 4) or tuple(item.shape[-3:]) != (3, image_size, image_size):
                raise ValueError(f"an image tensor must be (3, {image_size}, {image_size}) and a video's "
                                 f"(frames, 3, {image_size}, {image_size}), got {tuple(item.shape)}")
            media.append(item.float())
        else:
            media.append(media_io.preprocess_image(item, size=image_size))
        text, last_was_image = text + marker(last_was_image), True
    if not media:
        raise ValueError("give at least one image among the items")
    if len({x.shape for x in media}) > 1:
        shapes = [tuple(x.shape) for x in media]
        raise ValueError(f"one prompt's media must be all images or all videos of as many frames: {shapes}")
    return torch.tensor([tokenizer.encode(text)]), torch.stack(media)[None]


__all__ = ["IdeficsConfig", "IdeficsVisionConfig", "IdeficsPerceiverConfig", "Idefics", "DecoupledEmbedding",
           "DecoupledLinear", "OpenFlamingoConfig", "OpenFlamingo", "read_trainables", "checkpoint_key", "WithMedia",
           "interleave", "idefics_image_marker"]
