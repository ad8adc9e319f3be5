"""The toy image decoder: a latent diffusion model (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", arXiv 2112.10752) trained from scratch on the toy world.

    1. AutoencoderKL, f=4: 32x32x3 images <-> 8x8x4 latents (sec. 3.1: reconstruction + a tiny KL).
    2. UNet2DCondition on the scaled latents, epsilon-prediction (DDPM, Ho et al. 2020, eq. 14),
       cross-attending to the decoder text encoder's states of the caption
       (minignext.toy.decoder_text), trained jointly with it; 10% of the captions are dropped to ""
       for classifier-free guidance. An exponential moving average of both is what ships.

Both loops are minignext.toy.latent_diffusion's, which the audio and video decoders share.

The result is a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) plus `sampling.json` with the guidance scale and step
count the presets use, so `minignext.diffusion.ImagePipeline.from_pretrained` loads it like
Stable Diffusion 1.5. Weights are stored in fp16; load with dtype=torch.float32 to run on CPU.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minignext.toy import checkers, decoder_text, latent_diffusion, world
from minignext.toy.trainer import TOY_DIR, RunArgs, summary
from minignext.unet import UNet2DCondition, UNet2DConditionConfig
from minignext.vae import AutoencoderKL, AutoencoderKLConfig

OUT_DIR = TOY_DIR / "image_decoder"
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False,
             "clip_sample": False, "prediction_type": "epsilon"}
SAMPLING = {"guidance_scale": 3.0, "num_inference_steps": 25}
SCHEDULE = {"vae": dict(steps=600, lr=2e-3), "vae_edges": dict(steps=250, lr=1e-3),
            "unet": dict(steps=2800, batch=64, lr=1e-3, ema_decay=0.995, warmup=100)}
VAE_BATCH = 32          # freshly rendered images per VAE step
IMAGES = 6144           # rendered and encoded once; the UNet draws its latents from their posteriors


def vae_config() -> AutoencoderKLConfig:
    """About 0.95M parameters; three levels make f=4."""
    return AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                               block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                               norm_num_groups=16, sample_size=world.IMAGE_SIZE, scaling_factor=1.0)


def unet_config() -> UNet2DConditionConfig:
    """About 1.05M parameters on 8x8x4 latents, cross-attention at both levels; heads of 8 channels
    (attention_head_dim counts heads here), as in the video UNet that starts from it."""
    return UNet2DConditionConfig(sample_size=world.IMAGE_SIZE // 4, block_out_channels=(32, 64),
                                 down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                                 layers_per_block=1, cross_attention_dim=decoder_text.WIDTH, attention_head_dim=(4, 8),
                                 norm_num_groups=16)


# ---------------------------------------------------------------- 1. the VAE

def coloured(x) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where an image (B, 3, H, W) in [-1, 1] is coloured, i.e. the object (the world's
    backgrounds are grey), else 0.0."""
    chroma = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2
    return (chroma > 0.1).float()


def object_weights(x, weight=10.0):
    """Per-pixel loss weights: `weight` on and one pixel around the object (the coloured pixels), 1 elsewhere."""
    near = F.max_pool2d(coloured(x), 3, stride=1, padding=1)
    return 1 + (weight - 1) * near


def fresh_images(rng, n=VAE_BATCH) -> torch.Tensor:
    """n newly rendered training images, (n, 3, 32, 32) in [-1, 1]."""
    return latent_diffusion.to_pixels(world.render_batch(world.sample_media("image", n, rng), rng))


def train_vae(args: RunArgs):
    """Two phases: plain L1 + L2 reconstruction of fresh images, then the same with the object's pixels
    weighted 10x, because the checkers judge the object's corners and arms, which take a small share
    of the pixels. Returns the frozen VAE and both runs."""
    torch.manual_seed(args.seed_of("image_decoder_vae/init"))
    vae = AutoencoderKL(vae_config())
    runs = {"vae": latent_diffusion.train_vae("image_decoder_vae", vae, fresh_images, args, **SCHEDULE["vae"]),
            "vae_edges": latent_diffusion.train_vae("image_decoder_vae_edges", vae, fresh_images, args,
                                                    pixel_weights=object_weights, **SCHEDULE["vae_edges"])}
    return vae.eval().requires_grad_(False), runs


