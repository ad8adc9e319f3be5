"""The toy audio decoder: AudioLDM (Liu et al. 2023, "AudioLDM: Text-to-Audio Generation with Latent
Diffusion Models", arXiv 2301.12503) trained from scratch on the toy world's tones.

    mel      1 s at 16 kHz -> (64 frames, 32 bins): |STFT| (1024-point Hann, hop 250), HTK mel bands
             from 0 to 2 kHz, natural log, as AudioLDM's log-mel (sec. 2.1; its 64 bands reach 8 kHz,
             but every tone of the world lies below 1.3 kHz, so 32 bands up to 2 kHz give the same
             resolution per band at half the size). AudioLDM clamps at 1e-5; here at 1, about 40 dB
             under a tone, which silences the world's faint hiss: with it, most of every mel was random
             noise floor, and a first UNet spent its steps on that texture and ignored the caption.
             No further normalisation: the VAE reconstructs this log-mel and the vocoder inverts it.
    VAE      AutoencoderKL, f=4, on the mel as a 1-channel (64, 32) image -> (4, 16, 8) latents.
    UNet     UNet2DCondition with AudioLDM's conditioning (sec. 3.2): no text cross-attention; the
             caption's pooled, L2-normalised text embedding enters through `class_labels`, a linear
             projection concatenated to the time embedding. Its attention blocks attend to the latent
             itself, with cross_attention_dim = the block widths, as in AudioLDM's config. The text
             encoder is minignext.toy.decoder_text's CLIP tower with a 32-d projection, pretrained and
             then frozen as CLAP is (see train_text_encoder); 10% of the captions are dropped to "" for
             classifier-free guidance (AudioLDM's unconditional branch is the embedding of the empty
             text too). EMA weights of the UNet ship.
    vocoder  Griffin-Lim (minignext.vocoder.GriffinLim, 16 rounds), not a trained HiFi-GAN. The reason,
             measured: a HiFi-GAN generator in the SpeechT5HifiGan layout (0.37M parameters, 250 samples
             per frame) trained here with the generator losses only, an L1 log-mel loss (Kong et al.
             2020, eq. 2) plus a multi-resolution STFT loss (Yamamoto et al. 2020, arXiv 1910.11480),
             no discriminator, still left strong sidebands at +-64 Hz (the frame rate) around every tone
             after 600 steps (~15 min of a shared CPU): only 8% of the world's own mels came back as one
             clean tone by the checker. Griffin-Lim on the same mels: 100%, with no training at all.

The result is a diffusers AudioLDMPipeline folder (model_index.json, unet/, vae/, vocoder/, scheduler/,
text_encoder/, tokenizer/) plus `sampling.json` (guidance scale and steps of the presets), loaded by
`minignext.diffusion.AudioPipeline.from_pretrained` (vocoder/config.json names "GriffinLim" and holds
the mel settings; it has no weights). `text_embeds` gives the (B, 32) conditioning that NExT-GPT's audio
output projection learns to imitate. Weights are stored in fp16.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minignext.media import mel_filterbank
from minignext.schedulers import DDPMScheduler
from minignext.toy import checkers, decoder_text, world
from minignext.toy.train_image_decoder import EMA, diffusion_loss, folder_megabytes, hf_config, save_model
from minignext.toy.trainer import TOY_DIR, Run, optimizer_step
from minignext.unet import UNet2DCondition, UNet2DConditionConfig
from minignext.vae import AutoencoderKL, AutoencoderKLConfig
from minignext.vocoder import GriffinLimConfig

OUT_DIR = TOY_DIR / "audio_decoder"
SR, N_FFT, HOP, N_MELS, F_MAX = world.SAMPLE_RATE, 1024, 250, 32, 2000.0
FRAMES = int(world.AUDIO_SECONDS * SR) // HOP          # 64 mel frames per clip
MEL_FLOOR = 1.0         # the world's -60 dB hiss stays below it, so the background is exactly log 1 = 0
EMBED_DIM = 32
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.0015, "beta_end": 0.0195, "steps_offset": 1, "set_alpha_to_one": False,
             "clip_sample": False, "prediction_type": "epsilon"}      # AudioLDM's schedule
SAMPLING = {"guidance_scale": 4.0, "num_inference_steps": 25}
CAPTION_DROPOUT = 0.1
STORE_DTYPE = torch.float16


def vae_config() -> AutoencoderKLConfig:
    return AutoencoderKLConfig(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                               layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=FRAMES,
                               scaling_factor=1.0)


def unet_config() -> UNet2DConditionConfig:
    """About 1.1M parameters on (4, 16, 8) latents; sample_size is the latent length in frames."""
    return UNet2DConditionConfig(sample_size=FRAMES // 4, block_out_channels=(32, 64),
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 cross_attention_dim=(32, 64), attention_head_dim=(4, 8), norm_num_groups=16,
                                 class_embed_type="simple_projection", projection_class_embeddings_input_dim=EMBED_DIM,
                                 class_embeddings_concat=True)


def vocoder_config() -> GriffinLimConfig:
    return GriffinLimConfig(model_in_dim=N_MELS, sampling_rate=SR, n_fft=N_FFT, hop_length=HOP, f_min=0.0,
                            f_max=F_MAX, n_iter=16)


# ---------------------------------------------------------------- the mel both the VAE and the vocoder use

_MEL_BANK = mel_filterbank(N_MELS, N_FFT, SR, low_freq=0.0, high_freq=F_MAX).float()


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Waveforms (B, samples) -> log-mel (B, samples // HOP, N_MELS); frame i is centred on sample i * HOP."""
    spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT, device=wave.device), center=True,
                      pad_mode="reflect", return_complex=True).abs()           # (B, N_FFT // 2 + 1, frames + 1)
    mel = _MEL_BANK.to(wave.device) @ spec[..., : wave.shape[-1] // HOP]
    return mel.clamp(min=MEL_FLOOR).log().transpose(1, 2)


def render_sounds(n, rng, split="train"):
    """(n, 16000) waveforms and their objects."""
    objs = [world.sample_object(rng, split) for _ in range(n)]
    return torch.from_numpy(np.stack([world.render_audio(o, rng) for o in objs])), objs


def text_embeds(text_encoder, tokenizer, captions) -> torch.Tensor:
    """Captions -> the UNet's class_labels: the projected end-token state, L2-normalised, (B, EMBED_DIM)."""
    ids = tokenizer(list(captions), max_length=tokenizer.model_max_length)
    return F.normalize(text_encoder(ids.to(text_encoder.text_projection.weight.device)).embeds, dim=-1)


def _run(name, seed, scale, modules, opt, steps, lr, resume, progress, runs_dir):
    total = max(2, int(steps * scale))
    return Run(f"audio_decoder_{name}-seed{seed}-scale{scale:g}", modules, opt, total, peak_lr=lr,
               warmup=min(50, total // 10 + 1), resume=resume, progress_bar=progress, runs_dir=runs_dir)


# ---------------------------------------------------------------- 1. the VAE

def train_vae(seed=0, resume=True, progress=True, scale=1.0, runs_dir=None, steps=300, batch=16, n_sounds=2048,
              kl_weight=1e-6, lr=2e-3):
    waves, _ = render_sounds(max(batch, int(n_sounds * min(1.0, 4 * scale))), np.random.default_rng([seed, 20]))
    mels = log_mel(waves)[:, None]                                          # (N, 1, frames, bins)
    torch.manual_seed(seed)
    vae = AutoencoderKL(vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    run = _run("vae", seed, scale, {"vae": vae}, opt, steps, lr, resume, progress, runs_dir)
    for step in run.steps():
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = mels[torch.randint(0, len(mels), (batch,), generator=g)]
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(g))
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        optimizer_step(opt, loss, vae.parameters())
        run.log(loss.detach())
    return vae.eval().requires_grad_(False), run


# ---------------------------------------------------------------- 2. the text encoder, CLAP's stand-in

def train_text_encoder(seed=0, resume=True, progress=True, scale=1.0, runs_dir=None, steps=300, batch=256, lr=3e-3):
    """AudioLDM conditions on a frozen, pretrained CLAP text embedding. Trained jointly with the UNet
    from scratch, the toy text encoder's normalised embeddings stayed nearly parallel (cosine 0.98
    between different sounds) and the UNet learned to ignore them. So it is pretrained first: two
    linear heads read the pitch and the contour off the normalised embedding (cross-entropy); the
    empty caption has a class of its own in each, so the unconditional branch is distinct too."""
    torch.manual_seed(seed)
    tokenizer = decoder_text.build_tokenizer()
    text_encoder = decoder_text.new_text_encoder(tokenizer, seed=seed, with_projection=True, projection_dim=EMBED_DIM)
    heads = torch.nn.ModuleDict({"pitch": torch.nn.Linear(EMBED_DIM, len(world.PITCHES) + 1),
                                 "contour": torch.nn.Linear(EMBED_DIM, len(world.CONTOURS) + 1)})
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    run = _run("text", seed, scale, {"text_encoder": text_encoder, "heads": heads}, opt, steps, lr, resume,
               progress, runs_dir)
    for step in run.steps():
        rng = np.random.default_rng([seed, 40, step])
        objs = [world.sample_object(rng, "train") for _ in range(batch)]
        captions = decoder_text.drop_captions([world.caption(o, rng, "audio") for o in objs], CAPTION_DROPOUT, rng)
        labels = {name: torch.tensor([values.index(getattr(o, name)) if c else len(values)
                                      for o, c in zip(objs, captions)])
                  for name, values in (("pitch", world.PITCHES), ("contour", world.CONTOURS))}
        embeds = text_embeds(text_encoder, tokenizer, captions)
        loss = sum(F.cross_entropy(heads[k](embeds * 8), labels[k]) for k in heads)
        optimizer_step(opt, loss, params, max_norm=None)
        run.log(loss.detach())
    return text_encoder.eval().requires_grad_(False), tokenizer, run


# ---------------------------------------------------------------- 3. the UNet

def train_unet(vae, text_encoder, tokenizer, seed=0, resume=True, progress=True, scale=1.0, runs_dir=None,
               steps=2500, batch=32, n_sounds=4096, lr=2e-3):
    rng = np.random.default_rng([seed, 30])
    waves, objs = render_sounds(max(batch, int(n_sounds * min(1.0, 4 * scale))), rng)
    with torch.no_grad():
        posts = [vae.encode(chunk[:, None]) for chunk in log_mel(waves).split(256)]
    mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
    vae.config = dataclasses.replace(vae.config, scaling_factor=round(1.0 / mean.std().item(), 5))
    torch.manual_seed(seed)
    unet = UNet2DCondition(unet_config())
    ema = EMA(unet, 0.99)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(SCHEDULER)
    run = _run("unet", seed, scale, {"unet": unet, "ema": ema}, opt, steps, lr, resume, progress, runs_dir)
    for step in run.steps():
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.randint(0, len(objs), (batch,), generator=g)
        latents = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=g)) * vae.scaling_factor
        step_rng = np.random.default_rng([seed, 31, step])
        captions = [world.caption(objs[i], step_rng, "audio") for i in pick.tolist()]
        with torch.no_grad():
            cond = text_embeds(text_encoder, tokenizer, decoder_text.drop_captions(captions, CAPTION_DROPOUT, step_rng))
        loss = diffusion_loss(lambda x, t, c: unet(x, t, class_labels=c), scheduler, latents, cond, g)
        optimizer_step(opt, loss, unet.parameters())
        ema.update(unet)
        run.log(loss.detach())
    return ema.shadow, run


# ---------------------------------------------------------------- saving

def save_pipeline(folder, unet, vae, text_encoder, tokenizer, overwrite=False):
    """A diffusers AudioLDM folder: model_index.json, unet/, vae/, vocoder/, text_encoder/, tokenizer/,
    scheduler/, and sampling.json."""
    folder = Path(folder)
    if (folder / "model_index.json").exists() and not overwrite:
        raise FileExistsError(f"{folder / 'model_index.json'} exists; pass overwrite=True to replace it")
    save_model(folder / "unet", unet, "UNet2DConditionModel", overwrite=overwrite)
    save_model(folder / "vae", vae, "AutoencoderKL", overwrite=overwrite)
    (folder / "vocoder").mkdir(parents=True, exist_ok=True)
    vocoder = hf_config(vocoder_config(), "GriffinLim")
    (folder / "vocoder" / "config.json").write_text(json.dumps(vocoder, indent=2) + "\n")
    decoder_text.save(folder, text_encoder, tokenizer, dtype=STORE_DTYPE, overwrite=overwrite)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    index = {"_class_name": "AudioLDMPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "vocoder": ["minignext", "GriffinLim"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", SCHEDULER["_class_name"]]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "sampling.json").write_text(json.dumps(SAMPLING, indent=2) + "\n")
    return folder


