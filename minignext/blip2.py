"""BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models", arXiv 2301.12597): the frozen EVA-ViT-g image encoder, the
Querying Transformer (Q-Former) and its image-text retrieval heads, in the on-disk layout of
Hugging Face transformers' BLIP-2 models (transformers/models/blip_2/modeling_blip_2.py). The
original code is Salesforce LAVIS (lavis/models/eva_vit.py, blip2_models/Qformer.py and
blip2_qformer.py); `lavis_key()` renames its files to this layout.

Vision model   a pre-norm ViT (EVA-ViT-g: 39 blocks of width 1408, exact GELU): CLIP's blocks
               (minignext.clip) with EVA's attention, which computes q, k and v with one fused
               matrix and has biases on q and v only. They are parameters here, as in LAVIS;
               transformers' files fold them into `qkv.bias` and `hf_key` splits it.
               `post_layernorm` (LAVIS's `ln_vision`) normalises every output token. (LAVIS
               builds ln_vision with eps 1e-5; transformers uses layer_norm_eps, 1e-6.) With
               `pre_layernorm`, a LayerNorm also normalises the tokens before the first block, as
               in CLIP-style ViTs (LAVIS's CLIP ViT-L, `ln_pre`; the toy ImageBind's vision branch);
               EVA and transformers' model have none, and it is off by default.
Q-Former       a BERT encoder (post-norm: LayerNorm(x + sublayer(x))) whose input is a set of
               learned query tokens. The queries attend to each other, and on every
               `cross_attention_frequency`-th block they also attend to the image tokens. Text
               tokens may ride along after the queries: they share the self-attention and have
               their own feed-forward (`intermediate`, `output`); the queries use
               `intermediate_query`, `output_query`.
Retrieval      stage-1 pretraining's heads: image-text contrastive (ITC: each query projected
               and normalised, the best query's cosine with the text's first token) and
               image-text matching (ITM: queries and text in one sequence, a 2-way classifier
               averaged over the queries). `itc_loss`, `sample_hard_negatives` and `itm_loss`
               are the losses of LAVIS's Blip2Qformer.forward.
Inspection     `query_attention`: each query's cross-attention over the image tokens (what the
               queries look at), as transformers returns it with output_attentions.

Dropout: `hidden_dropout_prob` acts in training mode; attention-probability dropout is not
applied.
"""

import dataclasses
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minignext import weights
from minignext.attention import attention
from minignext.clip import ACTIVATIONS, CLIPEncoder
from minignext.llama import LlamaConfig
from minignext.utils import config_from_dict


# ---------------------------------------------------------------- configs

@dataclass
class Blip2VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39          # EVA-CLIP-g has 40: BLIP-2 reads the second-to-last
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True                # q_bias and v_bias (there is never a key bias)
    pre_layernorm: bool = False          # a LayerNorm before block 0: CLIP-style ViTs have one, EVA has none

    def __post_init__(self):
        _check(self)
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise ValueError(f"square images and patches only: image_size {self.image_size!r}, "
                             f"patch_size {self.patch_size!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.num_patches = (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict):
        return config_from_dict(cls, d.get("vision_config") or d)

    @classmethod
    def tiny(cls):
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=28, patch_size=7)


@dataclass
class Blip2QFormerConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2   # blocks 0, f, 2f, ... attend to the image
    encoder_hidden_size: int = 1408      # width of the image tokens
    use_qformer_text_input: bool = False # the text feed-forward (retrieval needs it; MiniGPT-4 has none)

    def __post_init__(self):
        _check(self)
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")

    @classmethod
    def from_hf(cls, d: dict):
        return config_from_dict(cls, d.get("qformer_config") or d)

    @classmethod
    def tiny(cls, use_qformer_text_input=False):
        return cls(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=64, encoder_hidden_size=32,
                   use_qformer_text_input=use_qformer_text_input)


