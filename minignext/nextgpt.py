"""NExT-GPT (Wu et al. 2023, "NExT-GPT: Any-to-Any Multimodal LLM", arXiv 2309.05519),
the loop that joins the parts; reference: NExT-GPT-Lagacy code/model/anyToImageVideoAudio.py.

    encode   ImageBind: each input image / audio / video -> one 1024-d vector
    project  llama_proj: -> ONE soft token, spliced as  <Img> [soft] </Img>
    LLM      Vicuna reads the Vicuna-v0 prompt, writes text and signal tokens
             [IMG0..3], [VID0..23], [AUD0..7]
    project  gen_text_hidden_fcs{,_video,_audio}: hidden states AT the signal tokens
             + their input embeddings -> the decoder's text conditioning
    decode   image / video / audio diffusion pipelines, loaded on demand
"""

from pathlib import Path

import torch

from minignext import weights
from minignext.weights import WeightsError


# ---------------------------------------------------------------- the official delta checkpoint

# The NExT-GPT release `pytorch_model.pt` holds only what stage 3 trained: the LoRA
# factors (peft names, under `llama_model.base_model.model.`), the resized embed_tokens
# and lm_head, llama_proj and the three output projections. We keep its names, minus
# peft's wrapper, so that they are this module's own parameter names.
DELTA_RENAMES = (                       # (old substring, new substring), applied in order
    ("llama_model.base_model.model.", "llama_model."),
    (".lora_A.default.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_B.weight"),
)
DELTA_PREFIXES = ("llama_model.", "llama_proj.", "gen_text_hidden_fcs.", "gen_text_hidden_fcs_video.",
                  "gen_text_hidden_fcs_audio.")


def delta_key(key, tensor):
    for old, new in DELTA_RENAMES:
        key = key.replace(old, new)
    if not key.startswith(DELTA_PREFIXES):
        raise WeightsError(f"unexpected key {key} in the NExT-GPT delta; expected keys under "
                           f"{', '.join(DELTA_PREFIXES)}")
    return [(key, tensor)]


def convert_delta(src, dst, overwrite=False):
    """NExT-GPT's `pytorch_model.pt` (a pickle) -> safetensors, read with weights_only=True.
    `dst` is a .safetensors file or a folder (then dst/delta.safetensors)."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst / "delta.safetensors"
    return weights.convert_pickle(src, dst, rename=delta_key, overwrite=overwrite)


def apply_delta(llm, delta: dict, lora_alpha=32.0) -> dict:
    """Merge the delta's LoRA into `llm` (W + alpha/r * B A), take its resized embed_tokens and
    lm_head; return the remaining (projection) tensors, prefixes kept."""
    rest, lora = {}, {}
    for key, t in delta.items():
        if not key.startswith("llama_model."):
            rest[key] = t
        elif ".lora_" in key:
            lora[key] = t
    embed, head = delta.get("llama_model.model.embed_tokens.weight"), delta.get("llama_model.lm_head.weight")
    if embed is not None:
        if embed.shape[1] != llm.config.hidden_size:
            raise WeightsError(f"delta embed_tokens has shape {tuple(embed.shape)}, the LLM's width is "
                               f"{llm.config.hidden_size}")
        if embed.shape[0] > llm.config.vocab_size:
            llm.resize_token_embeddings(embed.shape[0])
        params = dict(llm.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            params["model.embed_tokens.weight"].copy_(embed)
            if head is not None:
                params["lm_head.weight"].copy_(head)
    params = dict(llm.named_parameters())
    for key_a in [k for k in lora if ".lora_A." in k]:
        target = key_a.removeprefix("llama_model.").replace(".lora_A.weight", ".weight")
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if target not in params or key_b not in lora:
            raise WeightsError(f"delta LoRA {key_a} has no {'LLM weight ' + target if target not in params else key_b}")
        w = params[target]
        with torch.no_grad():
            w.copy_(weights.merge_lora(w, lora[key_a].to(w.device), lora[key_b].to(w.device), alpha=lora_alpha))
    known = {"llama_model.model.embed_tokens.weight", "llama_model.lm_head.weight", *lora}
    stray = [k for k in delta if k.startswith("llama_model.") and k not in known]
    if stray:
        raise WeightsError(f"delta has LLM keys that are neither LoRA nor embeddings: {', '.join(stray[:5])}")
    return rest