def train(seed=0, resume=True, progress=True, scale=1.0, out_dir=None, runs_dir=None) -> dict:
    out = Path(out_dir or OUT_DIR)
    vae, vae_run = train_vae(seed, resume, progress, scale, runs_dir)
    text_encoder, tokenizer, text_run = train_text_encoder(seed, resume, progress, scale, runs_dir)
    unet, unet_run = train_unet(vae, text_encoder, tokenizer, seed, resume, progress, scale, runs_dir)
    save_pipeline(out, unet, vae, text_encoder, tokenizer, overwrite=True)
    last = lambda run: round(sum(r["loss"] for r in run.history[-50:]) / max(1, len(run.history[-50:])), 4)
    return {"folder": str(out), "vae_loss": last(vae_run), "text_loss": last(text_run), "unet_loss": last(unet_run),
            "vae_minutes": round(vae_run.seconds / 60, 2), "text_minutes": round(text_run.seconds / 60, 2),
            "unet_minutes": round(unet_run.seconds / 60, 2), "megabytes": folder_megabytes(out)}


# ---------------------------------------------------------------- evaluation

def load_pipeline(folder=None, device=None):
    """The shipped decoder as `AudioPipeline` (fp32) with the embedding of "" as its unconditional branch,
    plus its text encoder, tokenizer and sampler settings."""
    from minignext.diffusion import AudioPipeline

    folder = Path(folder or OUT_DIR)
    settings = json.loads((folder / "sampling.json").read_text())
    text_encoder, tokenizer = decoder_text.load(folder, device=device)
    with torch.no_grad():
        empty = text_embeds(text_encoder, tokenizer, [""])[0]
    pipeline = AudioPipeline.from_pretrained(folder, dtype=torch.float32, device=device, unconditional_embeds=empty)
    return pipeline, text_encoder, tokenizer, settings


