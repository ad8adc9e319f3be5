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

The VAE and UNet loops are minignext.toy.latent_diffusion's, shared with the image and video decoders;
the UNet's class-label conditioning is an argument of its denoiser loop.

The result is a diffusers AudioLDMPipeline folder (model_index.json, unet/, vae/, vocoder/, scheduler/,
text_encoder/, tokenizer/) plus `sampling.json` (guidance scale and steps of the presets), loaded by
`minignext.diffusion.AudioPipeline.from_pretrained` (vocoder/config.json names "GriffinLim" and holds
the mel settings; it has no weights). `text_embeds` (decoder_text.embed) gives the (B, 32) conditioning
that NExT-GPT's audio output projection learns to imitate. Weights are stored in fp16.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minignext.media import mel_filterbank
from minignext.toy import checkers, decoder_text, latent_diffusion, world
from minignext.toy.decoder_text import embed as text_embeds
from minignext.toy.trainer import TOY_DIR, RunArgs, Run, optimizer_step, summary
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
SCHEDULE = {"vae": dict(steps=300, lr=2e-3), "text": dict(steps=300, lr=3e-3),
            "unet": dict(steps=2500, batch=32, lr=2e-3, ema_decay=0.99, warmup=50)}
VAE_BATCH, TEXT_BATCH = 16, 256
SOUNDS = {"vae": 2048, "unet": 4096}    # rendered once for each run, which draws its batches from them


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


def render_sounds(n, rng):
    """(n, 16000) waveforms of training objects and their media."""
    media = world.sample_media("audio", n, rng)
    return torch.from_numpy(world.render_batch(media, rng)), media


def sound_mels(args: RunArgs, run, least):
    """The log-mels (N, 1, frames, bins) of SOUNDS[run] sounds (at least `least`) rendered for the run
    audio_decoder_{run}, and their media."""
    waves, media = render_sounds(args.count(SOUNDS[run], least), args.rng(f"audio_decoder_{run}/dataset"))
    return log_mel(waves)[:, None], media


# ---------------------------------------------------------------- 1. the VAE

def train_vae(args: RunArgs):
    mels, _ = sound_mels(args, "vae", least=VAE_BATCH)
    torch.manual_seed(args.seed_of("audio_decoder_vae/init"))
    vae = AutoencoderKL(vae_config())
    run = latent_diffusion.train_vae("audio_decoder_vae", vae, lambda rng: mels[rng.integers(len(mels), size=VAE_BATCH)],
                                     args, **SCHEDULE["vae"])
    return vae.eval().requires_grad_(False), run


# ---------------------------------------------------------------- 2. the text encoder, CLAP's stand-in

def train_text_encoder(args: RunArgs):
    """AudioLDM conditions on a frozen, pretrained CLAP text embedding. Trained jointly with the UNet
    from scratch, the toy text encoder's normalised embeddings stayed nearly parallel (cosine 0.98
    between different sounds) and the UNet learned to ignore them. So it is pretrained first: two
    linear heads read the pitch and the contour off the normalised embedding (cross-entropy); the
    empty caption has a class of its own in each, so the unconditional branch is distinct too."""
    s = SCHEDULE["text"]
    tokenizer = decoder_text.build_tokenizer()
    text_encoder = decoder_text.new_text_encoder(tokenizer, seed=args.seed_of("audio_decoder_text/init"),
                                                 with_projection=True, projection_dim=EMBED_DIM)
    torch.manual_seed(args.seed_of("audio_decoder_text/heads-init"))
    heads = torch.nn.ModuleDict({"pitch": torch.nn.Linear(EMBED_DIM, len(world.PITCHES) + 1),
                                 "contour": torch.nn.Linear(EMBED_DIM, len(world.CONTOURS) + 1)})
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
    run = Run.start("audio_decoder_text", args, {"text_encoder": text_encoder, "heads": heads}, opt, s["steps"],
                    s["lr"], warmup=50)
    for step in run.steps():
        rng = args.rng("audio_decoder_text/batches", step)
        objs = [world.sample_object(rng, "train") for _ in range(TEXT_BATCH)]
        captions = decoder_text.drop_captions([world.caption(o, rng, "audio") for o in objs],
                                              latent_diffusion.CAPTION_DROPOUT, rng)
        labels = {name: torch.tensor([values.index(getattr(o, name)) if c else len(values)
                                      for o, c in zip(objs, captions)])
                  for name, values in (("pitch", world.PITCHES), ("contour", world.CONTOURS))}
        embeds = text_embeds(text_encoder, tokenizer, captions)
        loss = sum(F.cross_entropy(heads[k](embeds * 8), labels[k]) for k in heads)
        optimizer_step(opt, loss, params, max_norm=None)
        run.log(loss.detach())
    return text_encoder.eval().requires_grad_(False), tokenizer, run