@dataclass
class Blip2Config:
    vision_config: Blip2VisionConfig = field(default_factory=Blip2VisionConfig)
    qformer_config: Blip2QFormerConfig = field(default_factory=Blip2QFormerConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256    # the ITC embedding width
    image_token_index: int | None = None # placeholder id of the query outputs in the LLM prompt
    text_config: LlamaConfig | None = None

    def __post_init__(self):
        # the Q-Former's cross-attention reads the vision model's tokens, whatever its file says
        if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size:
            self.qformer_config = dataclasses.replace(self.qformer_config,
                                                      encoder_hidden_size=self.vision_config.hidden_size)

    @classmethod
    def from_hf(cls, d: dict, with_language_model=True):
        """From a transformers config.json. Its text_config (which transformers fills with an OPT
        model when none is given) is read only `with_language_model`."""
        text = d.get("text_config") if with_language_model else None
        if text and text.get("model_type", "llama") != "llama":
            raise ValueError(f"BLIP-2's language model here is LLaMA; this config has "
                             f"text_config.model_type {text['model_type']!r}")
        return config_from_dict(cls, d, vision_config=Blip2VisionConfig.from_hf(d.get("vision_config") or {}),
                                qformer_config=Blip2QFormerConfig.from_hf(d.get("qformer_config") or {}),
                                text_config=LlamaConfig.from_hf(text) if text else None)

    @classmethod
    def tiny(cls, use_qformer_text_input=True, text_config=None, image_token_index=None):
        return cls(vision_config=Blip2VisionConfig.tiny(),
                   qformer_config=Blip2QFormerConfig.tiny(use_qformer_text_input),
                   num_query_tokens=4, image_text_hidden_size=16, image_token_index=image_token_index,
                   text_config=text_config)


def _check(c):
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(f"hidden_size {c.hidden_size} is not divisible by {c.num_attention_heads} heads")
    if c.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {c.hidden_act!r}")


# ---------------------------------------------------------------- vision model (HF names)

@dataclass
class Blip2VisionOutput:
    last_hidden_state: torch.Tensor      # (B, 1 + P, D), after post_layernorm
    pooler_output: torch.Tensor          # (B, D)
    hidden_states: tuple | None = None   # input of block 0, then every block's output


class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, c: Blip2VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.hidden_size))

    def forward(self, pixels):
        patches = rearrange(self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)),
                            "b d h w -> b (h w) d")
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class Blip2Attention(nn.Module):
    """EVA's attention: one fused qkv matrix without bias, and separate biases for q and v."""

    def __init__(self, c: Blip2VisionConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=False)
        if c.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(c.hidden_size))
            self.v_bias = nn.Parameter(torch.zeros(c.hidden_size))
        self.projection = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, causal=False, key_padding_mask=None):
        bias = None
        if hasattr(self, "q_bias"):
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = rearrange(F.linear(x, self.qkv.weight, bias), "b t (n h d) -> n b h t d", n=3, h=self.num_heads)
        y = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        return self.projection(rearrange(y, "b h t d -> b t (h d)"))


class Blip2VisionModel(nn.Module):
    """Images (B, 3, S, S), CLIP-normalised, S = image_size -> Blip2VisionOutput."""

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Blip2VisionEmbeddings(config)
        if config.pre_layernorm:
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, attention_cls=Blip2Attention)    # CLIP's pre-norm blocks
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values, output_hidden_states=False) -> Blip2VisionOutput:
        s = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"Blip2VisionModel wants images (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}")
        tokens = self.embeddings(pixel_values)
        states = self.encoder(self.pre_layernorm(tokens) if hasattr(self, "pre_layernorm") else tokens)
        last = self.post_layernorm(states[-1])
        # transformers normalises the class token a second time for the pooled output
        return Blip2VisionOutput(last, self.post_layernorm(last[:, 0]),
                                 tuple(states) if output_hidden_states else None)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return load_hf(cls, Blip2VisionConfig.from_hf, path, dtype, device)


# ---------------------------------------------------------------- Q-Former (HF names)

class Blip2QFormerMultiHeadAttention(nn.Module):
    def __init__(self, c: Blip2QFormerConfig, kv_dim: int):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(kv_dim, c.hidden_size)
        self.value = nn.Linear(kv_dim, c.hidden_size)

    def forward(self, x, context, key_padding_mask=None):
        split = lambda t: rearrange(t, "b t (h d) -> b h t d", h=self.num_heads)
        y = attention(split(self.query(x)), split(self.key(context)), split(self.value(context)),
                      key_padding_mask=key_padding_mask)
        return rearrange(y, "b h t d -> b t (h d)")


