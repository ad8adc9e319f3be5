"""The toy image decoder: a latent diffusion model (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", arXiv 2112.10752) trained from scratch on the toy world.

    1. AutoencoderKL, f=4: 32x32x3 images <-> 8x8x4 latents (sec. 3.1: reconstruction + a tiny KL).
    2. UNet2DCondition on the scaled latents, epsilon-prediction (DDPM, Ho et al. 2020, eq. 14),
       cross-attending to the decoder text encoder's states of the caption
       (minignext.toy.decoder_text), trained jointly with it; 10% of the captions are dropped to ""
       for classifier-free guidance. An exponential moving average of both is what ships.

The result is a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) plus `sampling.json` with the guidance scale and step
count the presets use, so `minignext.diffusion.ImagePipeline.from_pretrained` loads it like
Stable Diffusion 1.5. Weights are stored in fp16; load with dtype=torch.float32 to run on CPU.
"""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minignext import weights
from minignext.schedulers import DDPMScheduler
from minignext.toy import checkers, decoder_text, world
from minignext.toy.trainer import TOY_DIR, Run, optimizer_step
from minignext.unet import UNet2DCondition, UNet2DConditionConfig
from minignext.vae import AutoencoderKL, AutoencoderKLConfig

OUT_DIR = TOY_DIR / "image_decoder"
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False,
             "clip_sample": False, "prediction_type": "epsilon"}
SAMPLING = {"guidance_scale": 3.0, "num_inference_steps": 25}
CAPTION_DROPOUT = 0.1
STORE_DTYPE = torch.float16


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


# ---------------------------------------------------------------- shared with the video decoder

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


def hf_config(config, class_name) -> dict:
    """A dataclass config as a diffusers config.json (derived, non-init fields left out)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return {"_class_name": class_name, **fields}


def save_model(folder, module, class_name, stem="diffusion_pytorch_model", overwrite=False):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{folder / 'config.json'} exists; pass overwrite=True to replace it")
    (folder / "config.json").write_text(json.dumps(hf_config(module.config, class_name), indent=2) + "\n")
    state = {k: v.to(STORE_DTYPE) for k, v in module.state_dict().items()}
    weights.save_safetensors(state, folder / f"{stem}.safetensors", overwrite=overwrite)


def save_pipeline(folder, pipeline_class, unet, unet_class, vae, text_encoder, tokenizer, sampling, overwrite=False,
                  scheduler_config=SCHEDULER):
    """A diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, sampling.json."""
    folder = Path(folder)
    if (folder / "model_index.json").exists() and not overwrite:
        raise FileExistsError(f"{folder / 'model_index.json'} exists; pass overwrite=True to replace it")
    save_model(folder / "unet", unet, unet_class, overwrite=overwrite)
    save_model(folder / "vae", vae, "AutoencoderKL", overwrite=overwrite)
    decoder_text.save(folder, text_encoder, tokenizer, dtype=STORE_DTYPE, overwrite=overwrite)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
    index = {"_class_name": pipeline_class, "unet": ["diffusers", unet_class], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", scheduler_config["_class_name"]]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "sampling.json").write_text(json.dumps(sampling, indent=2) + "\n")
    return folder


def folder_megabytes(folder) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20, 2)


# ---------------------------------------------------------------- 1. the VAE

def render_images(n, rng, split="train"):
    """(n, 3, 32, 32) images in [-1, 1] and their objects."""
    objs = [world.sample_object(rng, split) for _ in range(n)]
    images = np.stack([world.render_image(o, rng) for o in objs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, objs


def object_weights(x, weight=10.0):
    """Per-pixel loss weights: `weight` on and one pixel around the object (the coloured pixels), 1 elsewhere."""
    chroma = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2     # x in [-1, 1]
    near = F.max_pool2d((chroma > 0.1).float(), 3, stride=1, padding=1)
    return 1 + (weight - 1) * near


def _vae_phase(name, vae, seed, steps, lr, weighted, resume, progress, scale, runs_dir, batch=32, kl_weight=1e-6):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    total = max(2, int(steps * scale))
    run = Run(name, {"vae": vae}, opt, total, peak_lr=lr, warmup=min(50, max(1, total // 10)), resume=resume,
              progress_bar=progress, runs_dir=runs_dir)
    for step in run.steps():
        x, _ = render_images(batch, np.random.default_rng([seed, step, int(weighted)]) if weighted
                             else np.random.default_rng([seed, step]))
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample())
        w = object_weights(x) if weighted else torch.ones_like(x[:, :1])
        err = recon - x
        loss = (w * err.abs()).mean() + (w * err ** 2).mean() + kl_weight * posterior.kl().mean()
        optimizer_step(opt, loss, vae.parameters())
        run.log(loss.detach())
    return run


def train_vae(seed=0, resume=True, progress=True, scale=1.0, runs_dir=None):
    """Two phases: plain L1 + L2 reconstruction, then the same with the object's pixels weighted 10x,
    because the checkers judge the object's corners and arms, which take a small share of the pixels."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(vae_config())
    first = _vae_phase("image_decoder_vae", vae, seed, 600, 2e-3, False, resume, progress, scale, runs_dir)
    second = _vae_phase("image_decoder_vae_edges", vae, seed, 250, 1e-3, True, resume, progress, scale, runs_dir)
    second.started = first.started
    return vae.eval().requires_grad_(False), second


