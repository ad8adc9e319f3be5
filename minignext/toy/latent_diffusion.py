"""Latent diffusion training, written once for the toy image, audio and video decoders (Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752).

    train_vae        an AutoencoderKL on what the decoder makes (sec. 3.1): L1 + L2 reconstruction,
                     optionally weighted per pixel, and a tiny KL.
    encode_dataset   posterior means and stds of a whole dataset, so that each step draws fresh latents.
    train_denoiser   a UNet on the scaled latents under diffusion_loss (DDPM, Ho et al. 2020, eq. 14, or
                     v-prediction), conditioned on a caption: cross-attention to the text encoder's states
                     (Stable Diffusion, ZeroScope), or AudioLDM's class_labels, the pooled text embedding
                     (class_labels=True); 10% of the captions dropped to "" for classifier-free guidance;
                     an exponential moving average (EMA) of the weights is what ships.
    save_pipeline    the diffusers pipeline folder that minignext.diffusion's pipelines load.

The decoders (train_image_decoder, train_audio_decoder, train_video_decoder) differ only by the
arguments they give these.
"""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from minignext import weights
from minignext.schedulers import DDPMScheduler
from minignext.toy import decoder_text
from minignext.toy.trainer import Run, RunArgs, optimizer_step

STORE_DTYPE = torch.float16
CAPTION_DROPOUT = 0.1


def to_pixels(media: np.ndarray) -> torch.Tensor:
    """uint8 images (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1], what the VAE reconstructs."""
    return torch.from_numpy(media).movedim(-1, -3).float() / 127.5 - 1


class EMA(torch.nn.Module):
    """A shadow copy of a module whose parameters follow the trained ones with `decay`."""

    def __init__(self, module, decay):
        super().__init__()
        self.decay, self.shadow = decay, copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, module):
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - self.decay)


def diffusion_loss(unet_fn, scheduler, latents, cond, generator, high_noise_share=0.0):
    """One DDPM training step's loss: noise latents at a random t (eq. 4), predict the noise (eq. 14)
    or, under a v-prediction schedule, v.

    high_noise_share > 0 draws that share of the samples' t from the noisiest 30% only, where a sampler
    lays out the picture (and a video its motion). A scheduler whose prediction_type is "v_prediction"
    makes the target v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, sec. 4), which stays
    defined where the SNR is zero."""
    n, T = latents.shape[0], len(scheduler)
    t = torch.randint(0, T, (n,), generator=generator)
    if high_noise_share:
        high = torch.randint(int(0.7 * T), T, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < high_noise_share, high, t)
    noise = torch.randn(latents.shape, generator=generator)
    abar = scheduler.alphas_cumprod[t]
    target = noise
    if scheduler.config.prediction_type == "v_prediction":
        a = abar.view((-1,) + (1,) * (latents.dim() - 1))
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    return (unet_fn(scheduler.add_noise(latents, noise, t), t, cond) - target).pow(2).mean()


# ---------------------------------------------------------------- the VAE

def train_vae(part, vae, batch, args: RunArgs, *, steps, lr, pixel_weights=None, kl_weight=1e-6) -> Run:
    """The run `part`: `batch(rng)` draws each step's batch x with the step's own generator, and the
    loss is |x' - x| + (x' - x)^2, weighted per pixel by `pixel_weights(x)` if given, plus kl_weight
    times the posterior's KL."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    run = Run.start(part, args, {"vae": vae}, opt, steps, lr, warmup=50)
    for step in run.steps():
        x = batch(args.rng(f"{part}/batches", step))
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(args.generator(f"{part}/posterior", step)))
        w = pixel_weights(x) if pixel_weights is not None else torch.ones_like(x[:, :1])
        err = recon - x
        loss = (w * err.abs()).mean() + (w * err ** 2).mean() + kl_weight * posterior.kl().mean()
        optimizer_step(opt, loss, vae.parameters())
        run.log(loss.detach())
    return run


@torch.no_grad()
def encode_dataset(vae, x):
    """Posterior mean and std of every item of x, for drawing fresh latents at every step."""
    posteriors = [vae.encode(chunk) for chunk in x.split(256)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


def fit_scaling_factor(vae, mean):
    """The latent diffusion paper's scale factor: 1 / std of the training set's latents, so that the
    diffusion runs on latents of about unit variance; it is saved with the VAE's config."""
    vae.config = dataclasses.replace(vae.config, scaling_factor=round(1.0 / mean.std().item(), 5))


# ---------------------------------------------------------------- the denoiser