class Blip2QFormerAddNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(residual + dropout(dense(x))). transformers calls it
    Blip2QFormerSelfOutput after attention and Blip2QFormerOutput after the feed-forward."""

    def __init__(self, c: Blip2QFormerConfig, in_dim: int):
        super().__init__()
        self.p = c.hidden_dropout_prob
        self.dense = nn.Linear(in_dim, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(residual + F.dropout(self.dense(x), self.p, self.training))


class Blip2QFormerAttention(nn.Module):
    def __init__(self, c: Blip2QFormerConfig, cross=False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(c, c.encoder_hidden_size if cross else c.hidden_size)
        self.output = Blip2QFormerAddNorm(c, c.hidden_size)

    def forward(self, x, context=None, key_padding_mask=None):
        return self.output(self.attention(x, x if context is None else context, key_padding_mask), x)


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, c: Blip2QFormerConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return self.act(self.dense(x))


class Blip2QFormerLayer(nn.Module):
    def __init__(self, c: Blip2QFormerConfig, index: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(c)
        self.has_cross_attention = index % c.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(c, cross=True)
        if c.use_qformer_text_input:
            self.intermediate = Blip2QFormerIntermediate(c)
            self.output = Blip2QFormerAddNorm(c, c.intermediate_size)
        self.intermediate_query = Blip2QFormerIntermediate(c)
        self.output_query = Blip2QFormerAddNorm(c, c.intermediate_size)

    def forward(self, x, num_queries, mask=None, image=None, image_mask=None):
        x = self.attention(x, key_padding_mask=mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if num_queries and self.has_cross_attention:
            queries = self.crossattention(queries, image, image_mask)
        parts = []
        if num_queries:
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1]:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, c: Blip2QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(Blip2QFormerLayer(c, i) for i in range(c.num_hidden_layers))


class Blip2QFormerModel(nn.Module):
    """embeds (B, N + T, H): N query tokens, then T text-token embeddings (or only one of the two).
    The queries cross-attend to `encoder_hidden_states` (B, P, encoder_hidden_size).
    attention_mask (B, N + T) and encoder_attention_mask (B, P): True (or 1) on real tokens.
    Returns the last hidden states (B, N + T, H)."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(config)

    def forward(self, query_embeds, query_length=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        c = self.config
        n = query_embeds.shape[1] if query_length is None else query_length
        if query_embeds.dim() != 3 or query_embeds.shape[-1] != c.hidden_size:
            raise ValueError(f"the Q-Former wants embeddings (B, T, {c.hidden_size}), got {tuple(query_embeds.shape)}")
        if n and encoder_hidden_states is None:
            raise ValueError("query tokens need encoder_hidden_states (the image tokens) to cross-attend to")
        if query_embeds.shape[1] > n and not c.use_qformer_text_input:
            raise ValueError("this Q-Former has no text feed-forward (use_qformer_text_input=False): "
                             "pass query tokens only")
        x = F.dropout(self.layernorm(query_embeds), c.hidden_dropout_prob, self.training)
        mask = None if attention_mask is None else attention_mask.bool()
        image_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, n, mask, encoder_hidden_states, image_mask)
        return x

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return load_hf(cls, Blip2QFormerConfig.from_hf, path, dtype, device)


def query_features(vision_model, query_tokens, qformer, pixel_values):
    """Images -> (the vision model's output, the Q-Former's query outputs (B, N, H))."""
    image = vision_model(pixel_values).last_hidden_state
    queries = query_tokens.expand(image.shape[0], -1, -1)
    return image, qformer(queries, encoder_hidden_states=image)


