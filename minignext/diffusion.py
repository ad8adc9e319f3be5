"""Latent-diffusion sampling: the shared denoising loop with classifier-free guidance, and
the Stable Diffusion image pipeline NExT-GPT decodes images with.

Papers: Rombach et al. 2022 (latent diffusion, arXiv 2112.10752); Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance" (arXiv 2207.12598). Reference code: huggingface/diffusers
`pipelines/stable_diffusion/pipeline_stable_diffusion.py`; NExT-GPT's legacy
`NExT-GPT-Lagacy/code/model/anyToImageVideoAudio.py` calls that pipeline with `prompt_embeds`.

`denoise()` knows nothing about images: the audio and video pipelines call it with their
own UNet function and conditioning. `MediaDecoder` puts any of the three pipelines behind the one
interface NExT-GPT's loop routes its signal tokens to.
"""

import numbers
from pathlib import Path

import numpy as np
import torch

from minignext import weights
from minignext.generation import check_generation_options
from minignext.schedulers import scheduler_from_config
from minignext.utils import progress as progress_bar
from minignext.vocoder import GriffinLim, GriffinLimConfig, HifiGan
from minignext.weights import WeightsError


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
    scheduler.set_timesteps(num_inference_steps)   # on the host: they steer the loop; the UNet moves t to its device
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
    array = images.detach().permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8).squeeze(-1) if a.shape[-1] == 1
                            else (a * 255).round().astype(np.uint8)) for a in array]



# the sub-folders of a diffusers repo that each pipeline reads (resolve() fetches only these)
SD_FOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
AUDIOLDM_FOLDERS = ("unet", "vae", "scheduler", "vocoder")


def load_sd_folder(path, unet_class, scheduler=None, dtype=None, device=None) -> dict:
    """The parts of a diffusers StableDiffusion or TextToVideoSD folder: unet, vae and scheduler, plus
    text_encoder and tokenizer where model_index.json lists them. `scheduler` names another class."""
    from minignext.clip import CLIPText, CLIPTokenizer
    from minignext.vae import AutoencoderKL

    folder = weights.resolve(path, folders=SD_FOLDERS)
    index = weights.read_config(folder, "model_index.json")
    sched_cfg = weights.read_config(folder / "scheduler", "scheduler_config.json")
    if scheduler is not None:
        sched_cfg = {**sched_cfg, "_class_name": scheduler}
    has = lambda name: index.get(name) not in (None, [None, None]) and (folder / name).is_dir()
    return dict(unet=unet_class.from_pretrained(folder / "unet", dtype=dtype, device=device),
                vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, device=device),
                scheduler=scheduler_from_config(sched_cfg),
                text_encoder=CLIPText.from_pretrained(folder / "text_encoder", dtype=dtype, device=device)
                if has("text_encoder") else None,
                tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer") if has("tokenizer") else None)

class ImagePipeline:
    """Text or prompt embeddings -> images, with Stable Diffusion's UNet, VAE and scheduler."""

    FOLDERS = SD_FOLDERS

    def __init__(self, unet, vae, scheduler, text_encoder=None, tokenizer=None):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, scheduler=None):
        """A diffusers Stable Diffusion folder: model_index.json, unet/, vae/, scheduler/ and,
        if present, text_encoder/ and tokenizer/. `scheduler` may name a class to use instead of
        the one in scheduler_config.json (SD-1.5 ships PNDM, which minignext replaces by DDIM)."""
        from minignext.unet import UNet2DCondition

        return cls(**load_sd_folder(path, UNet2DCondition, scheduler, dtype, device))

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


# ---------------------------------------------------------------- audio: AudioLDM

