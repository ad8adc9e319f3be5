"""The Flamingo connector (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot
Learning", arXiv 2204.14198): images never enter the token stream.

    vision tokens (B, N, F*v, D) -> perceiver resampler -> (B, N, n, D) latents per image or video
    text x (B, T, H) -> [gated cross-attention to the latents -> frozen LLM layer] x L

The perceiver resampler (section 2.1, fig. 4): n learned latents attend over the concatenation of
the media tokens and themselves, then a feed-forward; a few such blocks. The gated cross-attention
block (section 2.2, fig. 5): x + tanh(a) * xattn(x, latents), then x + tanh(b) * ffw(x), with a and
b initialised at 0, so that an untrained model is exactly the frozen LLM. Each text token sees only
the latest image before it (`media_attention_mask`); its self-attention carries earlier images on.

Two checkpoint layouts of the same blocks, each named like its keys:
    OpenFlamingo (open_flamingo/src/helpers.py):   PerceiverResampler, GatedCrossAttentionBlock
    IDEFICS (transformers/models/idefics/perceiver.py, modeling_idefics.py):
                                                   IdeficsPerceiverResampler, IdeficsGatedCrossAttentionLayer
They differ in names (to_kv fused vs k_proj/v_proj), in norms (LayerNorm vs RMSNorm around the
gated block), in the feed-forwards (GELU vs ReLU in the resampler, GELU vs SwiGLU after the
cross-attention) and in the optional per-head q/k norms of IDEFICS; the attention is the same.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minignext.attention import attention
from minignext.llama import LlamaMLP, RMSNorm


# ---------------------------------------------------------------- where each token looks

def media_attention_mask(input_ids, media_token_id: int, num_media: int | None = None,
                         reset_token_id: int | None = None) -> torch.Tensor:
    """(B, T, N) bool: True where token t may attend to media item n.

    Each `media_token_id` (`<image>`) in `input_ids` (B, T) opens the next media item of its row.
    That token and every later one see this item only, until the next `<image>`; tokens before the
    first see none (OpenFlamingo's `media_locations` rule). With `reset_token_id` (IDEFICS's
    processor passes the end-of-document token), the tokens after it see nothing until the next
    `<image>`. N is `num_media`, or the largest number of `<image>` tokens in a row.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    is_media = input_ids == media_token_id
    counts = is_media.sum(-1)
    n = int(counts.max()) if num_media is None else num_media
    if bool((counts > n).any()):
        raise ValueError(f"a row of input_ids has {int(counts.max())} <image> tokens (id {media_token_id}) "
                         f"but only {n} media items were given; give one image (or video) per <image> token")
    latest = is_media.long().cumsum(-1) - 1                       # -1 before the first <image>
    if reset_token_id is not None:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_media = torch.where(is_media, pos, -1).cummax(-1).values
        last_reset = torch.where(input_ids == reset_token_id, pos, -1).cummax(-1).values
        reset_before = F.pad(last_reset[:, :-1], (1, 0), value=-1)   # a reset strictly before t
        latest = latest.masked_fill(reset_before > last_media, -1)
    return F.one_hot(latest + 1, n + 1)[..., 1:].bool()


# ---------------------------------------------------------------- attention cores

def multihead(q, k, v, heads, attn_mask=None, q_norm=None, k_norm=None):
    """q (B, Tq, H*D), k and v (B, Tk, H*D) -> (B, Tq, H*D); optional norms act on each head."""
    q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=heads) for t in (q, k, v))
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return rearrange(attention(q, k, v, attn_mask=attn_mask), "b h t d -> b t (h d)")