@torch.no_grad()
def query_attention(qformer, query_embeds, image) -> torch.Tensor:
    """What each query looks at: the cross-attention probabilities of every block that cross-attends,
    (B, blocks, heads, N, P), for queries (B, N, H) over image tokens (B, P, E). Attention runs fused
    and keeps no probabilities, so they are recomputed from what each cross-attention was given."""
    seen = []
    hooks = [layer.crossattention.attention.register_forward_hook(lambda m, args, out: seen.append((m, *args[:2])))
             for layer in qformer.encoder.layer if layer.has_cross_attention]
    try:
        qformer(query_embeds, encoder_hidden_states=image)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for m, x, context in seen:
        q, k = (rearrange(t, "b t (h d) -> b h t d", h=m.num_heads) for t in (m.query(x), m.key(context)))
        maps.append((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1))
    return torch.stack(maps, dim=1)


# ---------------------------------------------------------------- retrieval heads (stage 1)

class Blip2TextEmbeddings(nn.Module):
    def __init__(self, c: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids, query_embeds=None):
        if input_ids.dim() != 2 or input_ids.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"text ids must be (B, T) with T <= {self.position_embeddings.num_embeddings}, "
                             f"got {tuple(input_ids.shape)}")
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[: input_ids.shape[1]]
        return x if query_embeds is None else torch.cat([query_embeds, x], dim=1)


@dataclass
class Blip2RetrievalOutput:
    logits_per_image: torch.Tensor       # ITC: (B_image, B_text) cosines; ITM: (B, 2)
    logits_per_text: torch.Tensor        # its transpose
    image_embeds: torch.Tensor | None = None   # ITC: (B, N, E), one normalised vector per query
    text_embeds: torch.Tensor | None = None    # ITC: (B, E); ITM: the Q-Former's output (B, N + T, H)


class Blip2ForImageTextRetrieval(nn.Module):
    def __init__(self, config: Blip2Config):
        super().__init__()
        if not config.qformer_config.use_qformer_text_input:
            raise ValueError("retrieval reads text through the Q-Former: set use_qformer_text_input=True")
        self.config = config
        q = config.qformer_config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size))
        self.embeddings = Blip2TextEmbeddings(q)
        self.qformer = Blip2QFormerModel(q)
        self.vision_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(q.hidden_size, 2)

    def image_features(self, image):
        """Image tokens (B, P, D) -> ITC features (B, N, E): every query projected and normalised."""
        queries = self.qformer(self.query_tokens.expand(image.shape[0], -1, -1), encoder_hidden_states=image)
        return F.normalize(self.vision_projection(queries), dim=-1)

    def text_features(self, input_ids, attention_mask=None):
        """Text ids (B, T) -> ITC features (B, E): the first token's state, projected and normalised."""
        states = self.qformer(self.embeddings(input_ids), query_length=0, attention_mask=attention_mask)
        return F.normalize(self.text_projection(states[:, 0]), dim=-1)

    def itm_logits(self, image, input_ids, attention_mask=None):
        """Image tokens (B, P, D) and text (B, T) -> (B, 2) match logits (index 1 = match), and the
        Q-Former's output (B, N + T, H)."""
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        n = queries.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device),
                          attention_mask.bool()], dim=1)
        states = self.qformer(self.embeddings(input_ids, queries), query_length=n, attention_mask=mask,
                              encoder_hidden_states=image)
        return self.itm_head(states[:, :n]).mean(dim=1), states

    def forward(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head=False):
        image = self.vision_model(pixel_values).last_hidden_state
        if use_image_text_matching_head:
            logits, states = self.itm_logits(image, input_ids, attention_mask)
            return Blip2RetrievalOutput(logits, logits.t(), text_embeds=states)
        image_feats = self.image_features(image)
        text_feat = self.text_features(input_ids, attention_mask)
        sim = itc_similarity(image_feats, text_feat)
        return Blip2RetrievalOutput(sim, sim.t(), image_feats, text_feat)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        read = lambda d: Blip2Config.from_hf(d, with_language_model=False)
        return load_hf(cls, read, path, dtype, device)


def itc_similarity(image_feats, text_feat):
    """(B_i, N, E) query features and (B_t, E) text features -> (B_i, B_t): for each pair, the
    cosine of the text with its best-matching query."""
    return torch.einsum("ine,te->itn", image_feats, text_feat).amax(dim=-1)