# ---------------------------------------------------------------- 3. the UNet

def train_unet(vae, text_encoder, tokenizer, args: RunArgs):
    """The UNet on the latents of rendered sounds, conditioned through class_labels on the frozen text
    encoder's pooled embedding of their captions; returns its EMA copy and the run."""
    mels, media = sound_mels(args, "unet", least=SCHEDULE["unet"]["batch"])
    mean, std = latent_diffusion.encode_dataset(vae, mels)
    latent_diffusion.fit_scaling_factor(vae, mean)
    torch.manual_seed(args.seed_of("audio_decoder_unet/init"))
    ema_unet, _, run = latent_diffusion.train_denoiser(
        "audio_decoder_unet", UNet2DCondition(unet_config()), (text_encoder, tokenizer),
        (mean, std, vae.scaling_factor), lambda i, rng: media[i].caption(rng), args, scheduler_config=SCHEDULER,
        class_labels=True, **SCHEDULE["unet"])
    return ema_unet, run


def train(args: RunArgs, out_dir=None) -> dict:
    out = Path(out_dir or OUT_DIR)
    vae, vae_run = train_vae(args)
    text_encoder, tokenizer, text_run = train_text_encoder(args)
    unet, unet_run = train_unet(vae, text_encoder, tokenizer, args)
    latent_diffusion.save_pipeline(out, "AudioLDMPipeline", unet, "UNet2DConditionModel", vae, text_encoder, tokenizer,
                                   SAMPLING, SCHEDULER, vocoder=vocoder_config(), overwrite=True)
    return summary(out, vae=vae_run, text=text_run, unet=unet_run)


# ---------------------------------------------------------------- evaluation

def load_pipeline(folder=None):
    """The shipped decoder as `AudioPipeline` (fp32) with the embedding of "" as its unconditional branch,
    plus its text encoder, tokenizer and sampler settings."""
    from minignext.diffusion import AudioPipeline

    folder = Path(folder or OUT_DIR)
    settings = json.loads((folder / "sampling.json").read_text())
    text_encoder, tokenizer = decoder_text.load(folder)
    with torch.no_grad():
        empty = text_embeds(text_encoder, tokenizer, [""])[0]
    pipeline = AudioPipeline.from_pretrained(folder, dtype=torch.float32, unconditional_embeds=empty)
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


def evaluate(quick=False, seed=1234) -> list:
    from minignext.toy.eval import Metric

    loaded = load_pipeline()
    settings = loaded[3]
    n, n_held = (24, 12) if quick else (240, 60)
    objs, caps = prompts(n, seed, "train", "test")
    held_objs, held_caps = prompts(n_held, seed + 1, "heldout", "test")
    note = f"DDIM {settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}"
    return [Metric("text -> audio, held-out prompts", accuracy(loaded, objs, caps, seed), 0.90, n, note),
            Metric("text -> audio, held-out pitch-contour pairs", accuracy(loaded, held_objs, held_caps, seed),
                   None, n_held, "composition; no threshold")]
