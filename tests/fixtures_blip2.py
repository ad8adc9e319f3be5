"""Tiny random BLIP-2 models from transformers (test-only oracles), saved in their on-disk layout,
and the same weights written under LAVIS's names."""

import dataclasses

import torch

from minignext import blip2


def hf_kwargs(config) -> dict:
    """A minignext config dataclass -> keyword arguments of the transformers config."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def randomize(model, std=0.2, seed=0):
    """Fill every tensor (transformers zero-initialises biases and query tokens). The key third of
    each fused qkv bias stays 0, as in every published file (EVA has no key bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith("self_attn.qkv.bias"):
                p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
    return model.eval()


def hf_blip2_config(transformers, config: blip2.Blip2Config, text_config=None):
    return transformers.Blip2Config(vision_config=hf_kwargs(config.vision_config),
                                    qformer_config=hf_kwargs(config.qformer_config), text_config=text_config,
                                    num_query_tokens=config.num_query_tokens,
                                    image_text_hidden_size=config.image_text_hidden_size,
                                    image_token_index=config.image_token_index)


def save(model, folder):
    model.save_pretrained(folder)
    return folder


# Names as LAVIS writes them (lavis/models/eva_vit.py, blip2_models/Qformer.py, blip2_qformer.py),
# written from the transformers side: (transformers name part, LAVIS name part), applied in order.
TO_LAVIS = [
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
    ("vision_model.encoder.layers.", "visual_encoder.blocks."),
    (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
    (".self_attn.projection.", ".attn.proj."), (".self_attn.qkv.", ".attn.qkv."),
    ("vision_model.post_layernorm.", "ln_vision."),
    ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
    ("qformer.encoder.layer.", "Qformer.bert.encoder.layer."),
    ("attention.attention.", "attention.self."),
    ("vision_projection.", "vision_proj."), ("text_projection.", "text_proj."),
    ("language_projection.", "t5_proj."),
]


def lavis_name(key: str) -> str:
    if key.startswith("embeddings."):                 # the retrieval model's text embeddings
        return "Qformer.bert." + key
    for a, b in TO_LAVIS:
        key = key.replace(a, b)
    return key


def to_lavis(hf_state: dict) -> dict:
    out = {}
    for key, t in hf_state.items():
        name = lavis_name(key)
        if name.endswith("attn.qkv.bias"):            # LAVIS keeps q and v biases apart, and has no k bias
            q, _, v = t.chunk(3)
            out[name.replace("qkv.bias", "q_bias")], out[name.replace("qkv.bias", "v_bias")] = q, v
        else:
            out[name] = t
    return out