def itc_loss(image_feats, text_feat, temp, label_smoothing=0.1):
    """Symmetric InfoNCE over a batch of matching pairs (pair i = image i, text i), with the
    temperature and label smoothing of LAVIS's Blip2Qformer (temp is learned there, from 0.07)."""
    sim = itc_similarity(image_feats, text_feat) / temp
    target = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim, target, label_smoothing=label_smoothing)
            + F.cross_entropy(sim.t(), target, label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def sample_hard_negatives(sim, generator=None):
    """ITM's hard negatives from an ITC similarity (B, B) of matching pairs: for each text an
    image, and for each image a text, drawn in proportion to softmax(similarity) over the others.
    Returns (negative image index per text, negative text index per image), each (B,)."""
    if sim.shape[0] < 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"hard negatives need a square similarity of at least 2 pairs, got {tuple(sim.shape)}")
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    draw = lambda s: torch.multinomial(s.float().masked_fill(eye, float("-inf")).softmax(-1), 1, generator=generator)
    return draw(sim.t())[:, 0], draw(sim)[:, 0]


def itm_loss(logits, is_match):
    """Cross-entropy of the (B, 2) match logits against is_match (B,) (1 = the pair matches)."""
    return F.cross_entropy(logits, is_match.long())


# ---------------------------------------------------------------- loading

def hf_key(key, tensor):
    """transformers stores EVA's q and v biases as one `qkv.bias` = cat(q_bias, 0, v_bias). The
    middle third would be a key bias, which adds the same amount to every score of a query and so
    cancels in the softmax: it is dropped."""
    if key.endswith("self_attn.qkv.bias"):
        q, _, v = tensor.chunk(3)
        stem = key[: -len("qkv.bias")]
        return [(stem + "q_bias", q), (stem + "v_bias", v)]
    return [(key, tensor)]


def load_hf(cls, read_config, path, dtype=None, device=None):
    """A model from a folder in the transformers layout (config.json + safetensors)."""
    folder = weights.resolve(path)
    model = weights.build_on_meta(cls, read_config(weights.read_config(folder)))
    sd = dict(pair for k, t in weights.load_safetensors(folder).items() for pair in hf_key(k, t))
    return weights.load_into(model, sd, dtype=dtype, device=device).eval()


LAVIS_RENAMES = [   # (pattern, replacement), first match wins; LAVIS name -> this module's name
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"visual_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.(qkv\.weight|q_bias|v_bias)$", r"vision_model.encoder.layers.\1.self_attn.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc\d)\.", r"vision_model.encoder.layers.\1.mlp.\2."),
    (r"visual_encoder\.ln_pre\.", "vision_model.pre_layernorm."),
    (r"ln_vision\.", "vision_model.post_layernorm."),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.", r"qformer.encoder.layer.\1.\2.attention."),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.", r"qformer.encoder.layer.\1."),
    (r"query_tokens$", "query_tokens"),
    (r"vision_proj\.", "vision_projection."),
    (r"text_proj\.", "text_projection."),
    (r"itm_head\.", "itm_head."),
    (r"(t5|opt)_proj\.", "language_projection."),
]
# In LAVIS files but not in the transformers models: a position-id buffer, the image-grounded
# text generation head (`Qformer.cls`, stage 1's third loss) and the ITC temperature.
LAVIS_DROPPED = r"Qformer\.bert\.embeddings\.position_ids$|Qformer\.cls\.|temp$"


def lavis_key(key, tensor):
    """One tensor of a LAVIS BLIP-2 checkpoint -> [(name here, tensor)], [] for what has no place."""
    if re.match(LAVIS_DROPPED, key):
        return []
    for pattern, replacement in LAVIS_RENAMES:
        if re.match(pattern, key):
            return [(re.sub(pattern, replacement, key, count=1), tensor)]
    raise weights.WeightsError(f"no rule to rename the LAVIS key {key} (shape {tuple(tensor.shape)})")


def from_lavis(state_dict: dict) -> dict:
    return dict(pair for k, t in state_dict.items() for pair in lavis_key(k, t))
