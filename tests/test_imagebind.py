"""ImageBind against the official model code (imagebind-unofficial, test-only), fp32, eval mode."""

import functools
import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

import oracles
from minignext import cli, imagebind, media, weights
from minignext.imagebind import ImageBind, ImageBindConfig

CONFIGS = {
    "small": dict(kernel_size=(2, 32, 32), out_embed_dim=16, vision_embed_dim=32, vision_num_blocks=2,
                  vision_num_heads=4, audio_embed_dim=24, audio_num_blocks=2, audio_num_heads=3,
                  audio_num_mel_bins=48, audio_target_len=64, text_embed_dim=32, text_num_blocks=2,
                  text_num_heads=2, depth_embed_dim=16, depth_kernel_size=32, depth_num_blocks=2,
                  depth_num_heads=2, thermal_embed_dim=24, thermal_kernel_size=28, thermal_num_blocks=1,
                  thermal_num_heads=3, imu_embed_dim=16, imu_num_blocks=2, imu_num_heads=4),
    "wider": dict(kernel_size=(2, 28, 28), out_embed_dim=24, vision_embed_dim=48, vision_num_blocks=3,
                  vision_num_heads=6, audio_embed_dim=32, audio_num_blocks=1, audio_num_heads=4,
                  audio_kernel_size=8, audio_stride=6, audio_num_mel_bins=32, audio_target_len=40,
                  text_embed_dim=16, text_num_blocks=3, text_num_heads=4, depth_embed_dim=32,
                  depth_kernel_size=56, depth_num_blocks=1, depth_num_heads=4, thermal_embed_dim=16,
                  thermal_kernel_size=32, thermal_num_blocks=2, thermal_num_heads=2, imu_embed_dim=24,
                  imu_num_blocks=1, imu_num_heads=3, depth_drop_path=0.2, imu_drop_path=0.5),
}


def official(kwargs, seed=0):
    torch.manual_seed(seed)
    ref = oracles.imagebind_model().ImageBindModel(**kwargs).eval()
    with torch.no_grad():        # the official init leaves biases at 0 and norms at 1: randomise all
        for name, p in ref.named_parameters():
            if "log_logit_scale" in name:
                p.add_(0.3)
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    return ref


def save_official(ref, kwargs, folder):
    """The official keys, and a config.json that holds only the constructor arguments given:
    every field left out must mean the official default."""
    weights.save_safetensors(ref.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(kwargs))
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
        "depth": torch.randn(batch, 1, 224, 224, generator=g),
        "depth_clips": torch.randn(batch, 2, 1, 224, 224, generator=g),
        "thermal": torch.randn(batch, 1, 224, 224, generator=g),
        "imu": torch.randn(batch, 6, 2000, generator=g),
    }


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs = CONFIGS[request.param]
    ref = official(kwargs)
    ours = ImageBind.from_pretrained(save_official(ref, kwargs, tmp_path_factory.mktemp(request.param)))
    return ref, ours


CASES = [("image", "vision"), ("video", "vision"), ("image_clips", "vision"), ("audio", "audio"),
         ("audio_one", "audio"), ("text", "text"), ("depth", "depth"), ("depth_clips", "depth"),
         ("thermal", "thermal"), ("imu", "imu")]


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
        for modality, key in [("vision", "image"), ("audio", "audio_one"), ("text", "text"), ("depth", "depth"),
                              ("thermal", "thermal"), ("imu", "imu")]:
            value = x[key]
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
        out = ours({"vision": x["image"], "audio": x["audio_one"], "text": x["text"], "depth": x["depth"],
                    "thermal": x["thermal"], "imu": x["imu"]})
        text_scale = ref.modality_postprocessors["text"][1].log_logit_scale.exp()
        for modality, key, scale in [("vision", "image", 1.0), ("audio", "audio_one", 20.0),
                                     ("text", "text", text_scale), ("depth", "depth", 5.0),
                                     ("thermal", "thermal", 10.0), ("imu", "imu", 5.0)]:
            e = ours.embed(modality, x[key])
            torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[0]))
            torch.testing.assert_close(e * scale, out[modality], rtol=1e-5, atol=1e-5)
    fresh = ImageBind(ours.config).state_dict()         # the fixed scales are buffers; a new model has the official ones
    for key, value in ref.state_dict().items():
        if key.endswith("log_logit_scale") and not key.startswith("modality_postprocessors.text"):
            torch.testing.assert_close(fresh[key], value, rtol=0, atol=1e-6)


