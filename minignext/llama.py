"""LLaMA (Touvron et al. 2023, arXiv 2302.13971), the language model of NExT-GPT.

NExT-GPT runs Vicuna-7B-v0, a fine-tuned LLaMA-7B. This file mirrors the module
layout of transformers' `LlamaForCausalLM` (modeling_llama.py), so that the
attribute names are the checkpoint keys and a public safetensors file loads with
no remapping:

    model.embed_tokens -> N x [input_layernorm, self_attn, post_attention_layernorm, mlp]
    -> model.norm -> lm_head

The pieces: RMSNorm (Zhang & Sennrich 2019), rotary position embeddings in the
"rotate-half" layout (Su et al. 2021, RoFormer eq. 34 with the two halves of each
head paired instead of neighbours), grouped-query attention (Ainslie et al. 2023)
and the SwiGLU MLP (Shazeer 2020). Attention itself is minignext.attention.

Decoding uses a static KV cache, gpt-fast style: `setup_cache()` preallocates
(B, Hkv, Tmax, D) per layer and each forward writes its keys and values at their
positions in place. Generation loops live in minignext/generation.py.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minignext import weights
from minignext.attention import attention
from minignext.utils import config_from_dict


@dataclass
class LlamaConfig:
    """Defaults are transformers' LlamaConfig defaults (LLaMA-7B); `tiny()` for tests and lessons."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008          # SwiGLU width; LLaMA uses about 8/3 * hidden
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # < num_attention_heads means grouped-query attention
    head_dim: int | None = None             # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 2048     # length of the RoPE tables and the longest prompt
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0             # RoPE base: frequencies theta^(-2i/d)
    tie_word_embeddings: bool = False       # lm_head shares the embedding matrix
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From a transformers config.json dict. `rope_theta` sits at the top level in
        older files and inside `rope_parameters` in transformers 5."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported; minignext implements the "
                             f"original (default) rotary embedding only")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; LLaMA uses 'silu'")
        theta = rope.get("rope_theta", d.get("rope_theta", cls.rope_theta))
        extra = {}
        if "max_position_embeddings" not in d and "max_sequence_length" in d:   # 2023-era LLaMA configs
            extra["max_position_embeddings"] = d["max_sequence_length"]
        return config_from_dict(cls, d, rope_theta=float(theta), **extra)

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A small random-weights model: 2 layers of width 64 over a 256-token vocabulary."""
        return cls(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=512), **overrides})

    @classmethod
    def vicuna_7b(cls) -> "LlamaConfig":
        """Vicuna-7B-v0 (LLaMA-7B) before NExT-GPT adds its 38 tokens."""
        return cls(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; computed in fp32 and scaled
    after casting back, like the reference."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(head_dim, max_positions, theta, device=None):
    """cos and sin of shape (max_positions, head_dim): angle p * theta^(-2i/d), the
    frequencies repeated for the two halves (the rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    angles = torch.arange(max_positions, device=device, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q, k, cos, sin):
    """Rotate q, k (B, H, T, D) by the angles in cos, sin (T, D)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class KVCache(nn.Module):
    """Preallocated keys and values (B, Hkv, Tmax, D), written in place at their positions."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        return kv_cache_update(self.k_cache, self.v_cache, k, v, start)


def kv_cache_update(cache_k, cache_v, k, v, start: int):
    """Write k, v (B, Hkv, T, D) in place at positions start..start+T-1 of the caches
    (B, Hkv, Tmax, D); return views of the filled prefix, positions 0..start+T-1."""
    stop = start + k.shape[2]
    cache_k[:, :, start:stop] = k
    cache_v[:, :, start:stop] = v
    return cache_k[:, :, :stop], cache_v[:, :, :stop]


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.kv_cache = None

    def forward(self, x, cos, sin, start, key_padding_mask=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)   # cached before any GQA repeat
        y = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, f, bias=bias)
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, start, key_padding_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, key_padding_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The transformer body (HF `model.`): embeddings, layers, final norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_buffers(self.embed_tokens.weight.device)

    def init_buffers(self, device):
        cos, sin = rope_tables(self.config.head_dim, self.config.max_position_embeddings,
                               self.config.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, inputs_embeds, start=0, attention_mask=None, before_layer=None):
        """`before_layer(i, x) -> x`, if given, runs before layer i: the place where Flamingo-style
        models insert their cross-attention blocks without touching the layers themselves."""
        t = inputs_embeds.shape[1]
        cache = self.layers[0].self_attn.kv_cache
        limit = cache.k_cache.shape[2] if cache is not None else self.config.max_position_embeddings
        if start + t > limit:
            what = "the KV cache" if cache is not None else "max_position_embeddings"
            raise ValueError(f"sequence too long: positions {start}..{start + t - 1} do not fit {what} "
                             f"({limit} positions); shorten the prompt or generate fewer tokens")
        if attention_mask is not None and (cache is not None or start != 0):
            raise ValueError("attention_mask (padding) is supported only for a full forward without the KV cache")
        cos = self.rope_cos[start:start + t].to(inputs_embeds.dtype)
        sin = self.rope_sin[start:start + t].to(inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                x = before_layer(i, x)
            x = layer(x, cos, sin, start, attention_mask)
        return self.norm(x)


class Llama(nn.Module):
    """LLaMA with its language-model head (HF `LlamaForCausalLM`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None) -> "Llama":
        folder = weights.resolve(path_or_repo_id)
        return cls.from_checkpoint(weights.read_config(folder), weights.load_checkpoint(folder), dtype, device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict, dtype=None, device=None) -> "Llama":
        """A config.json dict and the tensors as the file stores them -> the model (from_pretrained
        without the files; the tensors may be on meta)."""
        config = LlamaConfig.from_hf(config)
        tensors = fill_tied_head(config, weights.remap_state_dict(tensors, legacy_key))
        model = weights.load_model(cls, config, tensors, dtype=dtype, device=device)
        model.tie_weights()
        return model

    def tie_weights(self):
        """Share the embedding with lm_head again if the config ties them (a load with
        assign=True makes them two parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids=None, *, inputs_embeds=None, input_pos=None, attention_mask=None,
                return_hidden=False):
        """Logits (B, T, V) for `input_ids` (B, T) or `inputs_embeds` (B, T, hidden).

        input_pos: position of the first token (int, or a tensor of consecutive positions);
        0 by default. With a KV cache set up, keys and values are written there.
        attention_mask: optional (B, T) bool, True on real tokens (right padding, no cache).
        """
        hidden = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, input_pos=input_pos,
                                    attention_mask=attention_mask)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, input_pos=None, attention_mask=None,
                      before_layer=None):
        """The last hidden states after the final norm, without the head (`before_layer`: see LlamaModel)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, hidden)")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, tokens, {self.config.hidden_size}), "
                             f"got shape {tuple(inputs_embeds.shape)}")
        return self.model(inputs_embeds, _start(input_pos, inputs_embeds.shape[1]), attention_mask, before_layer)

    # ------------------------------------------------------------ KV cache

    def setup_cache(self, batch_size, max_seq_len, dtype=None, device=None):
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        param = self.lm_head.weight
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len, c.num_key_value_heads, c.head_dim,
                                               dtype or param.dtype, device or param.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @property
    def cache_size(self):
        """(batch, max_seq_len) of the current KV cache, or None."""
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else (cache.k_cache.shape[0], cache.k_cache.shape[2])

    # ------------------------------------------------------------ vocabulary

    def resize_token_embeddings(self, new_vocab: int) -> range:
        """Grow the vocabulary to `new_vocab`; new rows start at the mean of the old ones.
        Returns the ids of the new rows."""
        old = self.config.vocab_size
        if new_vocab < old:
            raise ValueError(f"can only grow the vocabulary: {old} -> {new_vocab}")

        def grown(w):
            extra = w.detach().float().mean(0, keepdim=True).expand(new_vocab - old, -1).to(w.dtype)
            return nn.Parameter(torch.cat([w.detach(), extra]), requires_grad=w.requires_grad)

        self.model.embed_tokens.weight = grown(self.model.embed_tokens.weight)
        self.model.embed_tokens.num_embeddings = new_vocab
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = new_vocab
        self.config = dataclasses.replace(self.config, vocab_size=new_vocab)
        self.model.config = self.config
        return range(old, new_vocab)

    def generate(self, input_ids=None, max_new_tokens=32, **kwargs):
        """See minignext.generation.generate."""
        from minignext.generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)


# Buffers that transformers 4.28-4.30 saved with LLaMA weights (Vicunas merged then carry them);
# the model computes them itself from the config.
LEGACY_BUFFERS = ("self_attn.rotary_emb.inv_freq",)


def legacy_key(key, tensor):
    return [] if key.endswith(LEGACY_BUFFERS) else [(key, tensor)]


def fill_tied_head(config: LlamaConfig, sd: dict, prefix="") -> dict:
    """transformers saves a tied matrix once, under the embedding's name: give lm_head its copy."""
    if config.tie_word_embeddings and prefix + "model.embed_tokens.weight" in sd:
        sd.setdefault(prefix + "lm_head.weight", sd[prefix + "model.embed_tokens.weight"])
    return sd


def _start(input_pos, t):
    if input_pos is None:
        return 0
    if isinstance(input_pos, int):
        return input_pos
    if input_pos.dim() != 1 or input_pos.numel() != t:
        raise ValueError(f"input_pos must be an int or a 1-D tensor of {t} positions, "
                         f"got shape {tuple(input_pos.shape)}")
    start = int(input_pos[0])
    if t > 1 and int(input_pos[-1]) - start != t - 1:
        raise ValueError("input_pos must hold consecutive positions")
    return start
