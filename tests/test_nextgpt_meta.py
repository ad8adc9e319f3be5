"""nextgpt-7b at full size on the meta device: the released delta with its projections loads into
Vicuna-7B, and the whole any-to-any loop runs (encode an image, an audio clip and a video; generate
with forced signal tokens; project; one step of each decoder at its real shapes). Meta tensors have
shapes and no storage, so this is the stand-in for a GPU run: a code path that assumes the CPU fails here."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minignext import weights
from minignext.clip import CLIPText
from minignext.diffusion import AudioPipeline, ImagePipeline, VideoPipeline
from minignext.imagebind import ImageBind, ImageBindConfig
from minignext.llama import Llama
from minignext.projection import OutputProjectionConfig
from minignext.schedulers import DDIMScheduler
from minignext.systems.nextgpt import MODALITIES, PROJECTION_NAMES, Conversation, NextGPT, added_tokens
from minignext.systems.nextgpt_checkpoint import apply_delta, delta_key, load_projections, peft_name
from minignext.tiny import _tiny_clip_text, tiny_tokenizer
from minignext.unet import UNet2DCondition
from minignext.unet3d import UNet3DCondition
from minignext.vae import AutoencoderKL
from minignext.vocoder import HifiGan

CONFIGS = Path(__file__).parent / "data" / "configs"
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                "set_alpha_to_one": False, "clip_sample": False}


def published(name, **changes) -> dict:
    return {**json.loads((CONFIGS / name / "config.json").read_text()), **changes}


def on_meta(cls, config: dict):
    """`cls` through its own loading path, fed the meta state dict of its own architecture."""
    config_cls = {Llama: "LlamaConfig", UNet2DCondition: "UNet2DConditionConfig", AutoencoderKL: "AutoencoderKLConfig",
                  UNet3DCondition: "UNet3DConditionConfig", HifiGan: "HifiGanConfig", CLIPText: "CLIPTextConfig"}[cls]
    module = __import__(cls.__module__, fromlist=[config_cls])
    state = weights.build_on_meta(cls, getattr(module, config_cls).from_hf(config)).state_dict()
    return cls.from_checkpoint(config, state)


def official_delta():
    """The layout of ChocoWu/nextgpt_7b_tiva_v0/pytorch_model.pt, on meta: LoRA r=32 on q, k, v, o
    (peft names), the resized embed_tokens and lm_head, llama_proj and the three TextFcLayers."""
    from test_projection import ReferenceTextFcLayer

    delta = {}
    for i in range(32):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            delta[peft_name(f"model.layers.{i}.self_attn.{proj}.lora_A.weight")] = torch.empty(32, 4096, device="meta")
            delta[peft_name(f"model.layers.{i}.self_attn.{proj}.lora_B.weight")] = torch.empty(4096, 32, device="meta")
    delta[peft_name("model.embed_tokens.weight")] = torch.empty(32038, 4096, device="meta")
    delta[peft_name("lm_head.weight")] = torch.empty(32038, 4096, device="meta")
    delta["llama_proj.weight"], delta["llama_proj.bias"] = torch.empty(4096, 1024, device="meta"), torch.empty(4096, device="meta")
    for m in MODALITIES:
        c = OutputProjectionConfig.official(m)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ReferenceTextFcLayer(c.in_dim, c.out_dim, c.num_queries)
        delta.update({f"{PROJECTION_NAMES[m]}.0.{k}": v for k, v in ref.state_dict().items()})
    return delta


@pytest.fixture(scope="module")
def nextgpt_7b():
    tok = tiny_tokenizer()             # Vicuna's tokenizer.json is not here; any ids below 32038 do
    tok.add_special_tokens(added_tokens())
    llm = on_meta(Llama, published("vicuna-7b-v0"))
    delta = dict(kv for k, v in official_delta().items() for kv in delta_key(k, v))
    rest = apply_delta(llm, delta)
    encoder = weights.build_on_meta(ImageBind, ImageBindConfig.huge())
    weights.load_into(encoder, encoder.state_dict())
    with torch.device("meta"):
        model = NextGPT(encoder, llm, tok, {m: OutputProjectionConfig.official(m) for m in MODALITIES}, enc_dim=1024)
    load_projections(model, rest)
    return model.eval(), delta


def test_delta_with_projections_loads_at_full_size(nextgpt_7b):
    model, delta = nextgpt_7b
    assert model.llama_model.config.vocab_size == 32038
    assert tuple(model.llama_model.lm_head.weight.shape) == (32038, 4096)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(("llama_proj.", "gen_text"))}
    assert ours == {k: tuple(v.shape) for k, v in delta.items() if not k.startswith("llama_model.")}
    assert sum(v.numel() for k, v in delta.items() if ".lora_" in k) == 32 * 4 * 2 * 32 * 4096
    assert all(p.device.type == "meta" for p in model.parameters())


def decoders():
    sd_text, sd_tok = on_meta(CLIPText, published("sd15/text_encoder")), _tiny_clip_text(8)[1]
    image = ImagePipeline(on_meta(UNet2DCondition, published("sd15/unet")), on_meta(AutoencoderKL, published("sd15/vae")),
                          DDIMScheduler.from_config(SD_SCHEDULER), sd_text, sd_tok)
    audio = AudioPipeline(on_meta(UNet2DCondition, published("audioldm-l-full/unet")),
                          on_meta(AutoencoderKL, published("audioldm-l-full/vae")),
                          DDIMScheduler.from_config({**SD_SCHEDULER, "beta_start": 0.0015, "beta_end": 0.0195}),
                          on_meta(HifiGan, published("audioldm-l-full/vocoder")),
                          unconditional_embeds=torch.empty(512, device="meta"))
    video = VideoPipeline(on_meta(UNet3DCondition, published("zeroscope-v2-576w/unet")),
                          on_meta(AutoencoderKL, published("zeroscope-v2-576w/vae")), DDIMScheduler.from_config(SD_SCHEDULER),
                          on_meta(CLIPText, published("zeroscope-v2-576w/text_encoder")), sd_tok)
    return {"image": image, "audio": audio, "video": video}


def test_any_to_any_loop_on_meta(nextgpt_7b):
    model, _ = nextgpt_7b
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8))
    audio = (torch.from_numpy(rng.standard_normal(16000 * 3).astype(np.float32)) * 0.1, 16000)
    video = (rng.random((16, 96, 128, 3)) * 255).astype(np.uint8)
    conv = Conversation().user("Describe all three, then draw, play and film them.", image=image, audio=audio,
                               video=video)
    runs = "".join(f"[{tag}{i}]" for tag, n in (("IMG", 4), ("AUD", 8), ("VID", 24)) for i in range(n))
    reply = model.chat(conv, force_response=f"Here they are. {runs}", decode=False, progress=False)

    assert reply.prompt.soft_modalities == ["image", "audio", "video"]
    assert reply.prompt.embeds.shape[-1] == 4096 and reply.prompt.embeds.device.type == "meta"
    cond = dict(reply.conditioning)
    assert {m: tuple(c.shape) for m, c in cond.items()} == {"image": (1, 77, 768), "audio": (1, 512),
                                                            "video": (1, 77, 1024)}
    pipes = decoders()
    image_out = pipes["image"](prompt_embeds=cond["image"], guidance_scale=7.5, num_inference_steps=1,
                               output_type="pt", progress=False, seed=0)
    assert tuple(image_out.shape) == (1, 3, 512, 512) and image_out.device.type == "meta"
    audio_out = pipes["audio"](cond["audio"], guidance_scale=7.5, num_inference_steps=1, audio_length_in_s=5.0,
                               output_type="pt", progress=False, seed=0)
    assert tuple(audio_out.shape) == (1, 80000) and audio_out.device.type == "meta"
    video_out = pipes["video"](prompt_embeds=cond["video"], guidance_scale=7.5, num_inference_steps=1, num_frames=24,
                               height=320, width=576, output_type="pt", progress=False, seed=0)
    assert tuple(video_out.shape) == (1, 24, 3, 320, 576) and video_out.device.type == "meta"
