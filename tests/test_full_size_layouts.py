"""Every part of the nextgpt-7b preset at full size, on the meta device (no real tensor is allocated).

Each test builds the reference (diffusers, transformers) from the published config in
tests/data/configs (sources in SOURCES.md), lays its state dict out as the published file
stores it (old names and buffers included where that file has them), hands config and tensors
to minignext's own loading path (`from_checkpoint`, what `from_pretrained` does after reading
the files), and compares every key and shape. Loading is strict, so a missing, unexpected or
mis-shaped key fails the load itself."""

import json
from pathlib import Path

import pytest
import torch

from minignext.clip import CLIPText
from minignext.llama import Llama
from minignext.unet import UNet2DCondition
from minignext.unet3d import UNet3DCondition
from minignext.vae import AutoencoderKL
from minignext.vocoder import HifiGan

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

CONFIGS = Path(__file__).parent / "data" / "configs"
OLD_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def published(name) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def shapes(tensors: dict) -> dict:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_and_compare(cls, config, stored: dict, expected: dict):
    """minignext's loading path on the stored tensors; its keys and shapes must be `expected`."""
    model = cls.from_checkpoint(config, stored)
    state = model.state_dict()
    assert shapes(state) == expected
    assert all(t.device.type == "meta" for t in state.values())
    return model


def diffusers_on_meta(cls_name, config):
    with torch.device("meta"):
        return getattr(diffusers, cls_name).from_config(config)


def with_old_vae_names(state: dict) -> dict:
    """The VAE as files written before diffusers 0.17 store it (SD-1.5's, AudioLDM's)."""
    out = {}
    for key, t in state.items():
        for new, old in OLD_VAE_NAMES.items():
            if ".mid_block.attentions.0." in key and f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = t
    return out


# ---------------------------------------------------------------- Stable Diffusion 1.5

def test_sd15_unet():
    config = published("sd15/unet")
    ref = diffusers_on_meta("UNet2DConditionModel", config)
    assert n_params(ref) == 859_520_964
    ours = load_and_compare(UNet2DCondition, config, ref.state_dict(), shapes(ref.state_dict()))
    assert n_params(ours) == 859_520_964


@pytest.mark.parametrize("part, old_names", [("sd15/vae", True), ("audioldm-l-full/vae", True),
                                             ("zeroscope-v2-576w/vae", True), ("zeroscope-v2-576w/vae", False)])
def test_vaes(part, old_names):
    config = published(part)
    ref = diffusers_on_meta("AutoencoderKL", config)
    stored = with_old_vae_names(ref.state_dict()) if old_names else ref.state_dict()
    if old_names:
        assert "encoder.mid_block.attentions.0.query.weight" in stored
    load_and_compare(AutoencoderKL, config, stored, shapes(ref.state_dict()))


@pytest.mark.parametrize("part, params", [("sd15/text_encoder", 123_060_480), ("zeroscope-v2-576w/text_encoder", None)])
def test_clip_text_encoders(part, params):
    """Both files come from transformers < 4.31: `text_model.` keys and the position_ids buffer."""
    config = published(part)
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    expected = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in ref.state_dict().items()}
    stored = {**expected, "text_model.embeddings.position_ids": torch.empty(1, 77, dtype=torch.long, device="meta")}
    ours = load_and_compare(CLIPText, config, stored, shapes(expected))
    if params:
        assert n_params(ours) == n_params(ref) == params
    assert ours.config.eos_token_id == 2                  # pools at argmax(ids), as these encoders were trained


# ---------------------------------------------------------------- AudioLDM-l-full

def test_audioldm_unet_with_class_labels():
    config = published("audioldm-l-full/unet")
    ref = diffusers_on_meta("UNet2DConditionModel", config)
    ours = load_and_compare(UNet2DCondition, config, ref.state_dict(), shapes(ref.state_dict()))
    assert tuple(ours.class_embedding.weight.shape) == (1024, 512)       # CLAP vector -> time embedding width
    assert ours.config.blocks_time_embed_dim == 2 * 1024                  # concatenated, not added


def test_audioldm_vocoder():
    config = published("audioldm-l-full/vocoder")
    with torch.device("meta"):
        ref = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(**config))
    ours = load_and_compare(HifiGan, config, ref.state_dict(), shapes(ref.state_dict()))
    assert ours.config.hop_length == 160


# ---------------------------------------------------------------- ZeroScope v2 576w

def test_zeroscope_unet3d():
    config = published("zeroscope-v2-576w/unet")
    ref = diffusers_on_meta("UNet3DConditionModel", config)
    ours = load_and_compare(UNet3DCondition, config, ref.state_dict(), shapes(ref.state_dict()))
    assert n_params(ours) == n_params(ref)


# ---------------------------------------------------------------- Vicuna-7B

@pytest.mark.parametrize("vocab, legacy_buffers", [(32000, True), (32001, False), (32038, False)])
def test_vicuna(vocab, legacy_buffers):
    """32000 (LLaMA), 32001 (Vicuna's added pad token), 32038 (NExT-GPT's 38 tokens). The 32000 file
    is laid out as a Vicuna merged with transformers 4.28-4.30 writes it: with rotary inv_freq buffers."""
    config = {**published("vicuna-7b-v0"), "vocab_size": vocab}
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("max_sequence_length",)},
                                         max_position_embeddings=config["max_sequence_length"])
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(hf_config)
    stored = dict(ref.state_dict())
    if legacy_buffers:
        stored.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.empty(64, device="meta")
                       for i in range(32)})
    ours = load_and_compare(Llama, config, stored, shapes(ref.state_dict()))
    assert n_params(ours) == n_params(ref) == 6_738_415_616 + (vocab - 32000) * 2 * 4096
    assert ours.config.max_position_embeddings == 2048 and tuple(ours.model.rope_cos.shape) == (2048, 128)