# ---------------------------------------------------------------- 2. the UNet and its text encoder

def train_unet(vae, args: RunArgs):
    """The UNet and the text encoder trained together on the latents of IMAGES rendered images; returns
    their EMA copies, the tokenizer and the run."""
    rng = args.rng("image_decoder_unet/dataset")
    media = world.sample_media("image", args.count(IMAGES, least=SCHEDULE["unet"]["batch"]), rng)
    mean, std = latent_diffusion.encode_dataset(vae, latent_diffusion.to_pixels(world.render_batch(media, rng)))
    latent_diffusion.fit_scaling_factor(vae, mean)
    tokenizer = decoder_text.build_tokenizer()
    text_encoder = decoder_text.new_text_encoder(tokenizer, seed=args.seed_of("image_decoder_text/init"))
    torch.manual_seed(args.seed_of("image_decoder_unet/init"))
    ema_unet, ema_text, run = latent_diffusion.train_denoiser(
        "image_decoder_unet", UNet2DCondition(unet_config()), (text_encoder, tokenizer),
        (mean, std, vae.scaling_factor), lambda i, rng: media[i].caption(rng), args,
        scheduler_config=SCHEDULER, **SCHEDULE["unet"])
    return ema_unet, ema_text, tokenizer, run


def train(args: RunArgs, out_dir=None) -> dict:
    out = Path(out_dir or OUT_DIR)
    vae, vae_runs = train_vae(args)
    unet, text_encoder, tokenizer, unet_run = train_unet(vae, args)
    args.on_main(latent_diffusion.save_pipeline, out, "StableDiffusionPipeline", unet, "UNet2DConditionModel", vae,
                 text_encoder, tokenizer, SAMPLING, SCHEDULER, overwrite=True)
    return summary(out, **vae_runs, unet=unet_run)


# ---------------------------------------------------------------- evaluation

def load_pipeline(folder=None):
    """The shipped decoder as `ImagePipeline`, upcast to fp32, with its sampler settings."""
    from minignext.diffusion import ImagePipeline

    folder = Path(folder or OUT_DIR)
    settings = json.loads((folder / "sampling.json").read_text())
    return ImagePipeline.from_pretrained(folder, dtype=torch.float32), settings


def prompts(n, seed, split="train", phrasing="test"):
    rng = np.random.default_rng(seed)
    objs = [world.sample_object(rng, split) for _ in range(n)]
    return objs, [world.caption(o, rng, "image", phrasing=phrasing) for o in objs]


def accuracy(pipeline, settings, objs, captions, seed, batch=64):
    """Fraction of generated images the checker finds right (one object, right colour and shape)."""
    right = 0
    for i in range(0, len(objs), batch):
        images = pipeline(prompt=captions[i:i + batch], seed=seed + i, output_type="np", progress=False, **settings)
        right += sum(checkers.check_image(img, want=o).ok for img, o in zip(images, objs[i:i + batch]))
    return right / len(objs)


def evaluate(quick=False, seed=1234) -> list:
    from minignext.toy.eval import Metric

    pipeline, settings = load_pipeline()
    n, n_held = (24, 12) if quick else (240, 60)
    objs, caps = prompts(n, seed, "train", "test")
    held_objs, held_caps = prompts(n_held, seed + 1, "heldout", "test")
    note = f"DDIM {settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}"
    return [Metric("text -> image, held-out prompts", accuracy(pipeline, settings, objs, caps, seed), 0.95, n, note),
            Metric("text -> image, held-out colour-shape pairs", accuracy(pipeline, settings, held_objs, held_caps, seed),
                   None, n_held, "composition; no threshold")]
