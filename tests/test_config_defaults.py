"""Every config field named like the reference's has the reference's default, so a published
config.json that leaves a field out means the same to minignext as to transformers / diffusers."""

import dataclasses
import inspect

import pytest

from minignext.clip import CLIPTextConfig, CLIPVisionConfig
from minignext.llama import Llama, LlamaConfig
from minignext.projection import OutputProjectionConfig
from minignext.schedulers import SCHEDULERS
from minignext.unet import UNet2DConditionConfig
from minignext.unet3d import UNet3DConditionConfig
from minignext.vae import AutoencoderKLConfig
from minignext.vocoder import HifiGanConfig

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


def plain(value):
    if isinstance(value, (tuple, list)):
        return tuple(plain(v) for v in value)
    return value


def init_defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def compare(ours_cls, reference: dict, skip=()):
    ours = ours_cls()
    shared = [f.name for f in dataclasses.fields(ours_cls) if f.init and f.name in reference and f.name not in skip]
    assert len(shared) >= 5, shared
    wrong = {n: (getattr(ours, n), reference[n]) for n in shared if plain(getattr(ours, n)) != plain(reference[n])}
    assert not wrong, f"{ours_cls.__name__} defaults differ from the reference's (ours, theirs): {wrong}"


def test_llama():
    ref = transformers.LlamaConfig()
    compare(LlamaConfig, {**vars(ref), "rope_theta": ref.rope_parameters["rope_theta"]},
            skip=("head_dim", "num_key_value_heads"))           # derived after __post_init__ on both sides:
    assert (LlamaConfig().head_dim, LlamaConfig().num_key_value_heads) == (ref.head_dim, ref.num_key_value_heads)


@pytest.mark.parametrize("ours, theirs", [(CLIPTextConfig, "CLIPTextConfig"), (CLIPVisionConfig, "CLIPVisionConfig")])
def test_clip(ours, theirs):
    compare(ours, vars(getattr(transformers, theirs)()))


def test_hifigan():
    compare(HifiGanConfig, vars(transformers.SpeechT5HifiGanConfig()))


@pytest.mark.parametrize("ours, theirs", [(UNet2DConditionConfig, "UNet2DConditionModel"),
                                          (UNet3DConditionConfig, "UNet3DConditionModel"),
                                          (AutoencoderKLConfig, "AutoencoderKL")])
def test_diffusers_models(ours, theirs):
    compare(ours, init_defaults(getattr(diffusers, theirs)))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers(name):
    ours = SCHEDULERS[name].from_config({}).config
    theirs = getattr(diffusers, name)().config
    fields = [f.name for f in dataclasses.fields(ours) if f.name in theirs]
    assert len(fields) >= 8
    assert {n: getattr(ours, n) for n in fields} == {n: plain(theirs[n]) for n in fields}


def test_output_projection_is_nextgpt_image_textfclayer():
    """NExT-GPT builds TextFcLayer(4096, 768, num_input_tokens=4, num_output_tokens=77, mode="transformer")
    for images, with nn.Transformer(d_model=512, nhead=4, 4 + 4 layers, dim_feedforward=4 * 512)."""
    assert OutputProjectionConfig() == OutputProjectionConfig.official("image")
    c = OutputProjectionConfig()
    assert (c.in_dim, c.out_dim, c.num_signal_tokens, c.num_queries) == (4096, 768, 4, 77)
    assert (c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers, c.dim_feedforward) == (512, 4, 4, 4, 2048)


def test_tiny_configs_stay_small():
    import torch

    from minignext import weights
    for config in (LlamaConfig.tiny(), LlamaConfig.tiny(vocab_size=50)):
        with torch.device("meta"):
            assert sum(p.numel() for p in weights.build_on_meta(Llama, config).parameters()) < 1e6
    assert UNet2DConditionConfig.tiny().block_out_channels == (32, 64)
    assert UNet3DConditionConfig.tiny(cross_attention_dim=16).cross_attention_dim == 16
    assert AutoencoderKLConfig.tiny().block_out_channels == (32, 64)
    assert HifiGanConfig.tiny().hop_length == 16
    assert CLIPTextConfig.tiny().hidden_size == CLIPVisionConfig.tiny().hidden_size == 64