def test_convert_round_trip(tmp_path):
    kwargs = CONFIGS["small"]
    ref = official(kwargs, seed=3)
    torch.save(ref.state_dict(), tmp_path / "imagebind_tiny.pth")
    config = ImageBindConfig(**kwargs)
    out = imagebind.convert_checkpoint(tmp_path / "imagebind_tiny.pth", tmp_path / "converted", config=config)
    stored = weights.load_safetensors(out)
    assert stored.keys() == ref.state_dict().keys()              # all six branches, official names
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(stored[key], value, rtol=0, atol=0)
    ours = ImageBind.from_pretrained(out)
    assert ours.config == config
    ids = inputs(config)["text"]
    with torch.no_grad():
        torch.testing.assert_close(ours({"text": ids})["text"], ref({"text": ids})["text"], rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError):
        imagebind.convert_checkpoint(tmp_path / "imagebind_tiny.pth", out, config=config)
    old = tmp_path / "three_branches"            # what the converter wrote before it kept all six
    weights.save_safetensors({k: v for k, v in stored.items() if k.split(".")[1] in ("vision", "text", "audio")},
                             old / "model.safetensors")
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.to_dict().items() if k != "modalities"}))
    with pytest.raises(weights.WeightsError, match="builds the depth, thermal, imu branch.*convert imagebind_huge.pth again"):
        ImageBind.from_pretrained(old)
    with pytest.raises(weights.WeightsError, match="does not fit"):      # the default is huge()
        imagebind.convert_checkpoint(tmp_path / "imagebind_tiny.pth", tmp_path / "other")


def test_convert_command_line(tmp_path, capsys):
    torch.save({"not.imagebind": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "imagebind", str(tmp_path / "bad.pth"), str(tmp_path / "out")])
    assert exit_.value.code == 2 and "does not fit" in capsys.readouterr().err