@torch.no_grad()
def encode_dataset(vae, images, batch=256):
    """Posterior mean and std of every image, for sampling fresh latents each epoch."""
    means, stds = [], []
    for chunk in images.split(batch):
        post = vae.encode(chunk)
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------- 2. the UNet and its text encoder

def train_unet(vae, seed=0, resume=True, progress=True, scale=1.0, runs_dir=None, steps=2800, batch=64,
               n_images=6144, lr=1e-3):
    rng = np.random.default_rng([seed, 1])
    images, objs = render_images(max(batch, int(n_images * min(1.0, 4 * scale))), rng)
    mean, std = encode_dataset(vae, images)
    vae.config = dataclasses.replace(vae.config, scaling_factor=round(1.0 / mean.std().item(), 5))
    torch.manual_seed(seed)
    tokenizer = decoder_text.build_tokenizer()
    text_encoder = decoder_text.new_text_encoder(tokenizer, seed=seed)
    unet = UNet2DCondition(unet_config())
    ema_unet, ema_text, run = fit_denoiser(
        "image_decoder_unet", unet, text_encoder, tokenizer, mean, std, vae.scaling_factor,
        lambda i, rng: world.caption(objs[i], rng, "image"), seed=seed, rng_tag=2, steps=steps, batch=batch,
        lr=lr, ema_decay=0.995, warmup=100, scale=scale, resume=resume, progress=progress, runs_dir=runs_dir)
    return ema_unet, ema_text, tokenizer, run


def fit_denoiser(name, unet, text_encoder, tokenizer, mean, std, scaling_factor, caption, *, seed, rng_tag,
                 steps, batch, lr, ema_decay, warmup, scale, resume, progress, runs_dir, high_noise_share=0.0,
                 scheduler_config=SCHEDULER):
    """The denoiser's training loop, shared by the image and the video decoder. Latents are drawn from
    the encoded dataset's posteriors (mean, std), captions (`caption(i, rng)` for dataset item i) are
    dropped to "" at CAPTION_DROPOUT for guidance, and UNet and text encoder (unless frozen) train
    together under diffusion_loss. Returns the EMA copies of both and the run."""
    ema_unet, ema_text = EMA(unet, ema_decay), EMA(text_encoder, ema_decay)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(scheduler_config)
    total = max(2, int(steps * scale))
    run = Run(name, {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text},
              opt, total, peak_lr=lr, warmup=min(warmup, total // 10 + 1), resume=resume, progress_bar=progress,
              runs_dir=runs_dir)
    for step in run.steps():
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.randint(0, len(mean), (batch,), generator=g)
        latents = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=g)) * scaling_factor
        step_rng = np.random.default_rng([seed, rng_tag, step])
        captions = [caption(i, step_rng) for i in pick.tolist()]
        cond = decoder_text.encode(text_encoder, tokenizer, decoder_text.drop_captions(captions, CAPTION_DROPOUT, step_rng))
        loss = diffusion_loss(lambda x, t, c: unet(x, t, encoder_hidden_states=c), scheduler, latents, cond, g,
                              high_noise_share)
        optimizer_step(opt, loss, params)
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        run.log(loss.detach())
    return ema_unet.shadow, ema_text.shadow, run


def train(seed=0, resume=True, progress=True, scale=1.0, out_dir=None, runs_dir=None) -> dict:
    out = Path(out_dir or OUT_DIR)
    vae, vae_run = train_vae(seed, resume, progress, scale, runs_dir)
    unet, text_encoder, tokenizer, unet_run = train_unet(vae, seed, resume, progress, scale, runs_dir)
    save_pipeline(out, "StableDiffusionPipeline", unet, "UNet2DConditionModel", vae, text_encoder, tokenizer,
                  SAMPLING, overwrite=True)
    return {"folder": str(out), "vae_loss": round(vae_run.history[-1]["loss"], 4),
            "unet_loss": round(sum(r["loss"] for r in unet_run.history[-50:]) / len(unet_run.history[-50:]), 4),
            "vae_minutes": round(vae_run.seconds / 60, 2), "unet_minutes": round(unet_run.seconds / 60, 2),
            "megabytes": folder_megabytes(out)}


# ---------------------------------------------------------------- evaluation

def load_pipeline(folder=None, device=None):
    """The shipped decoder as `ImagePipeline`, upcast to fp32, with its sampler settings."""
    from minignext.diffusion import ImagePipeline

    folder = Path(folder or OUT_DIR)
    settings = json.loads((folder / "sampling.json").read_text())
    return ImagePipeline.from_pretrained(folder, dtype=torch.float32, device=device), settings


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


def evaluate(quick=False, seed=1234, folder=None) -> list:
    from minignext.toy.eval import Metric

    pipeline, settings = load_pipeline(folder)
    n, n_held = (24, 12) if quick else (240, 60)
    objs, caps = prompts(n, seed, "train", "test")
    held_objs, held_caps = prompts(n_held, seed + 1, "heldout", "test")
    note = f"DDIM {settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}"
    return [Metric("text -> image, held-out prompts", accuracy(pipeline, settings, objs, caps, seed), 0.95, n, note),
            Metric("text -> image, held-out colour-shape pairs", accuracy(pipeline, settings, held_objs, held_caps, seed),
                   None, n_held, "composition; no threshold")]
