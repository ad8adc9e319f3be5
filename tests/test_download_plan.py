"""`minignext download nextgpt-7b --dry-run`: the files it would fetch (offline: what it would
choose), and the memory figures per stage, each rebuilt here on the meta device."""

import json
from pathlib import Path

import pytest

from minignext import cli, presets, weights
from minignext.clip import CLIPText, CLIPTextConfig
from minignext.imagebind import ImageBind, ImageBindConfig
from minignext.llama import Llama, LlamaConfig
from minignext.projection import OutputProjection, OutputProjectionConfig
from minignext.unet import UNet2DCondition, UNet2DConditionConfig
from minignext.unet3d import UNet3DCondition, UNet3DConditionConfig
from minignext.vae import AutoencoderKL, AutoencoderKLConfig
from minignext.vocoder import HifiGan, HifiGanConfig

CONFIGS = Path(__file__).parent / "data" / "configs"


def params(cls, config_cls, name, **changes):
    config = config_cls.from_hf({**json.loads((CONFIGS / name / "config.json").read_text()), **changes})
    return sum(p.numel() for p in weights.build_on_meta(cls, config).parameters())


def test_stage_figures_are_the_published_models():
    projections = 1024 * 4096 + 4096 + sum(
        sum(p.numel() for p in weights.build_on_meta(OutputProjection, OutputProjectionConfig.official(m)).parameters())
        for m in ("image", "video", "audio"))
    rebuilt = {
        "ImageBind-huge": sum(p.numel() for p in weights.build_on_meta(ImageBind, ImageBindConfig.huge()).parameters()),
        "Vicuna-7B, vocabulary 32038": params(Llama, LlamaConfig, "vicuna-7b-v0", vocab_size=32038),
        "input + 3 output projections": projections,
        "image": [params(UNet2DCondition, UNet2DConditionConfig, "sd15/unet"),
                  params(AutoencoderKL, AutoencoderKLConfig, "sd15/vae"),
                  params(CLIPText, CLIPTextConfig, "sd15/text_encoder")],
        "audio": [params(UNet2DCondition, UNet2DConditionConfig, "audioldm-l-full/unet"),
                  params(AutoencoderKL, AutoencoderKLConfig, "audioldm-l-full/vae"),
                  params(HifiGan, HifiGanConfig, "audioldm-l-full/vocoder")],
        "video": [params(UNet3DCondition, UNet3DConditionConfig, "zeroscope-v2-576w/unet"),
                  params(AutoencoderKL, AutoencoderKLConfig, "zeroscope-v2-576w/vae"),
                  params(CLIPText, CLIPTextConfig, "zeroscope-v2-576w/text_encoder")]}
    stages = list(presets.STAGES.values())
    assert stages[0] == {"ImageBind-huge": rebuilt["ImageBind-huge"]}
    assert stages[1] == {k: rebuilt[k] for k in ("Vicuna-7B, vocabulary 32038", "input + 3 output projections")}
    assert [list(s.values()) for s in stages[2:]] == [rebuilt["image"], rebuilt["audio"], rebuilt["video"]]


def test_dry_run_offline_names_every_repo_and_the_memory(monkeypatch):
    def unreachable(repo):
        raise ConnectionError("no network")
    monkeypatch.setattr(weights, "hub_files", unreachable)
    lines = list(presets.dry_run("nextgpt-7b"))
    text = "\n".join(lines)
    for repo in presets.HUB.values():
        assert repo in text
    assert "unet, vae, scheduler, vocoder" in text and "ImageBind-huge" in text and "Vicuna-7B-v0" in text
    assert "LLM: Vicuna-7B with NExT-GPT's 38 tokens, + projections: 13.68 GB + 1.07 GB KV cache" in text
    assert "at most (encoder + LLM + the largest decoder" in lines[-1] and "20.82 GB" in lines[-1]


def test_dry_run_lists_the_chosen_files_with_sizes(monkeypatch):
    from test_legacy_checkpoints import SD15_FILES

    listing = {name: 1_000_000 for name in SD15_FILES}
    listing["unet/diffusion_pytorch_model.safetensors"] = 3_438_167_536
    monkeypatch.setattr(weights, "hub_files", lambda repo: listing)
    lines = list(presets.dry_run("nextgpt-7b"))
    sd = lines[lines.index(next(l for l in lines if l.startswith(presets.HUB["image"]))):][:13]
    assert sd[0] == f"{presets.HUB['image']}: 12 files, 3.45 GB"
    assert "  unet/diffusion_pytorch_model.safetensors  3.44 GB" in sd
    assert not any(".ckpt" in l or "safety_checker" in l or "fp16" in l for l in sd)


@pytest.mark.parametrize("preset", ["toy", "tiny-random"])
def test_dry_run_of_local_presets(preset, capsys):
    cli.main(["download", preset, "--dry-run"])
    assert "nothing to download" in capsys.readouterr().out
