"""The two projections that join the encoder, the LLM and the decoders (NExT-GPT §3,
"LLM-centric alignment"; reference: NExT-GPT-Lagacy code/model/layers.py `TextFcLayer`
and the `llama_proj` of anyToImageVideoAudio.py).

InputProjection    one linear map: an ImageBind vector (1024) becomes ONE soft token
                   in the LLM's embedding space (4096).
OutputProjection   TextFcLayer in "transformer" mode. The hidden states at the signal
                   tokens, plus those tokens' own input embeddings, go through
                   fc (-> 512), a pre-norm encoder-decoder transformer whose decoder
                   input is a set of learned queries, and `model` (-> out). The result
                   has the shape of a decoder's text conditioning: 77x768 for SD-1.5,
                   77x1024 for ZeroScope, 1x512 for AudioLDM.

The encoder-decoder is written out here, but its parameter names are those of
torch.nn.Transformer (`tfm.encoder.layers.N.self_attn.in_proj_weight`, `norm1`, ...),
because that is what the official checkpoint stores.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minignext.attention import MultiheadAttention
from minignext.utils import config_from_dict


# modality -> (queries Q, conditioning width, signal tokens), as NExT-GPT's TextFcLayers are built
OFFICIAL = {"image": (77, 768, 4), "video": (77, 1024, 24), "audio": (1, 512, 8)}


class InputProjection(nn.Linear):
    """Linear(encoder width -> LLM width); the official checkpoint calls it `llama_proj`."""

    def __init__(self, enc_dim: int, llm_dim: int):
        super().__init__(enc_dim, llm_dim)

    def forward(self, x):               # (B, enc) -> (B, 1, llm): one soft token per input
        return super().forward(x).unsqueeze(-2)


@dataclass
class OutputProjectionConfig:
    """Defaults are NExT-GPT's image TextFcLayer (Vicuna-7B -> SD-1.5); `official(modality)` gives
    each modality's, `tiny()` a small one for tests."""
    in_dim: int = 4096               # LLM hidden size
    out_dim: int = 768               # decoder conditioning width (768 / 1024 / 512)
    num_queries: int = 77            # Q output tokens (77, or 1 for audio)
    num_signal_tokens: int = 4       # signal tokens read from the LLM (4 / 24 / 8)
    d_model: int = 512               # transformer width
    nhead: int = 4
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 2048
    layer_norm_eps: float = 1e-5

    @classmethod
    def official(cls, modality: str, in_dim: int = 4096) -> "OutputProjectionConfig":
        q, out, n = OFFICIAL[modality]
        return cls(in_dim=in_dim, out_dim=out, num_queries=q, num_signal_tokens=n)

    @classmethod
    def tiny(cls, **overrides) -> "OutputProjectionConfig":
        return cls(**{**dict(in_dim=64, out_dim=32, num_queries=8, d_model=32, num_encoder_layers=2,
                             num_decoder_layers=2, dim_feedforward=64), **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "OutputProjectionConfig":
        return config_from_dict(cls, d)


class EncoderLayer(nn.Module):
    def __init__(self, c: OutputProjectionConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(c.d_model, c.nhead)
        self.linear1 = nn.Linear(c.d_model, c.dim_feedforward)
        self.linear2 = nn.Linear(c.dim_feedforward, c.d_model)
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)

    def forward(self, x):               # pre-norm (norm_first=True)
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        return x + self.linear2(F.relu(self.linear1(self.norm2(x))))


class DecoderLayer(nn.Module):
    def __init__(self, c: OutputProjectionConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(c.d_model, c.nhead)
        self.multihead_attn = MultiheadAttention(c.d_model, c.nhead)
        self.linear1 = nn.Linear(c.d_model, c.dim_feedforward)
        self.linear2 = nn.Linear(c.dim_feedforward, c.d_model)
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.norm3 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)

    def forward(self, x, memory):       # no masks: every query sees every query and every input
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.multihead_attn(self.norm2(x), memory)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class Stack(nn.Module):
    """`layers` then a final LayerNorm `norm`, as nn.Transformer builds its encoder and decoder."""

    def __init__(self, layer_cls, n, c: OutputProjectionConfig):
        super().__init__()
        self.layers = nn.ModuleList(layer_cls(c) for _ in range(n))
        self.norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)

    def forward(self, x, memory=None):
        for layer in self.layers:
            x = layer(x) if memory is None else layer(x, memory)
        return self.norm(x)


class EncoderDecoder(nn.Module):
    def __init__(self, c: OutputProjectionConfig):
        super().__init__()
        self.encoder = Stack(EncoderLayer, c.num_encoder_layers, c)
        self.decoder = Stack(DecoderLayer, c.num_decoder_layers, c)

    def forward(self, src, tgt):
        return self.decoder(tgt, self.encoder(src))


class OutputProjection(nn.Module):
    def __init__(self, config: OutputProjectionConfig):
        super().__init__()
        self.config = c = config
        self.fc = nn.Linear(c.in_dim, c.d_model)
        self.tfm = EncoderDecoder(c)
        self.model = nn.Linear(c.d_model, c.out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, c.num_queries, c.d_model))

    def forward(self, hidden, input_embs):
        """hidden, input_embs: (B, N, in_dim) at the N signal tokens -> (B, Q, out_dim)."""
        x = self.fc(hidden + input_embs)
        x = self.tfm(x, self.query_embs.expand(x.shape[0], -1, -1))
        return self.model(x)
