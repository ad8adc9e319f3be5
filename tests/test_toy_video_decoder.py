"""The toy video decoder: the 3D UNet grown out of the image UNet, a tiny training run written in the
TextToVideoSD layout (checked by loading the UNet with diffusers), and the shipped weights."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from minignext.toy import checkers, decoder_text
from minignext.toy import train_image_decoder as image_decoder
from minignext.toy import train_video_decoder as video_decoder
from minignext.toy.trainer import RunArgs
from minignext.unet import UNet2DCondition
from conftest import perturb


def test_video_unet_starts_as_the_image_unet_on_every_frame():
    torch.manual_seed(0)
    image = UNet2DCondition(image_decoder.unet_config()).eval()
    perturb(image)
    video = video_decoder.unet_from_image(image).eval()
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 8, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    with torch.no_grad():
        got = video(x, torch.tensor(300), cond)
        frames = x.transpose(1, 2).flatten(0, 1)                      # (B*F, C, h, w)
        want = image(frames, torch.tensor(300), encoder_hidden_states=cond.repeat_interleave(8, 0))
    assert_close(got, want.unflatten(0, (2, 8)).transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_decoder")
    image_dir = image_decoder.OUT_DIR
    if not (image_dir / "model_index.json").is_file():
        image_dir = root / "image"
        image_decoder.train(RunArgs(scale=0.002, progress=False, resume=False, runs_dir=root / "runs"),
                            out_dir=image_dir)
    summary = video_decoder.train(RunArgs(scale=0.002, progress=False, resume=False, runs_dir=root / "runs"),
                                  out_dir=root / "out", image_dir=image_dir)
    return root / "out", summary


def test_tiny_training_writes_a_text_to_video_folder(tiny_run):
    folder, summary = tiny_run
    for name in ("model_index.json", "sampling.json", "unet/config.json", "vae/config.json",
                 "text_encoder/config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (folder / name).is_file(), name
    assert np.isfinite(summary["unet"]["loss"])
    pipe, settings = video_decoder.load_pipeline(folder)
    assert settings == video_decoder.SAMPLING
    clips = pipe(prompt=["a red circle moving left"], num_frames=settings["num_frames"], num_inference_steps=2,
                 guidance_scale=3.0, seed=0, progress=False)
    assert clips.shape == (1, 8, 32, 32, 3) and np.isfinite(clips).all()


def test_tiny_training_unet_is_the_3d_unet_with_both_temporal_extensions(tiny_run):
    """The toy video UNet is diffusers' UNet3DConditionModel plus frame positions and text in the temporal
    attentions; tests/test_unet3d.py checks both against diffusers' TransformerTemporalModel."""
    folder, _ = tiny_run
    pipe, _ = video_decoder.load_pipeline(folder)
    cfg = pipe.unet.config
    assert cfg.temporal_positions >= 8 and cfg.temporal_cross_attention
    attn = pipe.unet.down_blocks[0].temp_attentions[0]
    assert attn.cross and attn.transformer_blocks[0].pos_embed is not None
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    with torch.no_grad():
        a, b = pipe.unet(x.expand(2, -1, -1, -1, -1), 400, cond)
    assert (a - b).abs().max() > 0


def test_direction_positions_find_the_first_direction_word():
    tok = decoder_text.build_tokenizer()
    ids = tok(["a red circle moving to the left", "a box that moves upwards", "a blue box", ""],
              max_length=tok.model_max_length)
    assert video_decoder.direction_positions(tok, ids).tolist() == [7, 5, decoder_text.CONTEXT_LENGTH,
                                                                    decoder_text.CONTEXT_LENGTH]


def spread(states):
    """(D, T, W) states of one caption in D directions -> (T,) mean distance between directions / norm."""
    return (states[:, None] - states[None]).norm(dim=-1).mean((0, 1)) / states.norm(dim=-1).mean(0)


def test_text_encoder_learns_the_direction_words_and_keeps_the_image_states(tmp_path):
    tok = decoder_text.build_tokenizer()
    image_text = decoder_text.new_text_encoder(tok, seed=3).requires_grad_(False)
    perturb(image_text)
    args = RunArgs(scale=0.4, progress=False, resume=False, runs_dir=tmp_path)         # 120 steps
    video_text, run = video_decoder.train_text_encoder(image_text, tok, args)
    assert run.history[-1]["loss"] < 0.5 * run.history[0]["loss"]
    assert not video_text.training and not any(p.requires_grad for p in video_text.parameters())
    caps = [f"a red circle moving {w}" for w in ("left", "right", "up", "down")]
    old, new = (decoder_text.encode(e, tok, caps) for e in (image_text, video_text))
    at = video_decoder.direction_positions(tok, tok(caps[:1], max_length=tok.model_max_length)).item()
    assert spread(new)[:at].max() < 1e-5                               # causal: the words before it are alike
    assert spread(new)[at:].min() > 0.3 and spread(new)[at:].min() > 3 * spread(old)[at + 1:].max()
    images = ["a red circle", "a picture of a blue box", "a triangle that is green"]
    old, new = (decoder_text.encode(e, tok, images) for e in (image_text, video_text))
    assert (new - old).norm() < 0.5 * old.norm()


def test_tiny_training_text_encoder_is_the_image_decoders_taught_the_directions(tiny_run):
    folder, _ = tiny_run
    from safetensors.torch import load_file
    mine = load_file(folder / "text_encoder" / "model.safetensors")
    image_dir = image_decoder.OUT_DIR if (image_decoder.OUT_DIR / "model_index.json").is_file() else folder.parent / "image"
    theirs = load_file(image_dir / "text_encoder" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)
    assert any(not torch.equal(mine[k], theirs[k]) for k in mine)


def test_train_needs_an_image_decoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train image_decoder first"):
        video_decoder.train(RunArgs(scale=0.002, progress=False, runs_dir=tmp_path / "runs"), out_dir=tmp_path / "out",
                            image_dir=tmp_path / "nothing")


SHIPPED = video_decoder.OUT_DIR


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="no shipped toy video decoder")
def test_shipped_video_decoder_moves_one_object_of_the_right_colour_the_asked_way():
    """A few held-out prompts; the eval (tests/test_toy_eval.py) measures it on 48 + 16."""
    pipe, settings = video_decoder.load_pipeline()
    assert pipe.encode_text(["a red circle moving left"]).shape == (1, decoder_text.CONTEXT_LENGTH, decoder_text.WIDTH)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.alphas_cumprod[-1] == 0
    objs, dirs, caps = video_decoder.prompts(4, seed=7, split="train", phrasing="test")
    clips = pipe(prompt=caps, seed=7, progress=False, **settings)
    assert clips.shape == (4, 8, 32, 32, 3)
    verdicts = [checkers.check_video(c, want={"colour": o.colour, "direction": d}) for c, o, d in zip(clips, objs, dirs)]
    assert sum(v.ok for v in verdicts) >= 3, verdicts