def test_tiny_config_trains_and_rejects_bad_inputs():
    config = ImageBindConfig.tiny()
    assert config.modalities == imagebind.MODALITIES
    assert config.vision_grid == (1, 4, 4) and config.audio_grid == (12, 19) and config.depth_grid == (4, 4)
    model = ImageBind(config)
    x = {"vision": torch.randn(2, 3, 32, 32), "audio": torch.randn(2, 1, 128, 204),
         "text": torch.randint(0, 49408, (2, 77)), "depth": torch.randn(2, 1, 32, 32),
         "thermal": torch.randn(2, 1, 32, 32), "imu": torch.randn(2, 6, 2000)}
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
    with pytest.raises(ValueError, match=r"depth: expected \(B, 1, 32, 32\)"):
        model({"depth": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ValueError, match=r"imu: expected \(B, 6, 2000\)"):
        model({"imu": torch.randn(2, 2000, 6)})
    with pytest.raises(ValueError, match="'smell' is not an ImageBind modality"):
        model.embed("smell", torch.randn(1, 1, 32, 32))
    three = ImageBind(ImageBindConfig.tiny(modalities=["audio", "vision", "text"]))
    assert three.config.modalities == ("vision", "text", "audio")      # the official order
    assert not any(k.split(".")[1] in ("depth", "thermal", "imu") for k in three.state_dict())
    with pytest.raises(ValueError, match="'depth' was not built in this model"):
        three.embed("depth", torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        ImageBindConfig(vision_embed_dim=30, vision_num_heads=4)
    with pytest.raises(ValueError, match="subset"):
        ImageBindConfig(modalities=("vision", "touch"))


def test_config_defaults_are_the_official_constructors():
    """A config.json in the official names that leaves a field out means the official default."""
    signature = inspect.signature(oracles.imagebind_model().ImageBindModel.__init__)
    official_defaults = {name: p.default for name, p in signature.parameters.items() if name != "self"}
    ours = ImageBindConfig()
    assert {name: getattr(ours, name) for name in official_defaults} == official_defaults
    assert ours.modalities == ("vision", "text", "audio", "depth", "thermal", "imu")


def official_on_meta(**kwargs):
    """The official model at full size without memory: its drop-path schedule calls .item() on
    torch.linspace, which must stay on the CPU."""
    module = oracles.imagebind_model()
    linspace = torch.linspace
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        with torch.device("meta"):
            return module.imagebind_huge() if not kwargs else module.ImageBindModel(**kwargs)
    finally:
        torch.linspace = linspace


def test_huge_layout_matches_the_official_checkpoint(tmp_path, monkeypatch):
    """imagebind_huge.pth, laid out as the official code saves it (its state_dict, built on meta),
    goes through `minignext convert imagebind` and ImageBind.from_pretrained: every key and shape
    of all six branches, no tensor ever allocated."""
    ref = official_on_meta().state_dict()
    torch.save(ref, tmp_path / "imagebind_huge.pth")
    written = {}
    monkeypatch.setattr(weights, "save_safetensors", lambda sd, path, overwrite=False: written.update(sd) or path)
    cli.main(["convert", "imagebind", str(tmp_path / "imagebind_huge.pth"), str(tmp_path / "huge")])
    assert json.loads((tmp_path / "huge" / "config.json").read_text()) == ImageBindConfig.huge().to_dict()
    monkeypatch.setattr(weights, "load_safetensors", lambda folder, **kw: dict(written))
    ours = ImageBind.from_pretrained(tmp_path / "huge").state_dict()
    assert ours.keys() == ref.keys() and len(ref) == 1311
    mismatched = [k for k in ref if ours[k].shape != ref[k].shape]
    assert mismatched == []
    assert {k.split(".")[1] for k in ours} == set(imagebind.MODALITIES)
    # the published 1,200,781,057 counts the parameters of all six branches, not the buffers
    # (the text mask and four fixed logit scales); vision, text and audio alone hold 1,073,097,729
    params = dict(weights.build_on_meta(ImageBind, ImageBindConfig.huge()).named_parameters())
    assert sum(p.numel() for p in params.values()) == 1_200_781_057
    assert sum(p.numel() for k, p in params.items() if k.split(".")[1] in ("vision", "text", "audio")) == 1_073_097_729
    c = ImageBindConfig.huge()
    assert c.vision_grid == (1, 16, 16) and c.audio_grid == (12, 19) and c.depth_grid == (14, 14)
    assert ours["modality_preprocessors.vision.pos_embedding_helper.pos_embed"].shape == (1, 257, 1280)
    assert ours["modality_preprocessors.imu.pos_embed"].shape == (1, 251, 512)


def test_config_json_with_fields_left_out_builds_the_official_shapes(tmp_path):
    """imagebind_huge's own constructor call, as a config.json of just its arguments."""
    kwargs = dict(vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16, text_embed_dim=1024,
                  text_num_blocks=24, text_num_heads=16, out_embed_dim=1024, audio_drop_path=0.1, imu_drop_path=0.7)
    assert ImageBindConfig.from_hf(kwargs) == ImageBindConfig.huge()
    small = dict(vision_embed_dim=64, vision_num_blocks=1, out_embed_dim=32, depth_embed_dim=48)
    ref = {k: v.shape for k, v in official_on_meta(**small).state_dict().items()}
    ours = {k: v.shape for k, v in weights.build_on_meta(ImageBind, ImageBindConfig.from_hf(small)).state_dict().items()}
    assert ours == ref


# ---------------------------------------------------------------- depth, thermal, IMU inputs

def test_thermal_input_matches_the_image_processor_on_grey_levels():
    """PandaGPT's thermal transform (grey, resize, crop, no normalisation) is transformers' CLIP
    image processor without normalisation, on one channel."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_normalize=False)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (180, 300, 3), dtype=np.uint8))
    ref = torch.as_tensor(np.asarray(proc(img.convert("L"), return_tensors="np")["pixel_values"][0]))[:1]
    ours = media.thermal_to_imagebind(img)
    assert ours.shape == (1, 224, 224)
    assert (ours - ref).abs().max() < 1e-6


def test_depth_and_imu_inputs():
    depth = np.full((60, 80), 2.0, dtype=np.float32)
    depth[:, :40] = 0.5                                   # the left half is near: large disparity
    disparity = media.depth_to_disparity(depth, focal_length=500.0)
    assert disparity[0, 0] == pytest.approx(0.075 * 500 / 0.5) and disparity[0, -1] == pytest.approx(0.075 * 500 / 2)
    x = media.depth_to_imagebind(disparity, size=32)
    assert x.shape == (1, 32, 32) and x[0, :, :8].mean() > 3 * x[0, :, -8:].mean()
    torch.testing.assert_close(media.depth_to_imagebind(np.full((50, 70), 7.0), size=16), torch.full((1, 16, 16), 7.0))
    with pytest.raises(ValueError, match="depth must be one map"):
        media.depth_to_disparity(np.ones((2, 3, 4)), 500.0)
    readings = torch.randn(6, 1500)
    out = media.imu_to_imagebind(readings)
    assert out.shape == (6, 2000) and torch.equal(out[:, :1500], readings) and not out[:, 1500:].any()
    assert media.imu_to_imagebind(torch.randn(6, 2500)).shape == (6, 2000)
    assert torch.equal(media.imu_to_imagebind(readings, 1000), readings[:, :1000])
    with pytest.raises(ValueError, match="transpose it"):
        media.imu_to_imagebind(readings.T)
    model = ImageBind(ImageBindConfig.tiny(modalities=("depth", "imu"))).eval()
    with torch.no_grad():
        assert model.embed("depth", x[None]).shape == (1, 32) and model.embed("imu", out[None]).shape == (1, 32)


def test_vision_tower_keeps_the_trunk_tokens(tmp_path):
    """ImageBindVisionTower loads an ImageBind folder's vision stem and trunk (strictly, nothing else) and
    returns the trunk's tokens before the head, class token first."""
    torch.manual_seed(3)
    model = ImageBind(ImageBindConfig.tiny(modalities=("vision", "text"))).eval()
    weights.save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    tower = imagebind.ImageBindVisionTower.from_pretrained(tmp_path)
    assert (tower.config.hidden_size, tower.config.image_size) == (32, 32)
    assert all(k.split(".")[:2] in (["modality_preprocessors", "vision"], ["modality_trunks", "vision"])
               for k in tower.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.modality_trunks["vision"](model.modality_preprocessors["vision"](x))
        got = tower(x).last_hidden_state
    assert got.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"images \(B, 3, 32, 32\)"):
        tower(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="no vision branch"):
        imagebind.ImageBindVisionTower(ImageBindConfig.tiny(modalities=("audio",)))