def media_cross_attention(q, k, v, media_mask, heads, q_norm=None, k_norm=None):
    """Text queries q (B, T, H*D) attend to the keys and values (B, N*n, H*D) of N media items of n
    latents each, token t to the items where media_mask (B, T, N) is True. A token that sees no
    item gets exactly 0 (both references zero it; it is never a softmax over nothing)."""
    b, t, num_media = media_mask.shape
    if q.shape[:2] != (b, t) or k.shape[0] != b or num_media == 0 or k.shape[1] % num_media:
        raise ValueError(f"media_mask {tuple(media_mask.shape)} does not fit text {tuple(q.shape[:2])} "
                         f"and {k.shape[1]} media latents in batch {k.shape[0]}")
    sees = media_mask.any(-1, keepdim=True)
    mask = media_mask.repeat_interleave(k.shape[1] // num_media, dim=-1) | ~sees
    y = multihead(q, k, v, heads, mask[:, None], q_norm, k_norm)
    return y.masked_fill(~sees, 0.0)


def run_latents(blocks, media, latents):
    """The resampler loop: latents (n, D) read media (B, M, D) through (attention, feed-forward)
    pairs with residuals; attention keys are cat(media, latents)."""
    x = latents.expand(media.shape[0], -1, -1)
    for attn, ff in blocks:
        x = x + attn(media, x)
        x = x + ff(x)
    return x


# ---------------------------------------------------------------- OpenFlamingo layout

def feed_forward(dim, mult=4):
    """OpenFlamingo's FeedForward; keys 0 (norm), 1 and 3 (the linears)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, media, latents):
        media, latents = self.norm_media(media), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(multihead(self.to_q(latents), k, v, self.heads))


class PerceiverResampler(nn.Module):
    """(B, N, F, v, D): N media items of F frames of v tokens -> (B, N, num_latents, D).

    The F*v tokens of one item (an image is F = 1, a video F frames) are resampled together;
    `max_num_frames` adds a learned embedding per frame and `max_num_media` one per item, as in
    the reference (the released OpenFlamingo models use neither)."""

    def __init__(self, *, dim, depth=6, dim_head=64, heads=8, num_latents=64, max_num_media=None,
                 max_num_frames=None, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media else None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        if x.dim() != 5 or x.shape[-1] != self.latents.shape[1]:
            raise ValueError(f"the resampler wants (batch, media, frames, tokens, {self.latents.shape[1]}), "
                             f"got {tuple(x.shape)}")
        b, n, f, v, d = x.shape
        for name, table, have in (("frames", self.frame_embs, f), ("media items", self.media_time_embs, n)):
            if table is not None and have > table.shape[0]:
                raise ValueError(f"{have} {name} given, but the resampler has embeddings for {table.shape[0]}")
        if self.frame_embs is not None:
            x = x + self.frame_embs[:f, None]
        x = x.reshape(b, n, f * v, d)
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:n]
        latents = run_latents(self.layers, x.reshape(b * n, f * v, d), self.latents)
        return self.norm(latents).reshape(b, n, -1, d)


class MaskedCrossAttention(nn.Module):
    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, media, media_mask):
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        return self.to_out(media_cross_attention(self.to_q(self.norm(x)), k, v, media_mask, self.heads))


class GatedCrossAttentionBlock(nn.Module):
    """x (B, T, dim), media latents (B, N, n, dim_visual), media_mask (B, T, N) -> (B, T, dim).
    With media None only the gated feed-forward runs (no token sees an image)."""

    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, media=None, media_mask=None):
        if media is not None:
            x = x + self.attn_gate.tanh() * self.attn(x, media, media_mask)
        return x + self.ff_gate.tanh() * self.ff(x)


# ---------------------------------------------------------------- IDEFICS layout

class IdeficsPerceiverAttention(nn.Module):
    def __init__(self, embed_dim, n_heads, head_dim, qk_layer_norms=False):
        super().__init__()
        self.n_heads = n_heads
        self.context_layer_norm = nn.LayerNorm(embed_dim)
        self.latents_layer_norm = nn.LayerNorm(embed_dim)
        if qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(head_dim)
            self.k_layer_norm = nn.LayerNorm(head_dim)
        self.q_proj = nn.Linear(embed_dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, n_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(n_heads * head_dim, embed_dim, bias=False)

    def forward(self, context, latents):
        context, latents = self.context_layer_norm(context), self.latents_layer_norm(latents)
        both = torch.cat([context, latents], dim=1)
        y = multihead(self.q_proj(latents), self.k_proj(both), self.v_proj(both), self.n_heads,
                      q_norm=getattr(self, "q_layer_norm", None), k_norm=getattr(self, "k_layer_norm", None))
        return self.output_proj(y)


class IdeficsPerceiverMLP(nn.Module):
    def __init__(self, embed_dim, intermediate_size):
        super().__init__()
        self.ln = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, intermediate_size, bias=False)
        self.c_proj = nn.Linear(intermediate_size, embed_dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.fc(self.ln(x))))


class IdeficsPerceiverResampler(nn.Module):
    """Vision tokens (B, S, D) -> (B, n_latents, D); the MLP is 4 * D wide, as in IDEFICS."""

    def __init__(self, embed_dim, depth, n_heads, head_dim, n_latents, qk_layer_norms=False):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, embed_dim))
        self.blocks = nn.ModuleList(
            nn.ModuleList([IdeficsPerceiverAttention(embed_dim, n_heads, head_dim, qk_layer_norms),
                           IdeficsPerceiverMLP(embed_dim, 4 * embed_dim)])
            for _ in range(depth))
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, context):
        return self.layer_norm(run_latents(self.blocks, context, self.latents))


class IdeficsCrossAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, kv_dim, qk_layer_norms=False, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(kv_dim, hidden_size, bias=False)
        self.v_proj = nn.Linear(kv_dim, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if qk_layer_norms:
            self.q_layer_norm = RMSNorm(head_dim, eps)
            self.k_layer_norm = RMSNorm(head_dim, eps)

    def forward(self, x, media, media_mask):
        media = media.flatten(1, 2)
        y = media_cross_attention(self.q_proj(x), self.k_proj(media), self.v_proj(media), media_mask,
                                  self.num_heads, getattr(self, "q_layer_norm", None),
                                  getattr(self, "k_layer_norm", None))
        return self.o_proj(y)


def alpha(shape, initializer, std):
    """IDEFICS's gate values: "zeros" (what Flamingo prescribes), "ones" or "normal"."""
    if initializer == "zeros":
        return nn.Parameter(torch.zeros(shape))
    if initializer == "ones":
        return nn.Parameter(torch.ones(shape))
    if initializer in ("normal", "gaussian", "random"):
        return nn.Parameter(torch.randn(shape) * std)
    raise ValueError(f"alpha_initializer must be 'zeros', 'ones' or 'normal', got {initializer!r}")


class IdeficsGatedCrossAttentionLayer(nn.Module):
    """The LLaMA-shaped gated block of IDEFICS: RMSNorm -> cross-attention -> tanh(alpha_cross_attn)
    gate, RMSNorm -> SwiGLU MLP -> tanh(alpha_dense) gate. `config` is the text model's
    (hidden_size, num_attention_heads, intermediate_size, rms_norm_eps, alpha_*, qk_layer_norms)."""

    def __init__(self, config, kv_dim):
        super().__init__()
        c = config
        self.cross_attn = IdeficsCrossAttention(c.hidden_size, c.num_attention_heads, kv_dim,
                                                c.qk_layer_norms, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.alpha_type not in ("float", "vector"):
            raise ValueError(f"alpha_type must be 'float' or 'vector', got {c.alpha_type!r}")
        shape = (1,) if c.alpha_type == "float" else (1, 1, c.hidden_size)
        self.alpha_cross_attn = alpha(shape, c.alpha_initializer, c.alphas_initializer_range)
        self.alpha_dense = alpha(shape, c.alpha_initializer, c.alphas_initializer_range)

    def forward(self, x, media=None, media_mask=None):
        if media is not None:
            x = x + self.alpha_cross_attn.tanh() * self.cross_attn(self.input_layernorm(x), media, media_mask)
        return x + self.alpha_dense.tanh() * self.mlp(self.post_attention_layernorm(x))