def prompts(n, seed, split="train", phrasing="test"):
    rng = np.random.default_rng(seed)
    objs = [world.sample_object(rng, split) for _ in range(n)]
    return objs, [world.caption(o, rng, "audio", phrasing=phrasing) for o in objs]


@torch.no_grad()
def accuracy(loaded, objs, captions, seed, batch=64):
    """Fraction of generated sounds the checker finds right (one tone, right pitch and contour)."""
    pipeline, text_encoder, tokenizer, settings = loaded
    right = 0
    for i in range(0, len(objs), batch):
        embeds = text_embeds(text_encoder, tokenizer, captions[i:i + batch])
        waves = pipeline(prompt_embeds=embeds, seed=seed + i, progress=False, **settings)
        right += sum(checkers.check_audio(w, want=o).ok for w, o in zip(waves, objs[i:i + batch]))
    return right / len(objs)


def evaluate(quick=False, seed=1234, folder=None) -> list:
    from minignext.toy.eval import Metric

    loaded = load_pipeline(folder)
    settings = loaded[3]
    n, n_held = (24, 12) if quick else (240, 60)
    objs, caps = prompts(n, seed, "train", "test")
    held_objs, held_caps = prompts(n_held, seed + 1, "heldout", "test")
    note = f"DDIM {settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}"
    return [Metric("text -> audio, held-out prompts", accuracy(loaded, objs, caps, seed), 0.90, n, note),
            Metric("text -> audio, held-out pitch-contour pairs", accuracy(loaded, held_objs, held_caps, seed),
                   None, n_held, "composition; no threshold")]