class AudioPipeline:
    """CLAP embeddings -> waveforms with AudioLDM (Liu et al. 2023, "AudioLDM: Text-to-Audio Generation
    with Latent Diffusion Models", arXiv 2301.12503): the UNet denoises a mel-spectrogram latent,
    conditioned by the 512-d CLAP vector through `class_labels` (projected and concatenated to the
    time embedding; no cross-attention), the VAE decodes the mel, and HiFi-GAN turns it into sound.
    Mirrors diffusers' `AudioLDMPipeline` called with `prompt_embeds`.

    The CLAP text encoder is not part of minignext. diffusers uses prompt_embeds as given, and when
    no negative is given its unconditional branch is the L2-normalised CLAP embedding of "". Here
    that vector must be supplied: per call as `negative_prompt_embeds`, or once as
    `unconditional_embeds` (D,) when building the pipeline.
    """

    FOLDERS = AUDIOLDM_FOLDERS

    def __init__(self, unet, vae, scheduler, vocoder, unconditional_embeds=None):
        self.unet, self.vae, self.scheduler, self.vocoder = unet, vae, scheduler, vocoder
        self.unconditional_embeds = unconditional_embeds

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, scheduler=None, unconditional_embeds=None):
        """A diffusers AudioLDM folder: unet/, vae/, vocoder/, scheduler/ (text_encoder/ is not read)."""
        from minignext.unet import UNet2DCondition
        from minignext.vae import AutoencoderKL

        folder = weights.resolve(path, folders=AUDIOLDM_FOLDERS)
        sched_cfg = weights.read_config(folder / "scheduler", "scheduler_config.json")
        if scheduler is not None:
            sched_cfg = {**sched_cfg, "_class_name": scheduler}
        return cls(unet=UNet2DCondition.from_pretrained(folder / "unet", dtype=dtype, device=device),
                   vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, device=device),
                   scheduler=scheduler_from_config(sched_cfg),
                   vocoder=load_vocoder(folder / "vocoder", dtype=dtype, device=device),
                   unconditional_embeds=unconditional_embeds)

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @property
    def sampling_rate(self):
        return self.vocoder.config.sampling_rate

    def _embeds(self, prompt_embeds, negative_prompt_embeds, guided):
        width = self.unet.config.projection_class_embeddings_input_dim
        if isinstance(prompt_embeds, (str, list, tuple)):
            raise ValueError("AudioPipeline takes CLAP embeddings, not text: minignext has no CLAP text encoder. "
                             f"Pass prompt_embeds as a (batch, {width}) tensor, e.g. NExT-GPT's audio output "
                             "projection")
        if not torch.is_tensor(prompt_embeds) or prompt_embeds.dim() != 2 or prompt_embeds.shape[-1] != width:
            shape = tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__
            raise ValueError(f"prompt_embeds must be a (batch, {width}) tensor of CLAP embeddings, got {shape}")
        if not guided:
            return prompt_embeds.to(self.device, self.dtype), None
        if negative_prompt_embeds is None:
            if self.unconditional_embeds is None:
                raise ValueError(
                    "guidance_scale > 1 needs the unconditional branch: AudioLDM uses the normalised CLAP "
                    "embedding of the empty text, which minignext cannot compute. Pass negative_prompt_embeds "
                    "(batch, dim), build the pipeline with unconditional_embeds=..., or use guidance_scale <= 1")
            empty = torch.as_tensor(self.unconditional_embeds)
            if empty.numel() != width:
                raise ValueError(f"unconditional_embeds must hold one {width}-d CLAP vector, got shape "
                                 f"{tuple(empty.shape)}")
            negative_prompt_embeds = empty.reshape(1, width).expand_as(prompt_embeds)
        if not torch.is_tensor(negative_prompt_embeds) or negative_prompt_embeds.shape != prompt_embeds.shape:
            shape = tuple(negative_prompt_embeds.shape) if torch.is_tensor(negative_prompt_embeds) else None
            raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds "
                             f"{tuple(prompt_embeds.shape)}, got {shape}")
        return prompt_embeds.to(self.device, self.dtype), negative_prompt_embeds.to(self.device, self.dtype)

    def mel_frames(self, audio_length_in_s=None):
        """(seconds, mel frames rounded up to the VAE's scale, samples to keep), as diffusers computes them."""
        f, voc = self.vae.scale_factor, self.vocoder.config
        seconds_per_frame = voc.hop_length / voc.sampling_rate
        if audio_length_in_s is None:
            audio_length_in_s = self.unet.config.sample_size * f * seconds_per_frame
        if isinstance(audio_length_in_s, bool) or not isinstance(audio_length_in_s, numbers.Real) \
                or not audio_length_in_s >= f * seconds_per_frame:
            raise ValueError(f"audio_length_in_s must be a number of seconds >= {f * seconds_per_frame:g} "
                             f"(one latent row: {f} mel frames of {seconds_per_frame:g} s), got {audio_length_in_s!r}")
        frames = int(audio_length_in_s / seconds_per_frame)
        frames = -(-frames // f) * f
        return audio_length_in_s, frames, int(audio_length_in_s * voc.sampling_rate)

    def _initial_latents(self, batch, frames, seed, latents):
        f, bins = self.vae.scale_factor, self.vocoder.config.model_in_dim
        if bins % f:
            raise ValueError(f"the vocoder's {bins} mel bins are not divisible by the VAE scale factor {f}")
        shape = (batch, self.unet.config.in_channels, frames // f, bins // f)
        if latents is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents must have shape {shape} (batch, channels, mel frames / {f}, "
                             f"mel bins / {f}) for this audio length; got {got}")
        return latents.to(self.device, self.dtype)

    def decode(self, latents):
        """Latents -> mel spectrograms (B, frames, bins) -> waveforms (B, samples)."""
        mel = self.vae.decode(latents / self.vae.scaling_factor)[:, 0]
        return mel, self.vocoder(mel)

    @torch.no_grad()
    def __call__(self, prompt_embeds, negative_prompt_embeds=None, guidance_scale=2.5, num_inference_steps=10,
                 seed=None, latents=None, audio_length_in_s=None, output_type="np", progress=True, callback=None):
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        guided = guidance_scale > 1.0
        cond, uncond = self._embeds(prompt_embeds, negative_prompt_embeds, guided)
        _, frames, samples = self.mel_frames(audio_length_in_s)
        latents = self._initial_latents(cond.shape[0], frames, seed, latents)
        generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        latents = denoise(lambda x, t, c: self.unet(x, t, encoder_hidden_states=None, class_labels=c), latents,
                          self.scheduler, cond, uncond, guidance_scale, num_inference_steps, progress, callback,
                          generator, desc="audio")
        audio = self.decode(latents)[1][:, :samples]                   # crop the rounding-up of the length
        return audio.float().cpu().numpy() if output_type == "np" else audio

    def save(self, waveforms, folder, stem="audio", overwrite=False):
        """Write each waveform as a 16-bit WAV at the vocoder's sampling rate; never overwrites unless asked."""
        from minignext.media import write_wav

        paths = []
        for i, w in enumerate(waveforms):
            path = Path(folder) / f"{stem}_{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            paths.append(write_wav(path, torch.as_tensor(w), self.sampling_rate, overwrite=overwrite))
        return paths


def load_vocoder(folder, dtype=None, device=None):
    """vocoder/ of an AudioLDM folder: HiFi-GAN, or Griffin-Lim when its config.json names that class."""
    config = weights.read_config(folder)
    if config.get("_class_name") == "GriffinLim":
        return GriffinLim(GriffinLimConfig.from_hf(config)).to(device).eval()
    return HifiGan.from_pretrained(folder, dtype=dtype, device=device)


# ---------------------------------------------------------------- video: ZeroScope / ModelScope T2V

class VideoPipeline(ImagePipeline):
    """Text states (B, 77, 1024) -> video clips with the 3D UNet (ModelScope text-to-video, Wang et
    al. 2023, arXiv 2308.06571; ZeroScope v2 is a fine-tune of it). Mirrors diffusers'
    `TextToVideoSDPipeline`. The scheduler and the loop see the latents with the frames folded into
    the batch (B*F, C, h, w), as there; the UNet gets them unfolded. The VAE is the image VAE, run
    on one frame at a time."""

    def __init__(self, unet3d, vae, scheduler, text_encoder=None, tokenizer=None):
        super().__init__(unet3d, vae, scheduler, text_encoder, tokenizer)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, scheduler=None):
        """A diffusers TextToVideoSD folder: model_index.json, unet/ (3D), vae/, scheduler/ and, if
        present, text_encoder/ and tokenizer/."""
        from minignext.unet3d import UNet3DCondition

        parts = load_sd_folder(path, UNet3DCondition, scheduler, dtype, device)
        return cls(unet3d=parts.pop("unet"), **parts)

    def _initial_video_latents(self, batch, num_frames, height, width, seed, latents):
        """Unit-variance noise (B, C, F, h, w), or the given latents after checking their shape."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        f = self.vae.scale_factor
        if latents is not None:
            if not torch.is_tensor(latents) or latents.dim() != 5:
                raise ValueError(f"latents must be a (batch, channels, frames, height/{f}, width/{f}) tensor")
            if latents.shape[2] != num_frames:
                raise ValueError(f"latents hold {latents.shape[2]} frames but num_frames={num_frames}; "
                                 f"pass num_frames={latents.shape[2]} or new latents")
            height, width = height or latents.shape[3] * f, width or latents.shape[4] * f
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        if height % f or width % f:
            raise ValueError(f"height and width must be divisible by {f} (the VAE's scale factor), "
                             f"got {height}x{width}")
        shape = (batch, self.unet.config.in_channels, num_frames, height // f, width // f)
        if latents is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; for {height}x{width} video, "
                             f"{num_frames} frames and a batch of {batch} they must be {shape}")
        return latents.to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, prompt_embeds=None, negative_prompt_embeds=None, num_frames=16, height=None, width=None,
                 guidance_scale=9.0, num_inference_steps=50, seed=None, latents=None, output_type="np",
                 progress=True, callback=None, prompt=None, negative_prompt=None):
        """Returns "np" (B, F, H, W, 3) float32 or "pt" (B, F, 3, H, W), values in [0, 1]; "latent" the latents."""
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        from minignext.unet3d import fold_frames, unfold_frames

        guided = guidance_scale > 1.0
        cond, uncond = self._conditioning(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, guided)
        latents = self._initial_video_latents(cond.shape[0], num_frames, height, width, seed, latents)
        generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        unet_fn = lambda x, t, c: fold_frames(self.unet(unfold_frames(x, num_frames), t, c))
        latents = unfold_frames(denoise(unet_fn, fold_frames(latents), self.scheduler, cond, uncond, guidance_scale,
                                        num_inference_steps, progress, callback, generator, desc="video"), num_frames)
        if output_type == "latent":
            return latents
        video = self.decode_video(latents)                               # (B, F, 3, H, W)
        return video if output_type == "pt" else video.permute(0, 1, 3, 4, 2).float().cpu().numpy()

    def decode_video(self, latents):
        """(B, C, F, h, w) latents -> (B, F, 3, H, W) frames in [0, 1], one VAE call per frame."""
        frames = [decode_latents(self.vae, latents[:, :, i]) for i in range(latents.shape[2])]
        return torch.stack(frames, dim=1)

    def save(self, video, folder, stem="video", fps=8, overwrite=False):
        """Write each clip (F, H, W, 3) of an "np" result as an animated GIF; never overwrites unless asked."""
        from minignext.media import write_gif

        paths = []
        for i, clip in enumerate(video):
            path = Path(folder) / f"{stem}_{i}.gif"
            path.parent.mkdir(parents=True, exist_ok=True)
            paths.append(write_gif(path, clip, fps=fps, overwrite=overwrite))
        return paths


# ---------------------------------------------------------------- one interface for NExT-GPT's decoders

class MediaDecoder:
    """A diffusion pipeline behind one interface: conditioning in, media out, with the decoder's
    own sampling defaults (the published 7.5 and 50 steps unless its folder says otherwise).

    The pipelines themselves embed "" with their own text encoder for the unconditional
    branch of classifier-free guidance, as the reference does.
    """

    def __init__(self, modality, pipeline, guidance_scale=7.5, num_inference_steps=50, **call_kwargs):
        self.modality, self.pipeline, self.call_kwargs = modality, pipeline, call_kwargs
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps

    def generate(self, cond, guidance_scale=None, num_inference_steps=None, seed=0, progress=True, on_step=None):
        """cond: a batch of conditionings (B, Q, D), audio (B, D) -> B media. on_step(done, total) is
        called after each denoising step. Non-finite values in the conditioning or the output are
        an error (broken weights), never a black picture."""
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        check_generation_options(guidance_scale=guidance, num_inference_steps=steps)
        if not torch.isfinite(cond).all():
            raise WeightsError(f"the {self.modality} conditioning holds NaN or infinite values; the LLM's or the "
                               f"output projection's weights are broken")
        scheduler = self.pipeline.scheduler          # its timesteps are set when sampling starts
        callback = None if on_step is None else (lambda i, *_: on_step(i + 1, len(scheduler.timesteps)))
        out = self.pipeline(prompt_embeds=cond, seed=seed, progress=progress, callback=callback, **self.call_kwargs,
                            guidance_scale=guidance, num_inference_steps=steps,
                            **({"output_type": "np"} if self.modality == "image" else {}))
        if not all(np.isfinite(np.asarray(x)).all() for x in out):
            raise WeightsError(f"the {self.modality} decoder produced NaN or infinite values; its weights are broken")
        if self.modality == "image":
            return to_output(torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2), "pil")
        if self.modality == "audio":
            return [(np.asarray(w, dtype=np.float32).reshape(-1), self.pipeline.sampling_rate) for w in out]
        return [(np.clip(v, 0, 1) * 255).round().astype(np.uint8) for v in out]     # frames (T, H, W, 3)

