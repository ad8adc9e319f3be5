"""Ready-made models by name, apart from the systems and their parts.

    nextgpt-7b    the official NExT-GPT: ImageBind-huge, Vicuna-7B-v0 + the released delta,
                  Stable Diffusion 1.5, AudioLDM-l-full, ZeroScope v2 576w (GPU, ~20 GB in fp16)
    toy           the toy NExT-GPT trained on the toy world, shipped in weights/toy/ (any CPU)
    tiny-random   every part tiny and random, built in-process (shows the data flow)
"""

from minignext import weights
from minignext.weights import WeightsError

PRESETS = ("nextgpt-7b", "toy", "tiny-random")
REAL_DIR = weights.WEIGHTS_DIR / "real" / "nextgpt-7b"
TOY_DIR = weights.WEIGHTS_DIR / "toy"
HUB = {"delta": "ChocoWu/nextgpt_7b_tiva_v0", "image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
       "audio": "cvssp/audioldm-l-full", "video": "cerspense/zeroscope_v2_576w"}
REAL_DECODER_KWARGS = {"image": {}, "audio": {"audio_length_in_s": 5.0},
                       "video": {"height": 320, "width": 576, "num_frames": 24}}


def default_preset() -> str:
    """"toy" wherever its folder is (a broken one fails loudly), "tiny-random" only where it is absent."""
    return "toy" if (TOY_DIR / "nextgpt").exists() else "tiny-random"


def from_preset(name, dtype=None, device=None):
    from minignext.systems.nextgpt_checkpoint import load_folder
    from minignext.tiny import tiny_random

    if name == "tiny-random":
        return tiny_random()
    if name == "toy":
        if not (TOY_DIR / "nextgpt" / "nextgpt.json").is_file():
            raise WeightsError(f"the toy weights are not there yet ({TOY_DIR / 'nextgpt'} is missing); they "
                               f"come from the toy-world training. Use --preset tiny-random meanwhile.")
        return load_folder(TOY_DIR / "nextgpt", dtype=dtype, device=device)
    if name == "nextgpt-7b":
        return nextgpt_7b(dtype=dtype, device=device)
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def nextgpt_7b(dtype=None, device=None):
    """The official parts: converted ImageBind-huge, a local Vicuna-7B-v0, the converted delta,
    and SD-1.5 / AudioLDM / ZeroScope from the hub (loaded on first use)."""
    import torch

    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.projection import OutputProjectionConfig
    from minignext.systems.nextgpt import MODALITIES, NextGPT, added_tokens
    from minignext.systems.nextgpt_checkpoint import apply_delta, folder_decoder, load_projections
    from minignext.tokenizer import Tokenizer

    need = {"imagebind": REAL_DIR / "imagebind", "vicuna": REAL_DIR / "vicuna-7b-v0",
            "delta": REAL_DIR / "delta.safetensors"}
    missing = [f"{k} ({p})" for k, p in need.items() if not p.exists()]
    if missing:
        raise WeightsError(
            f"the nextgpt-7b preset is missing: {', '.join(missing)}. Run `minignext download nextgpt-7b` "
            f"(it fetches and converts the NExT-GPT delta, fetches the decoders, and says how to get "
            f"ImageBind-huge). Vicuna-7B-v0 is LLaMA-7B plus "
            f"lmsys/vicuna-7b-delta-v0; merge them with FastChat's apply_delta and save the HF folder "
            f"(config.json, *.safetensors, tokenizer.json) as {need['vicuna']}.")
    dtype = dtype or torch.float16
    llm = Llama.from_pretrained(need["vicuna"], dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(need["vicuna"])
    tok.add_special_tokens(added_tokens())
    delta = weights.load_safetensors(need["delta"], dtype=dtype, device=device or "cpu")
    weights.check_finite(delta, str(need["delta"]))
    rest = apply_delta(llm, delta)
    encoder = ImageBind.from_pretrained(need["imagebind"], dtype=dtype, device=device)
    projections = {m: OutputProjectionConfig.official(m, llm.config.hidden_size) for m in MODALITIES}
    clap_empty = REAL_DIR / "audioldm_unconditional.safetensors"
    loaders = {m: (lambda m=m: folder_decoder(m, HUB[m], dtype, device, **REAL_DECODER_KWARGS[m],
                                              **({"unconditional": clap_empty} if m == "audio" else {})))
               for m in MODALITIES}
    model = NextGPT(encoder, llm, tok, projections, loaders, enc_dim=encoder.config.out_embed_dim)
    load_projections(model, rest, dtype=dtype, device=device)
    model.max_loaded_decoders = 1          # like the reference, one decoder at a time next to the LLM
    return model.eval()


def download_preset(name, overwrite=False):
    """Fetch (and convert) what a preset needs; yields progress lines."""
    if name == "tiny-random":
        yield "tiny-random is built in-process; nothing to download"
        return
    if name == "toy":
        yield f"the toy weights ship in {TOY_DIR} (or come from the toy-world training); nothing to download"
        return
    from huggingface_hub import hf_hub_download

    from minignext.systems.nextgpt import MODALITIES
    from minignext.systems.nextgpt_checkpoint import convert_delta

    REAL_DIR.mkdir(parents=True, exist_ok=True)
    try:
        if not (REAL_DIR / "delta.safetensors").exists() or overwrite:
            pt = hf_hub_download(HUB["delta"], "pytorch_model.pt", local_dir=REAL_DIR / "raw")
            yield f"converted {convert_delta(pt, REAL_DIR / 'delta.safetensors', overwrite=overwrite)}"
        for modality in MODALITIES:
            yield f"{modality} decoder in {weights.resolve(HUB[modality])}"
    except WeightsError:
        raise
    except Exception as e:       # offline, gated, no disk: one clear message for all
        raise WeightsError(f"download failed ({type(e).__name__}: {e}). The hub must be reachable; set "
                           f"HF_HUB_OFFLINE=0 and check the network.") from None
    if not (REAL_DIR / "imagebind").exists():
        yield (f"ImageBind-huge: fetch imagebind_huge.pth from Meta (dl.fbaipublicfiles.com/imagebind) and run "
               f"`minignext convert imagebind imagebind_huge.pth {REAL_DIR / 'imagebind'}`")
    if not (REAL_DIR / "vicuna-7b-v0").exists():
        yield f"Vicuna-7B-v0: merge LLaMA-7B with lmsys/vicuna-7b-delta-v0 into {REAL_DIR / 'vicuna-7b-v0'}"

