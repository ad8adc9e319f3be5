"""The toy image decoder: its text encoder and tokenizer, a tiny training run written in the Stable
Diffusion layout (checked by loading it with diffusers and transformers), and the shipped weights."""

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from minignext.diffusion import ImagePipeline
from minignext.toy import checkers, decoder_text, latent_diffusion, world
from minignext.toy import train_image_decoder as image_decoder
from minignext.toy.trainer import RunArgs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_decoder")
    summary = image_decoder.train(RunArgs(scale=0.002, progress=False, resume=False, runs_dir=root / "runs"),
                                  out_dir=root / "out")
    return root / "out", summary


def test_tokenizer_gives_one_token_per_word_of_every_caption():
    tok = decoder_text.build_tokenizer()
    rng = np.random.default_rng(0)
    for i in range(300):
        obj = world.sample_object(rng, "all")
        modality = ("image", "audio", "video")[i % 3]
        text = world.caption(obj, rng, modality, world.DIRECTIONS[i % 4] if modality == "video" else None,
                             ("train", "test")[i % 2])
        ids = tok.encode(text)
        assert len(ids) == len(text.split()) and tok.tokenizer.token_to_id(decoder_text.UNK) not in ids, text
        assert tok.decode(ids) == text
    assert tok(["a red circle"]).shape == (1, decoder_text.CONTEXT_LENGTH)
    assert tok.tokenizer.token_to_id(decoder_text.UNK) in tok.encode("a red zebra")


def test_caption_dropout_rate():
    kept = decoder_text.drop_captions(["a red circle"] * 4000, 0.1, np.random.default_rng(0))
    assert abs(kept.count("") / 4000 - 0.1) < 0.02


def test_text_encoder_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = decoder_text.build_tokenizer()
    enc = decoder_text.new_text_encoder(tok, seed=3).eval()
    decoder_text.save(tmp_path, enc, tok, dtype=torch.float32)
    ref = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    mine, tok2 = decoder_text.load(tmp_path)
    ids = tok2(["a blue plus sign that is blue", "", "a picture of a red box"])
    with torch.no_grad():
        assert_close(mine(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
        assert_close(decoder_text.encode(mine, tok2, ["a red circle"]), enc(tok(["a red circle"])).last_hidden_state)
    with pytest.raises(FileExistsError):
        decoder_text.save(tmp_path, enc, tok)


def test_tiny_training_writes_a_stable_diffusion_folder(tiny_run):
    folder, summary = tiny_run
    for name in ("model_index.json", "sampling.json", "unet/config.json", "vae/config.json",
                 "text_encoder/config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (folder / name).is_file(), name
    assert summary["megabytes"] < 6 and np.isfinite(summary["unet"]["loss"])
    pipe, settings = image_decoder.load_pipeline(folder)
    assert settings == image_decoder.SAMPLING and pipe.dtype == torch.float32
    images = pipe(prompt=["a red circle", "a blue box"], num_inference_steps=2, guidance_scale=3.0, seed=0,
                  output_type="np", progress=False)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_tiny_training_folder_matches_diffusers(tiny_run):
    diffusers = pytest.importorskip("diffusers")
    folder, _ = tiny_run
    pipe = ImagePipeline.from_pretrained(folder, dtype=torch.float32)
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    ref_vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        assert_close(pipe.unet(x, 500, encoder_hidden_states=cond), ref_unet(x, 500, encoder_hidden_states=cond).sample,
                     atol=1e-4, rtol=1e-4)
        assert_close(pipe.vae.decode(x), ref_vae.decode(x).sample, atol=1e-4, rtol=1e-4)
        assert_close(pipe.vae.encode(img).mean, ref_vae.encode(img).latent_dist.mean, atol=1e-4, rtol=1e-4)
    assert ref_vae.config.scaling_factor == pipe.vae.scaling_factor


def test_save_pipeline_never_overwrites(tiny_run):
    folder, _ = tiny_run
    with pytest.raises(FileExistsError):
        latent_diffusion.save_pipeline(folder, "StableDiffusionPipeline", None, "UNet2DConditionModel", None, None,
                                       None, image_decoder.SAMPLING, image_decoder.SCHEDULER)


SHIPPED = image_decoder.OUT_DIR


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="no shipped toy image decoder")
def test_shipped_image_decoder_draws_what_it_is_asked():
    pipe, settings = image_decoder.load_pipeline()
    assert pipe.unet.config.cross_attention_dim == decoder_text.WIDTH
    cond = pipe.encode_text(["a red circle"])
    assert cond.shape == (1, decoder_text.CONTEXT_LENGTH, decoder_text.WIDTH)
    objs, caps = image_decoder.prompts(12, seed=7, split="train", phrasing="test")
    images = pipe(prompt=caps, seed=7, output_type="np", progress=False, **settings)
    assert images.shape == (12, 32, 32, 3)
    right = sum(checkers.check_image(img, want=o).ok for img, o in zip(images, objs))
    assert right >= 10, f"only {right}/12 images right"
    assert json.loads((SHIPPED / "sampling.json").read_text()) == settings
