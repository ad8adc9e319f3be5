"""ImageBind against the official model code (imagebind-unofficial, test-only), fp32, eval mode."""

import functools
import json

import pytest
import torch

import oracles
from minignext import cli, imagebind, weights
from minignext.imagebind import ImageBind, ImageBindConfig

# Shrunk branches we do not implement, so the official constructor stays fast.
LEFT_OUT_KWARGS = dict(depth_embed_dim=8, depth_num_blocks=1, depth_num_heads=2, thermal_embed_dim=8,
                       thermal_num_blocks=1, thermal_num_heads=2, imu_embed_dim=8, imu_num_blocks=1,
                       imu_num_heads=2)

CONFIGS = {
    "small": dict(kernel_size=(2, 32, 32), out_embed_dim=16, vision_embed_dim=32, vision_num_blocks=2,
                  vision_num_heads=4, audio_embed_dim=24, audio_num_blocks=2, audio_num_heads=3,
                  audio_num_mel_bins=48, audio_target_len=64, text_embed_dim=32, text_num_blocks=2,
                  text_num_heads=2),
    "wider": dict(kernel_size=(2, 28, 28), out_embed_dim=24, vision_embed_dim=48, vision_num_blocks=3,
                  vision_num_heads=6, audio_embed_dim=32, audio_num_blocks=1, audio_num_heads=4,
                  audio_kernel_size=8, audio_stride=6, audio_num_mel_bins=32, audio_target_len=40,
                  text_embed_dim=16, text_num_blocks=3, text_num_heads=4),
}


def official(kwargs, seed=0):
    torch.manual_seed(seed)
    ref = oracles.imagebind_model().ImageBindModel(**kwargs, **LEFT_OUT_KWARGS).eval()
    with torch.no_grad():        # the official init leaves biases at 0 and norms at 1: randomise all
        for name, p in ref.named_parameters():
            if "log_logit_scale" in name:
                p.add_(0.3)
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    return ref


def save_official(ref, kwargs, folder):
    state = {k: v for k, v in ref.state_dict().items()}     # the official keys, all branches
    weights.save_safetensors(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(ImageBindConfig(**kwargs).to_dict()))
    return folder


def inputs(c: ImageBindConfig, batch=2, seed=1):
    return _inputs(c.audio_num_mel_bins, c.audio_target_len, batch, seed)


@functools.lru_cache
def _inputs(mels, frames, batch, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49000, (batch, 77), generator=g)
    for row, n in enumerate([5, 76][:batch]):
        ids[row, n] = 49407                      # end token = the largest id
        ids[row, n + 1:] = 0
    return {
        "image": torch.randn(batch, 3, 224, 224, generator=g),
        "video": torch.randn(batch, 3, 3, 2, 224, 224, generator=g),     # 3 clips of 2 frames
        "image_clips": torch.randn(batch, 2, 3, 224, 224, generator=g),  # 2 one-frame clips (crops)
        "audio": torch.randn(batch, 3, 1, mels, frames, generator=g),
        "audio_one": torch.randn(batch, 1, mels, frames, generator=g),
        "text": ids,
    }


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs = CONFIGS[request.param]
    ref = official(kwargs)
    ours = ImageBind.from_pretrained(save_official(ref, kwargs, tmp_path_factory.mktemp(request.param)))
    return ref, ours


CASES = [("image", "vision"), ("video", "vision"), ("image_clips", "vision"), ("audio", "audio"), ("audio_one", "audio"), ("text", "text")]


