"""Latent-diffusion sampling: the shared denoising loop with classifier-free guidance, and
the Stable Diffusion image pipeline NExT-GPT decodes images with.

Papers: Rombach et al. 2022 (latent diffusion, arXiv 2112.10752); Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance" (arXiv 2207.12598). Reference code: huggingface/diffusers
`pipelines/stable_diffusion/pipeline_stable_diffusion.py`; NExT-GPT's legacy
`NExT-GPT-Lagacy/code/model/anyToImageVideoAudio.py` calls that pipeline with `prompt_embeds`.

`denoise()` knows nothing about images: the audio and video pipelines call it with their
own UNet function and conditioning.
"""

from pathlib import Path

import numpy as np
import torch

from minignext import weights
from minignext.schedulers import scheduler_from_config
from minignext.utils import progress as progress_bar


def classifier_free_guidance(uncond, cond, guidance_scale):
    """Ho & Salimans 2022, eq. 6: eps~ = eps(x, 0) + w (eps(x, c) - eps(x, 0)), here with w = guidance_scale
    (their 1 + w), so 1.0 means the conditional prediction alone and 0.0 the unconditional one."""
    return uncond + guidance_scale * (cond - uncond)


def denoise(unet_fn, latents, scheduler, cond, uncond=None, guidance_scale=7.5, num_inference_steps=50,
            progress=True, callback=None, generator=None, desc="denoising"):
    """Run the reverse process from unit-variance noise `latents` to a clean latent.

    unet_fn(x, t, c) -> model output, where c is `cond` (or [uncond; cond] stacked on the batch).
    With `uncond` given and guidance_scale > 1, both branches run in one batch of 2B.
    callback(i, t, latents, pred_original_sample) is called after every step.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    guided = uncond is not None and guidance_scale > 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    for i, t in enumerate(progress_bar(scheduler.timesteps, desc=desc, enabled=progress)):
        x = torch.cat([latents] * 2) if guided else latents
        out = unet_fn(scheduler.scale_model_input(x, t), t, context)
        if guided:
            out = classifier_free_guidance(*out.chunk(2), guidance_scale)
        step = scheduler.step(out, t, latents, generator=generator)
        latents = step.prev_sample
        if callback is not None:
            callback(i, t, latents, step.pred_original_sample)
    return latents


def decode_latents(vae, latents):
    """Diffusion latents -> images (B, 3, H, W) in [0, 1]."""
    return (vae.decode(latents / vae.scaling_factor) / 2 + 0.5).clamp(0, 1)


def to_output(images, output_type):
    """Images (B, C, H, W) in [0, 1] -> "pt" as is, "np" (B, H, W, C) float32, or a list of PIL images."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8).squeeze(-1) if a.shape[-1] == 1
                            else (a * 255).round().astype(np.uint8)) for a in array]


class ImagePipeline:
    """Text or prompt embeddings -> images, with Stable Diffusion's UNet, VAE and scheduler."""

    def __init__(self, unet, vae, scheduler, text_encoder=None, tokenizer=None):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, scheduler=None):
        """A diffusers Stable Diffusion folder: model_index.json, unet/, vae/, scheduler/ and,
        if present, text_encoder/ and tokenizer/. `scheduler` may name a class to use instead of
        the one in scheduler_config.json (SD-1.5 ships PNDM, which minignext replaces by DDIM)."""
        from minignext.clip import CLIPText, CLIPTokenizer
        from minignext.unet import UNet2DCondition
        from minignext.vae import AutoencoderKL

        folder = weights.resolve(path)
        index = weights.read_config(folder, "model_index.json")
        sched_cfg = weights.read_config(folder / "scheduler", "scheduler_config.json")
        if scheduler is not None:
            sched_cfg = {**sched_cfg, "_class_name": scheduler}
        has = lambda name: index.get(name) not in (None, [None, None]) and (folder / name).is_dir()
        return cls(unet=UNet2DCondition.from_pretrained(folder / "unet", dtype=dtype, device=device),
                   vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, device=device),
                   scheduler=scheduler_from_config(sched_cfg),
                   text_encoder=CLIPText.from_pretrained(folder / "text_encoder", dtype=dtype, device=device)
                   if has("text_encoder") else None,
                   tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer") if has("tokenizer") else None)

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode_text(self, texts, max_length=None):
        """Texts -> the CLIP text encoder's last hidden state (B, 77, 768 for SD-1.5)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer: pass prompt_embeds "
                             "(and negative_prompt_embeds when guidance_scale > 1)")
        ids = self.tokenizer(list(texts), max_length=max_length or self.tokenizer.model_max_length)
        return self.text_encoder(ids.to(self.device)).last_hidden_state.to(self.dtype)

    def _conditioning(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, guided):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt= (text) and prompt_embeds= (a (B, T, D) tensor)")
        width = self.unet.config.per_block("cross_attention_dim")[0]
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode_text(prompts)
        elif not torch.is_tensor(prompt_embeds) or prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != width:
            shape = tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__
            raise ValueError(f"prompt_embeds must be a (batch, tokens, {width}) tensor, got {shape}")
        b, n = prompt_embeds.shape[:2]
        if not guided:
            return prompt_embeds.to(self.device, self.dtype), None
        if negative_prompt_embeds is None:
            negatives = [""] * b if negative_prompt is None else (
                [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(negatives) != b:
                raise ValueError(f"negative_prompt has {len(negatives)} entries for a batch of {b}")
            negative_prompt_embeds = self.encode_text(negatives, max_length=n)
        if not torch.is_tensor(negative_prompt_embeds) or negative_prompt_embeds.shape != prompt_embeds.shape:
            shape = tuple(negative_prompt_embeds.shape) if torch.is_tensor(negative_prompt_embeds) else None
            raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds "
                             f"{tuple(prompt_embeds.shape)}, got {shape}")
        return prompt_embeds.to(self.device, self.dtype), negative_prompt_embeds.to(self.device, self.dtype)

    def _initial_latents(self, batch, height, width, seed, latents):
        f, c = self.vae.scale_factor, self.unet.config.in_channels
        if latents is not None:
            if not torch.is_tensor(latents) or latents.dim() != 4:
                raise ValueError("latents must be a (batch, channels, height/8, width/8) tensor")
            height, width = height or latents.shape[2] * f, width or latents.shape[3] * f
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        if height % f or width % f:
            raise ValueError(f"height and width must be divisible by {f} (the VAE's scale factor), "
                             f"got {height}x{width}")
        shape = (batch, c, height // f, width // f)
        if latents is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; for {height}x{width} images "
                             f"and a batch of {batch} they must be {shape}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")
        return latents.to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_embeds=None, negative_prompt=None, negative_prompt_embeds=None,
                 guidance_scale=7.5, num_inference_steps=50, seed=None, latents=None, height=None, width=None,
                 output_type="pil", progress=True, callback=None):
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        guided = guidance_scale > 1.0
        cond, uncond = self._conditioning(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, guided)
        latents = self._initial_latents(cond.shape[0], height, width, seed, latents)
        generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        latents = denoise(lambda x, t, c: self.unet(x, t, encoder_hidden_states=c), latents, self.scheduler,
                          cond, uncond, guidance_scale, num_inference_steps, progress, callback, generator)
        if output_type == "latent":
            return latents
        return to_output(decode_latents(self.vae, latents), output_type)

    def save(self, images, folder, stem="image", overwrite=False):
        """Write PIL images as PNGs; existing files are kept unless overwrite=True."""
        paths = []
        for i, image in enumerate(images):
            path = Path(folder) / f"{stem}_{i}.png"
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            paths.append(path)
        return paths
