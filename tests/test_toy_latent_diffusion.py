"""The latent diffusion training kit the toy decoders share: the loss, the pixels, the denoiser's two
ways of reading a caption, and the pipeline folder, which writes the shipped decoders back byte for byte."""

import json

import numpy as np
import pytest
import torch

from minignext.toy import decoder_text, latent_diffusion, world
from minignext.toy import train_audio_decoder as audio_decoder
from minignext.toy import train_image_decoder as image_decoder
from minignext.toy import train_video_decoder as video_decoder
from minignext.toy.trainer import TOY_DIR, RunArgs, read_loss_log
from minignext.unet import UNet2DCondition
from minignext.unet3d import UNet3DCondition
from minignext.vae import AutoencoderKL
from minignext.vocoder import GriffinLimConfig


def test_pixels_are_channels_first_in_minus_one_to_one():
    rng = np.random.default_rng(0)
    media = world.sample_media("video", 2, rng)
    clips = world.render_batch(media, rng)
    x = latent_diffusion.to_pixels(clips)
    assert x.shape == (2, world.N_FRAMES, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[1, 3, 2], torch.from_numpy(clips[1, 3, :, :, 2]).float() / 127.5 - 1)
    assert latent_diffusion.to_pixels(np.array([[[[0, 255, 0]]]], np.uint8)).flatten().tolist() == [-1.0, 1.0, -1.0]


@pytest.mark.parametrize("class_labels", [False, True])
def test_denoiser_trains_the_unet_and_a_text_encoder_only_if_it_may(tmp_path, class_labels):
    """Cross-attention (image, video) reads the text states and may train the encoder; class_labels (audio)
    reads the pooled embedding of a frozen encoder, which comes back as it was."""
    tok = decoder_text.build_tokenizer()
    torch.manual_seed(0)
    if class_labels:
        unet = UNet2DCondition(audio_decoder.unet_config())
        text = decoder_text.new_text_encoder(tok, with_projection=True, projection_dim=audio_decoder.EMBED_DIM)
        text.requires_grad_(False)
    else:
        unet = UNet2DCondition(image_decoder.unet_config())
        text = decoder_text.new_text_encoder(tok)
    shape = (8, 4) + ((16, 8) if class_labels else (8, 8))
    latents = (torch.randn(shape), torch.full(shape, 0.1), 1.0)
    text_before = {k: v.clone() for k, v in text.state_dict().items()}
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    args = RunArgs(scale=1.0, progress=False, runs_dir=tmp_path)
    ema_unet, ema_text, run = latent_diffusion.train_denoiser(
        "tiny", unet, (text, tok), latents, lambda i, rng: ["a red circle", "a deep steady tone"][i % 2], args,
        steps=3, batch=4, lr=1e-3, ema_decay=0.5, warmup=1, scheduler_config=image_decoder.SCHEDULER,
        class_labels=class_labels)
    assert len(read_loss_log(args.name("tiny"), runs_dir=tmp_path)) == 3
    assert set(run.modules) == ({"unet", "ema_unet"} if class_labels else
                                {"unet", "text_encoder", "ema_unet", "ema_text_encoder"})
    assert ema_unet is not unet and any(not torch.equal(v, unet_before[k]) for k, v in ema_unet.state_dict().items())
    moved = [not torch.equal(v, text_before[k]) for k, v in ema_text.state_dict().items()]
    assert (ema_text is text and not any(moved)) if class_labels else (ema_text is not text and any(moved))


def _load_shipped(kind, folder):
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32)
    unet_class = UNet3DCondition if kind == "video" else UNet2DCondition
    unet = unet_class.from_pretrained(folder / "unet", dtype=torch.float32)
    text, tok = decoder_text.load(folder)
    return unet, vae, text, tok


SHIPPED = {"image": (image_decoder, "StableDiffusionPipeline", "UNet2DConditionModel"),
           "audio": (audio_decoder, "AudioLDMPipeline", "UNet2DConditionModel"),
           "video": (video_decoder, "TextToVideoSDPipeline", "UNet3DConditionModel")}


@pytest.mark.parametrize("kind", list(SHIPPED))
def test_save_pipeline_writes_the_shipped_decoders_back_byte_for_byte(tmp_path, kind):
    """The shipped folders were written by the code before the kit; loaded and saved again they are the
    same files, so the layout (names, configs, dtypes) has not moved."""
    module, pipeline_class, unet_class = SHIPPED[kind]
    folder = TOY_DIR / f"{kind}_decoder"
    if not (folder / "model_index.json").is_file():
        pytest.skip(f"no shipped toy {kind} decoder")
    unet, vae, text, tok = _load_shipped(kind, folder)
    vocoder = GriffinLimConfig.from_hf(json.loads((folder / "vocoder" / "config.json").read_text())) \
        if kind == "audio" else None
    sampling = json.loads((folder / "sampling.json").read_text())
    assert sampling == module.SAMPLING
    latent_diffusion.save_pipeline(tmp_path, pipeline_class, unet, unet_class, vae, text, tok, sampling,
                                   module.SCHEDULER, vocoder=vocoder)
    shipped = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


def test_diffusion_loss_draws_the_asked_share_of_t_from_the_noisiest_30_percent():
    from minignext.schedulers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(image_decoder.SCHEDULER)
    seen = []

    def unet_fn(x, t, cond):
        seen.append(t)
        return torch.zeros_like(x)

    latents = torch.zeros(4000, 1)
    for share in (0.0, 0.5, 1.0):
        latent_diffusion.diffusion_loss(unet_fn, scheduler, latents, None, torch.Generator().manual_seed(0),
                                     high_noise_share=share)
        high = (seen[-1] >= 700).float().mean().item()
        assert abs(high - (0.3 + 0.7 * share)) < 0.03, (share, high)


def test_diffusion_loss_targets_v_under_a_v_prediction_schedule():
    """With the UNet's answer set to v = sqrt(abar) eps - sqrt(1 - abar) x0 the loss is zero; eps is not."""
    from minignext.schedulers import DDPMScheduler

    scheduler = DDPMScheduler.from_config({**image_decoder.SCHEDULER, "prediction_type": "v_prediction",
                                           "rescale_betas_zero_snr": True})
    latents = torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    abar = scheduler.alphas_cumprod

    def v_of(x, t, cond):                 # recover the noise from x_t, then form v
        a = abar[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * latents) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * latents

    def eps_of(x, t, cond):
        a = abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * latents) / (1 - a).sqrt()

    g = lambda: torch.Generator().manual_seed(0)           # noqa: E731
    assert latent_diffusion.diffusion_loss(v_of, scheduler, latents, None, g()) < 1e-8
    assert latent_diffusion.diffusion_loss(eps_of, scheduler, latents, None, g()) > 0.1