@pytest.mark.parametrize("name,modality", CASES, ids=[c[0] for c in CASES])
def test_embeddings_match_official(pair, name, modality):
    ref, ours = pair
    x = inputs(ours.config)[name]
    with torch.no_grad():
        want = ref({modality: x})[modality]
        got = ours({modality: x})[modality]
    assert got.shape == want.shape == (x.shape[0], ours.config.out_embed_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_trunk_tokens_match_official_stage_by_stage(pair):
    """Stems, then trunks, compared before the heads, for each modality."""
    ref, ours = pair
    x = inputs(ours.config, batch=1)
    with torch.no_grad():
        for modality, value in [("vision", x["image"]), ("audio", x["audio_one"]), ("text", x["text"])]:
            pre = ref.modality_preprocessors[modality](**{modality: value})
            tokens = ours.modality_preprocessors[modality](value)
            torch.testing.assert_close(tokens, pre["trunk"]["tokens"], rtol=0, atol=1e-5)
            want = ref.modality_trunks[modality](**pre["trunk"])
            got = ours.modality_trunks[modality](tokens, causal=modality == "text")
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_embed_has_no_logit_scale(pair):
    ref, ours = pair
    x = inputs(ours.config)
    with torch.no_grad():
        out = ours({"vision": x["image"], "audio": x["audio_one"], "text": x["text"]})
        text_scale = ref.modality_postprocessors["text"][1].log_logit_scale.exp()
        for modality, key, scale in [("vision", "image", 1.0), ("audio", "audio_one", 20.0),
                                     ("text", "text", text_scale)]:
            e = ours.embed(modality, x[key])
            torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[0]))
            torch.testing.assert_close(e * scale, out[modality], rtol=1e-5, atol=1e-5)


def test_convert_round_trip(tmp_path):
    kwargs = CONFIGS["small"]
    ref = official(kwargs, seed=3)
    torch.save(ref.state_dict(), tmp_path / "imagebind_tiny.pth")
    config = ImageBindConfig(**kwargs)
    out = imagebind.convert_checkpoint(tmp_path / "imagebind_tiny.pth", tmp_path / "converted", config=config)
    stored = weights.load_safetensors(out)
    for key, value in ref.state_dict().items():
        if key.split(".")[1] in imagebind.LEFT_OUT:
            assert key not in stored
        else:
            torch.testing.assert_close(stored[key], value, rtol=0, atol=0)
    ours = ImageBind.from_pretrained(out)
    assert ours.config == config
    ids = inputs(config)["text"]
    with torch.no_grad():
        torch.testing.assert_close(ours({"text": ids})["text"], ref({"text": ids})["text"], rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError):
        imagebind.convert_checkpoint(tmp_path / "imagebind_tiny.pth", out, config=config)
    with pytest.raises(weights.WeightsError, match="does not fit"):      # the default is huge()
        imagebind.convert_checkpoint(tmp_path / "imagebind_tiny.pth", tmp_path / "other")


def test_convert_command_line(tmp_path, capsys):
    torch.save({"not.imagebind": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "imagebind", str(tmp_path / "bad.pth"), str(tmp_path / "out")])
    assert exit_.value.code == 2 and "does not fit" in capsys.readouterr().err


def test_tiny_config_trains_and_rejects_bad_inputs():
    config = ImageBindConfig.tiny()
    assert config.vision_grid == (1, 4, 4) and config.audio_grid == (12, 19)
    model = ImageBind(config)
    x = {"vision": torch.randn(2, 3, 32, 32), "audio": torch.randn(2, 1, 128, 204),
         "text": torch.randint(0, 49408, (2, 77))}
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, 32) for k in x}
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "a parameter gets no gradient"
    with pytest.raises(ValueError, match="vision: expected"):
        model({"vision": torch.randn(2, 3, 48, 48)})
    with pytest.raises(ValueError, match="audio: expected"):
        model({"audio": torch.randn(2, 128, 204)})
    with pytest.raises(ValueError, match="text: expected"):
        model({"text": torch.randn(2, 77)})
    with pytest.raises(ValueError, match="unknown modality"):
        model.embed("depth", torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        ImageBindConfig(vision_embed_dim=30, vision_num_heads=4)


def test_huge_preset_matches_the_reference_facts():
    c = ImageBindConfig.huge()
    assert c.vision_grid == (1, 16, 16) and c.audio_grid == (12, 19)
    assert (c.vision_embed_dim, c.vision_num_blocks, c.text_embed_dim, c.out_embed_dim) == (1280, 32, 1024, 1024)
    with torch.device("meta"):
        model = ImageBind(c)
    assert model.modality_preprocessors["vision"].pos_embedding_helper.pos_embed.shape == (1, 257, 1280)
    assert model.modality_preprocessors["audio"].pos_embedding_helper.pos_embed.shape == (1, 229, 768)
