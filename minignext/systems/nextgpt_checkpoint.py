"""NExT-GPT on disk: the official delta checkpoint, and minignext's own folder layout.

The official release (`ChocoWu/nextgpt_7b_tiva_v0/pytorch_model.pt`) holds only what stage 3
trained: the LoRA factors (peft names, under `llama_model.base_model.model.`), the resized
embed_tokens and lm_head, llama_proj and the three output projections. A minignext folder keeps
that delta next to a `nextgpt.json` that points at the frozen parts:

    nextgpt.json         encoder, llm: folders (relative paths); delta: the delta's file name;
                         lora_r, lora_alpha; enc_dim; template: the chat template's name
                         (vicuna_v0 when absent); system: the system message that opens
                         every prompt (none when absent); projections: OutputProjectionConfig per
                         modality; decoders: diffusers-layout folders; decoder_kwargs per modality
    delta.safetensors    the delta, in the official names

`write_folder` is the one writer of that layout (`NextGPT.save_pretrained` and the toy training
both use it); `load_folder` reads it back. Each decoder folder may hold a `sampling.json` with
its own guidance scale and step count.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from minignext import weights
from minignext.projection import OutputProjectionConfig
from minignext.tokenizer import TEMPLATES, VICUNA_V0
from minignext.systems.nextgpt import (PROJECTION_NAMES, MediaDecoder, NextGPT, added_tokens)
from minignext.utils import atomic_write
from minignext.weights import WeightsError

# ---------------------------------------------------------------- the official delta

# peft's wrapper is dropped, so the delta's keys are this package's own parameter names.
DELTA_RENAMES = (                       # (old substring, new substring), applied in order
    ("llama_model.base_model.model.", "llama_model."),
    (".lora_A.default.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_B.weight"),
)
DELTA_PREFIXES = ("llama_model.", "llama_proj.", "gen_text_hidden_fcs.", "gen_text_hidden_fcs_video.",
                  "gen_text_hidden_fcs_audio.")
PEFT_PREFIX = "llama_model.base_model.model."


def delta_key(key, tensor):
    for old, new in DELTA_RENAMES:
        key = key.replace(old, new)
    if not key.startswith(DELTA_PREFIXES):
        raise WeightsError(f"unexpected key {key} in the NExT-GPT delta; expected keys under "
                           f"{', '.join(DELTA_PREFIXES)}")
    return [(key, tensor)]


def peft_name(key: str) -> str:
    """The inverse of delta_key for an LLM parameter: `model.layers.0...lora_A.weight` ->
    `llama_model.base_model.model.model.layers.0...lora_A.default.weight`."""
    for tag in (".lora_A.", ".lora_B."):
        key = key.replace(tag, f"{tag}default.")
    return PEFT_PREFIX + key


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
    add_new_rows(llm, delta.get("llama_model.model.embed_tokens.new_rows"), delta.get("llama_model.lm_head.new_rows"))
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
    pairs = {}                          # target weight -> {"A": key, "B": key}
    for key in lora:
        target, _, factor = key.removeprefix("llama_model.").rpartition(".lora_")
        if factor not in ("A.weight", "B.weight") or f"{target}.weight" not in params:
            raise WeightsError(f"delta LoRA key {key} is not <an LLM linear layer>.lora_A.weight or .lora_B.weight")
        pairs.setdefault(f"{target}.weight", {})[factor[0]] = key
    for target, pair in pairs.items():
        if len(pair) != 2:
            have, want = next(iter(pair.items()))
            raise WeightsError(f"delta LoRA {want} has no lora_{'B' if have == 'A' else 'A'} partner; every "
                               f"lora_A needs its lora_B, or {target} would be left unmerged")
        key_a, key_b, w = pair["A"], pair["B"], params[target]
        with torch.no_grad():
            w.copy_(weights.merge_lora(w, lora[key_a].to(w.device), lora[key_b].to(w.device), alpha=lora_alpha))
    known = {"llama_model.model.embed_tokens.weight", "llama_model.lm_head.weight", *lora,
             "llama_model.model.embed_tokens.new_rows", "llama_model.lm_head.new_rows"}
    stray = [k for k in delta if k.startswith("llama_model.") and k not in known]
    if stray:
        raise WeightsError(f"delta has LLM keys that are neither LoRA nor embeddings: {', '.join(stray[:5])}")
    return rest


def add_new_rows(llm, embed_rows, head_rows=None):
    """minignext's compact form of the grown matrices: only the rows past the base vocabulary
    (`embed_tokens.new_rows`, and `lm_head.new_rows` unless the head is tied to the embedding), where
    the official full matrices would dwarf the delta (SmolLM2: 49,152 rows for 38 new ones)."""
    if embed_rows is None:
        if head_rows is not None:
            raise WeightsError("the delta has lm_head.new_rows but no embed_tokens.new_rows")
        return
    tied = llm.lm_head.weight is llm.model.embed_tokens.weight
    if (head_rows is None) != tied:
        raise WeightsError(f"the delta's new rows do not fit the LLM: its lm_head is {'tied' if tied else 'untied'}, "
                           f"the delta {'has' if head_rows is not None else 'lacks'} lm_head.new_rows")
    if embed_rows.shape[1] != llm.config.hidden_size:
        raise WeightsError(f"delta embed_tokens.new_rows has shape {tuple(embed_rows.shape)}, the LLM's width is "
                           f"{llm.config.hidden_size}")
    base = llm.config.vocab_size
    llm.resize_token_embeddings(base + embed_rows.shape[0])
    with torch.no_grad():
        llm.model.embed_tokens.weight[base:] = embed_rows
        if head_rows is not None:
            llm.lm_head.weight[base:] = head_rows


def load_projections(model, tensors: dict, dtype=None, device=None):
    """Strictly load `llama_proj.*` and `gen_text_hidden_fcs*.0.*` (the delta's names)."""
    parts = {"llama_proj": model.llama_proj}
    parts.update({PROJECTION_NAMES[m]: getattr(model, PROJECTION_NAMES[m]) for m in model.signal_ids})
    stray = sorted({k.split(".")[0] for k in tensors} - set(parts))
    if stray:
        raise WeightsError(f"projection checkpoint has parts this model does not: {', '.join(stray)}")
    for name, module in parts.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.split(".")[0] == name}
        weights.load_into(module, sd, dtype=dtype, device=device)