def train_denoiser(part, unet, text, latents, caption, args: RunArgs, *, steps, batch, lr, ema_decay, warmup,
                   scheduler_config, class_labels=False, high_noise_share=0.0):
    """The run `part`: each step draws `batch` items of the encoded dataset `latents` = (mean, std,
    scaling_factor) and a caption of each (`caption(i, rng)` for item i), drops captions to "" at
    CAPTION_DROPOUT, and trains under diffusion_loss. `text` = (text encoder, tokenizer); the encoder
    trains with the UNet unless it is frozen (no parameter requires grad). class_labels=False
    conditions by cross-attention on its states (decoder_text.encode), True by AudioLDM's class_labels
    (decoder_text.embed). Returns the EMA copies of the UNet and of the text encoder (the encoder
    itself if frozen) and the run."""
    text_encoder, tokenizer = text
    mean, std, scaling_factor = latents
    trains_text = any(p.requires_grad for p in text_encoder.parameters())
    trained = {"unet": unet, **({"text_encoder": text_encoder} if trains_text else {})}
    emas = {name: EMA(m, ema_decay) for name, m in trained.items()}
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(scheduler_config)
    if class_labels:        # AudioLDM: the pooled text embedding joins the time embedding
        conditioning, unet_fn = decoder_text.embed, lambda x, t, c: unet(x, t, class_labels=c)
    else:                   # Stable Diffusion: cross-attention on the text encoder's states
        conditioning, unet_fn = decoder_text.encode, lambda x, t, c: unet(x, t, encoder_hidden_states=c)
    run = Run.start(part, args, {**trained, **{f"ema_{k}": e for k, e in emas.items()}}, opt, steps, lr, warmup)
    for step in run.steps():
        g = args.generator(f"{part}/latents", step)
        pick = torch.randint(0, len(mean), (batch,), generator=g)
        x0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=g)) * scaling_factor
        rng = args.rng(f"{part}/captions", step)
        captions = decoder_text.drop_captions([caption(i, rng) for i in pick.tolist()], CAPTION_DROPOUT, rng)
        with torch.set_grad_enabled(trains_text):
            cond = conditioning(text_encoder, tokenizer, captions)
        loss = diffusion_loss(unet_fn, scheduler, x0, cond, g, high_noise_share)
        optimizer_step(opt, loss, params)
        for name, ema in emas.items():
            ema.update(trained[name])
        run.log(loss.detach())
    text_out = emas["text_encoder"].shadow if trains_text else text_encoder
    return emas["unet"].shadow, text_out, run


# ---------------------------------------------------------------- saving

def hf_config(config, class_name) -> dict:
    """A dataclass config as a diffusers config.json (derived, non-init fields left out)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return {"_class_name": class_name, **fields}


def save_model(folder, module, class_name, overwrite=False):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{folder / 'config.json'} exists; pass overwrite=True to replace it")
    (folder / "config.json").write_text(json.dumps(hf_config(module.config, class_name), indent=2) + "\n")
    state = {k: v.to(STORE_DTYPE) for k, v in module.state_dict().items()}
    weights.save_safetensors(state, folder / "diffusion_pytorch_model.safetensors", overwrite=overwrite)


def save_pipeline(folder, pipeline_class, unet, unet_class, vae, text_encoder, tokenizer, sampling,
                  scheduler_config, vocoder=None, overwrite=False):
    """A diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    sampling.json, and with `vocoder` (a GriffinLimConfig, which has no weights) vocoder/config.json."""
    folder = Path(folder)
    if (folder / "model_index.json").exists() and not overwrite:
        raise FileExistsError(f"{folder / 'model_index.json'} exists; pass overwrite=True to replace it")
    save_model(folder / "unet", unet, unet_class, overwrite=overwrite)
    save_model(folder / "vae", vae, "AutoencoderKL", overwrite=overwrite)
    if vocoder is not None:
        (folder / "vocoder").mkdir(parents=True, exist_ok=True)
        (folder / "vocoder" / "config.json").write_text(json.dumps(hf_config(vocoder, "GriffinLim"), indent=2) + "\n")
    decoder_text.save(folder, text_encoder, tokenizer, dtype=STORE_DTYPE, overwrite=overwrite)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
    text_class = "CLIPTextModelWithProjection" if text_encoder.config.with_projection else "CLIPTextModel"
    index = {"_class_name": pipeline_class, "unet": ["diffusers", unet_class], "vae": ["diffusers", "AutoencoderKL"],
             **({"vocoder": ["minignext", "GriffinLim"]} if vocoder is not None else {}),
             "text_encoder": ["transformers", text_class], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", scheduler_config["_class_name"]]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "sampling.json").write_text(json.dumps(sampling, indent=2) + "\n")
    return folder