def projection_state(model) -> dict:
    """llama_proj and the output projections, under the delta's names."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(("llama_proj.", "gen_text_hidden_fcs"))}


# ---------------------------------------------------------------- minignext's folder layout

def write_folder(folder, model: NextGPT, delta: dict, *, encoder_dir, llm_dir, decoder_dirs=None,
                 decoder_kwargs=None, lora=None, overwrite=False) -> Path:
    """folder/{nextgpt.json, delta.safetensors}: `delta` (official names) plus pointers to the
    encoder, LLM and decoder folders. `lora` = {"r", "alpha"} when the delta holds LoRA factors."""
    folder = Path(folder)
    meta_path = folder / "nextgpt.json"
    if meta_path.exists() and not overwrite:
        raise FileExistsError(f"{meta_path} exists; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(delta, folder / "delta.safetensors", overwrite=overwrite)
    rel = lambda p: os.path.relpath(Path(p).resolve(), folder.resolve())      # noqa: E731
    meta = {"encoder": rel(encoder_dir), "llm": rel(llm_dir), "delta": "delta.safetensors",
            "enc_dim": model.llama_proj.in_features, "template": model.template.name,
            "projections": {m: asdict(model.output_projection(m).config) for m in model.signal_ids},
            "decoders": {m: rel(d) for m, d in (decoder_dirs or {}).items()},
            "decoder_kwargs": dict(decoder_kwargs or {})}
    if lora:
        meta.update(lora_r=lora["r"], lora_alpha=lora["alpha"])
    if model.system:
        meta["system"] = model.system
    with atomic_write(meta_path, overwrite) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return folder


REQUIRED = {"encoder": str, "llm": str, "delta": str, "enc_dim": int, "projections": dict}
OPTIONAL = {"decoders": dict, "decoder_kwargs": dict, "lora_r": int, "lora_alpha": (int, float), "template": str,
            "system": str}


def read_meta(folder) -> dict:
    """nextgpt.json, with every field it must or may have checked for its type."""
    path = Path(folder) / "nextgpt.json"
    meta = weights.read_config(folder, "nextgpt.json")
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise WeightsError(f"{path} lacks {', '.join(missing)}; it must name {', '.join(REQUIRED)}")
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise WeightsError(f"{path}: {key} is {meta[key]!r}; expected a {getattr(kind, '__name__', 'number')}")
    for key, kind in (("projections", dict), ("decoders", str), ("decoder_kwargs", dict)):
        stray = sorted(m for m, v in meta.get(key, {}).items() if m not in PROJECTION_NAMES or not isinstance(v, kind))
        if stray:
            raise WeightsError(f"{path}: {key} has {', '.join(stray)}; expected a {kind.__name__} for each of "
                               f"{', '.join(PROJECTION_NAMES)}")
    try:
        meta["projections"] = {m: OutputProjectionConfig.from_dict(d) for m, d in meta["projections"].items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path}: its projections do not describe output projections ({e})") from None
    return meta


def load_folder(folder, dtype=None, device=None) -> NextGPT:
    """A NextGPT from a folder written by `write_folder` (the toy preset, saved models)."""
    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.tokenizer import Tokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    projections = meta["projections"]
    dtype = dtype or torch.float32
    encoder = ImageBind.from_pretrained(folder / meta["encoder"], dtype=dtype, device=device)
    llm_dir = folder / meta["llm"]
    llm, tok = Llama.from_pretrained(llm_dir, dtype=dtype, device=device), Tokenizer.from_pretrained(llm_dir)
    tok.add_special_tokens([t for t in added_tokens() if tok.token_to_id(t) is None])
    delta = weights.load_safetensors(folder / meta["delta"], dtype=dtype, device=device or "cpu")
    delta = dict(kv for k, v in delta.items() for kv in delta_key(k, v))
    weights.check_finite(delta, str(folder / meta["delta"]))
    has_lora = any(".lora_" in k for k in delta)
    if has_lora and "lora_alpha" not in meta:
        raise WeightsError(f"{folder / meta['delta']} holds LoRA factors but nextgpt.json gives no lora_alpha")
    rest = apply_delta(llm, delta, lora_alpha=meta.get("lora_alpha", 1.0))
    loaders = {}
    for m, path in meta.get("decoders", {}).items():
        kwargs = meta.get("decoder_kwargs", {}).get(m, {})
        loaders[m] = lambda m=m, path=folder / path, kw=kwargs: folder_decoder(m, path, dtype, device, **kw)
    template = meta.get("template", VICUNA_V0.name)
    if template not in TEMPLATES:
        raise WeightsError(f"{folder / 'nextgpt.json'} names the chat template {template!r}; known: {', '.join(TEMPLATES)}")
    model = NextGPT(encoder, llm, tok, projections, loaders, enc_dim=meta["enc_dim"], template=TEMPLATES[template],
                    system=meta.get("system", ""))
    load_projections(model, rest, dtype=dtype, device=device)
    return model.eval()


# ---------------------------------------------------------------- decoders from diffusers-layout folders

PIPELINES = {"image": "ImagePipeline", "audio": "AudioPipeline", "video": "VideoPipeline"}


def sampling_defaults(folder) -> dict:
    """A decoder folder's own `sampling.json` (guidance_scale, num_inference_steps, and any other
    call argument), or {} when it has none (then the published 7.5 and 50 apply)."""
    path = Path(folder) / "sampling.json"
    return weights.read_config(folder, "sampling.json") if path.is_file() else {}


def folder_decoder(modality, path, dtype=None, device=None, unconditional=None, **call_kwargs) -> MediaDecoder:
    """A decoder from a diffusers-layout folder (or hub repo id), with its own sampling defaults.
    AudioLDM's unconditional CLAP vector comes from the file `unconditional` or
    unconditional_embeds.safetensors in the folder (minignext has no CLAP text encoder) or, for the
    toy decoder, from its own CLIP-style text_encoder/ (the normalised embedding of "")."""
    from minignext import diffusion

    cls = getattr(diffusion, PIPELINES[modality])
    path = weights.resolve(path, folders=cls.FOLDERS)
    kwargs = {**sampling_defaults(path), **call_kwargs}
    if modality != "audio":
        return MediaDecoder(modality, cls.from_pretrained(path, dtype=dtype, device=device), **kwargs)
    embeds = _unconditional_clap(path, unconditional)
    return MediaDecoder(modality, cls.from_pretrained(path, dtype=dtype, device=device, unconditional_embeds=embeds),
                        **kwargs)


def _unconditional_clap(path, file=None):
    uncond = Path(file or Path(path) / "unconditional_embeds.safetensors")
    if uncond.is_file():
        return weights.load_safetensors(uncond)["embeds"]
    if file is None and (Path(path) / "text_encoder").is_dir():
        from minignext.clip import CLIPText, CLIPTokenizer

        enc = CLIPText.from_pretrained(Path(path) / "text_encoder", dtype=torch.float32)
        tok = CLIPTokenizer.from_pretrained(Path(path) / "tokenizer")
        with torch.no_grad():
            return F.normalize(enc(tok([""], max_length=tok.model_max_length)).embeds, dim=-1)[0]
    raise WeightsError(f"{uncond} is missing: AudioLDM's classifier-free guidance needs the normalised CLAP "
                       f"text embedding of \"\" (512 values, saved under the name 'embeds'); compute it once "
                       f"with transformers' ClapTextModelWithProjection of the decoder's repository")


def save_pretrained(model: NextGPT, folder, decoder_dirs=None, decoder_kwargs=None, encoder_dir=None,
                    overwrite=False) -> Path:
    """A whole model as a folder: llm/ (weights with the grown vocabulary, tokenizer.json),
    imagebind/ unless `encoder_dir` names an existing ImageBind folder, and the projections as the
    delta. Decoders are referenced by folder, not copied."""
    folder = Path(folder)
    if (folder / "nextgpt.json").exists() and not overwrite:
        raise FileExistsError(f"{folder / 'nextgpt.json'} exists; pass overwrite=True to replace it")
    llm_dir = folder / "llm"
    llm_dir.mkdir(parents=True, exist_ok=True)
    (llm_dir / "config.json").write_text(json.dumps(asdict(model.llama_model.config), indent=2))
    weights.save_safetensors(model.llama_model.state_dict(), llm_dir / "model.safetensors", overwrite=overwrite)
    model.tokenizer.save(llm_dir, overwrite=overwrite)
    if encoder_dir is None:
        encoder_dir = folder / "imagebind"
        weights.save_safetensors(model.visual_encoder.state_dict(), encoder_dir / "model.safetensors",
                                 overwrite=overwrite)
        (encoder_dir / "config.json").write_text(json.dumps(model.visual_encoder.config.to_dict(), indent=2))
    return write_folder(folder, model, projection_state(model), encoder_dir=encoder_dir, llm_dir=llm_dir,
                        decoder_dirs=decoder_dirs, decoder_kwargs=decoder_kwargs, overwrite=overwrite)
