"""The toy video decoder: a ZeroScope-style text-to-video model (ModelScope T2V, Wang et al. 2023,
arXiv 2308.06571) trained from scratch on the toy world's moving shapes.

    - the toy image decoder's VAE, frozen: every frame is an 8x8x4 latent (ModelScope sec. 3.1);
    - minignext.unet3d.UNet3DCondition over 8 frames, v-prediction on a zero-terminal-SNR schedule,
      cross-attending to its own text encoder: the image decoder's, taught the direction words
      (train_text_encoder), then frozen;
    - the 3D UNet starts from the toy image decoder: its spatial layers take the image UNet's
      weights and its temporal layers start as the identity (their output layers zeroed), the
      way ModelScope grows its video model out of Stable Diffusion (sec. 3.2), so training only
      has to learn motion;
    - 10% of captions dropped to "" for classifier-free guidance; an EMA of the UNet is what ships.

The result is a diffusers TextToVideoSDPipeline folder that `minignext.diffusion.VideoPipeline`
loads, plus `sampling.json` (guidance, steps, frames) for the presets. Weights in fp16.

Three things made the direction follow the words; without any one of them it did not (each run
700 steps, judged on 16 held-out prompts):
    - a text encoder that tells the directions apart. The image decoder's never saw "left" or "up":
      on its states the four directions differ by 2-3% of their length after the direction word
      (74-85% with train_text_encoder's), and with them the UNet got 25%.
    - no signal left at t = 999. Stable Diffusion's schedule keeps sqrt(abar) = 0.07 of the clean
      latents there; over a clip's 2048 latent numbers that shows the motion, so the UNet learns to
      read the direction out of the noise, which at sampling time is pure and moves at random. With
      the direction-aware text encoder and half of the steps drawn from the noisiest 30%, the
      predicted clean clip at t = 999 still did not move (0.5 px for "left"), and the sampled clips
      took the right axis but often the wrong way: 37.5%. Lin et al. 2024 ("Common Diffusion Noise
      Schedules and Sample Steps are Flawed", sec. 3.2-3.4) rescale the schedule to zero terminal SNR,
      predict v (eps is undefined at SNR 0) and sample with trailing steps, from t = 999: 100%.
      Raising beta_end to 0.03 instead (sqrt(abar) = 0.002 at t = 999, eps-prediction) gave 6%.
    - those high-noise steps seen often: half of every batch draws t from the noisiest 30%
      (diffusion_loss's high_noise_share), where the sampler lays out the motion.
"""

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minignext.toy import checkers, decoder_text, latent_diffusion, world
from minignext.toy import train_image_decoder as image_decoder
from minignext.toy.trainer import TOY_DIR, Run, RunArgs, optimizer_step, summary
from minignext.unet import UNet2DCondition
from minignext.unet3d import UNet3DCondition, UNet3DConditionConfig
from minignext.vae import AutoencoderKL

OUT_DIR = TOY_DIR / "video_decoder"
TEMPORAL = ("temp_convs", "temp_attentions", "transformer_in")     # the 3D UNet's layers that the image UNet lacks
SAMPLING = {"guidance_scale": 3.0, "num_inference_steps": 25, "num_frames": world.N_FRAMES}
# The image decoder's schedule rescaled to zero terminal SNR, v-prediction, trailing steps (Lin et al. 2024)
SCHEDULER = {**image_decoder.SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
             "timestep_spacing": "trailing"}
SCHEDULE = {"text": dict(steps=300, lr=2e-3),
            "unet": dict(steps=700, batch=16, lr=1e-3, ema_decay=0.99, warmup=50, high_noise_share=0.5)}
TEXT_BATCH = 128
VIDEOS = 2048           # rendered and encoded once, frame by frame


def unet_config() -> UNet3DConditionConfig:
    """The image UNet's widths (so its weights fit), plus the temporal layers: about 1.9M parameters.
    transformer_in keeps its 8 heads, which diffusers fixes for this model. Two changes from
    ZeroScope, both switched on in the config and both measured here as necessary:
      - temporal_positions: the temporal attentions know each frame's position (a sine-cosine
        table, as in AnimateDiff's motion modules). Without it only the temporal convolutions'
        zero padding tells frame 1 from frame 8, and 600 training steps gave objects that stood
        still (all frames alike) or jumped.
      - temporal_cross_attention: the blocks' temporal attentions read the caption. With frame
        positions alone the objects moved smoothly, but in a direction set by the starting
        noise: after 1500 steps (and with the high-noise steps weighted up) the predicted clean
        clip moved the same way for "left", "right", "up" and "down". ZeroScope routes the
        words to the motion only through the per-frame spatial cross-attention, which its
        months of training can afford and minutes here cannot.
    """
    image = image_decoder.unet_config()
    return UNet3DConditionConfig(sample_size=image.sample_size, block_out_channels=image.block_out_channels,
                                 down_block_types=("CrossAttnDownBlock3D",) * 2, up_block_types=("CrossAttnUpBlock3D",) * 2,
                                 layers_per_block=image.layers_per_block, norm_num_groups=image.norm_num_groups,
                                 cross_attention_dim=decoder_text.WIDTH, attention_head_dim=8,
                                 temporal_positions=2 * world.N_FRAMES, temporal_cross_attention=True)


def unet_from_image(image_unet: UNet2DCondition) -> UNet3DCondition:
    """A 3D UNet that, before training, is the image UNet applied to every frame."""
    unet = UNet3DCondition(unet_config())
    own = unet.state_dict()
    shared = {}
    for k, v in image_unet.state_dict().items():
        if k in own and v.dim() == 4 and own[k].dim() == 2:     # a 1x1 conv projection becomes a Linear
            v = v[:, :, 0, 0]
        if k in own and own[k].shape == v.shape:
            shared[k] = v
    missing = [k for k in own if k not in shared and not any(part in k for part in TEMPORAL)]
    if missing:
        raise ValueError(f"the image UNet does not fit the 3D UNet's spatial layers: {missing[:5]}")
    unet.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if (".conv4." in name) or ("proj_out" in name and ("temp_attentions" in name or "transformer_in" in name)):
                p.zero_()
    return unet


# ---------------------------------------------------------------- the text encoder

def direction_codes(generator, norm) -> torch.Tensor:
    """(4, WIDTH): one fixed, zero-mean vector of length `norm` per direction, nearly orthogonal."""
    codes = torch.randn(len(world.DIRECTIONS), decoder_text.WIDTH, generator=generator)
    codes = codes - codes.mean(1, keepdim=True)
    return norm * F.normalize(codes, dim=1)


def direction_positions(tokenizer, ids) -> torch.Tensor:
    """(B,) index of each caption's first direction word (left, upwards, ...), CONTEXT_LENGTH if none."""
    vocab = tokenizer.tokenizer.get_vocab()
    words = torch.tensor([vocab[w] for words in world.DIRECTION_WORDS.values() for w in words if w in vocab])
    return torch.where(torch.isin(ids, words), torch.arange(ids.shape[1]), ids.shape[1]).min(1).values


def train_text_encoder(image_text, tokenizer, args: RunArgs):
    """The image decoder's text encoder, taught the direction words (ZeroScope, too, has a text encoder
    of its own). Its image captions never had them, so "left" and "up" were untrained rows whose states
    barely differ, and a UNet learns nothing from them in minutes. The copy is distilled to keep the
    image encoder's states (its UNet's spatial layers read those) while every state from the direction
    word on also carries a fixed code of that direction, as long as the states themselves."""
    s = SCHEDULE["text"]
    teacher = image_text.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    with torch.no_grad():
        sample = decoder_text.encode(teacher, tokenizer, ["a red circle moving left", "a blue box"])
    codes = direction_codes(args.generator("video_decoder_text/codes"), sample.norm(dim=-1).mean().item())
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
    run = Run.start("video_decoder_text", args, {"text_encoder": student}, opt, s["steps"], s["lr"], warmup=20)
    for step in run.steps():
        rng = args.rng("video_decoder_text/batches", step)
        media = world.sample_media("video", TEXT_BATCH, rng)
        captions = [m.caption(rng) for m in media]
        captions += [world.caption(m.obj, rng, "image") for m in media[:TEXT_BATCH // 4]] + [""] * (TEXT_BATCH // 8)
        dirs = [world.DIRECTIONS.index(m.direction) for m in media]
        dirs += [0] * (len(captions) - len(dirs))          # no direction word: no code is added
        ids = tokenizer(captions, max_length=tokenizer.model_max_length)
        with torch.no_grad():
            target = teacher(ids).last_hidden_state
            after = torch.arange(ids.shape[1]) >= direction_positions(tokenizer, ids)[:, None]   # (B, T)
            target = target + after[..., None] * codes[torch.tensor(dirs)][:, None]
        loss = F.mse_loss(student(ids).last_hidden_state, target)
        optimizer_step(opt, loss, params)
        run.log(loss.detach())
    return student.eval().requires_grad_(False), run


# ---------------------------------------------------------------- training

def train(args: RunArgs, out_dir=None, image_dir=None) -> dict:
    image_dir = Path(image_dir or image_decoder.OUT_DIR)
    if not (image_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{image_dir} holds no trained image decoder; the video decoder starts from "
                                f"its VAE, UNet and text encoder: train image_decoder first")
    out = Path(out_dir or OUT_DIR)
    s = SCHEDULE["unet"]
    vae = AutoencoderKL.from_pretrained(image_dir / "vae", dtype=torch.float32).requires_grad_(False)
    # The image decoder's text encoder, taught the direction words, then frozen (so NExT-GPT's video
    # output projection has a fixed target). The direction reaches the UNet through its temporal attention.
    image_text, tokenizer = decoder_text.load(image_dir)
    text_encoder, text_run = train_text_encoder(image_text, tokenizer, args)
    torch.manual_seed(args.seed_of("video_decoder_unet/init"))
    unet = unet_from_image(UNet2DCondition.from_pretrained(image_dir / "unet", dtype=torch.float32))

    rng = args.rng("video_decoder_unet/dataset")
    media = world.sample_media("video", args.count(VIDEOS, least=s["batch"]), rng)
    clips = latent_diffusion.to_pixels(world.render_batch(media, rng))            # (N, F, 3, H, W)
    mean, std = latent_diffusion.encode_dataset(vae, clips.flatten(0, 1))
    shape = (len(media), world.N_FRAMES) + mean.shape[1:]
    # (N, C, F, h, w), as the 3D UNet takes them
    mean, std = (x.reshape(shape).transpose(1, 2).contiguous() for x in (mean, std))

    ema_unet, text_encoder, unet_run = latent_diffusion.train_denoiser(
        "video_decoder_unet", unet, (text_encoder, tokenizer), (mean, std, vae.scaling_factor),
        lambda i, rng: media[i].caption(rng), args, scheduler_config=SCHEDULER, **s)
    latent_diffusion.save_pipeline(out, "TextToVideoSDPipeline", ema_unet, "UNet3DConditionModel", vae, text_encoder,
                                   tokenizer, SAMPLING, SCHEDULER, overwrite=True)
    return summary(out, text=text_run, unet=unet_run)


# ---------------------------------------------------------------- evaluation

def load_pipeline(folder=None):
    from minignext.diffusion import VideoPipeline

    folder = Path(folder or OUT_DIR)
    settings = json.loads((folder / "sampling.json").read_text())
    return VideoPipeline.from_pretrained(folder, dtype=torch.float32), settings


def prompts(n, seed, split="train", phrasing="test"):
    rng = np.random.default_rng(seed)
    objs = [world.sample_object(rng, split) for _ in range(n)]
    dirs = [world.DIRECTIONS[rng.integers(len(world.DIRECTIONS))] for _ in objs]
    return objs, dirs, [world.caption(o, rng, "video", d, phrasing) for o, d in zip(objs, dirs)]


def accuracy(pipeline, settings, objs, dirs, captions, seed, batch=32):
    """Fraction of clips the checker finds right: one object per frame, the asked colour and direction."""
    right = 0
    for i in range(0, len(objs), batch):
        clips = pipeline(prompt=captions[i:i + batch], seed=seed + i, progress=False, **settings)
        for clip, o, d in zip(clips, objs[i:i + batch], dirs[i:i + batch]):
            right += checkers.check_video(clip, want={"colour": o.colour, "direction": d}).ok
    return right / len(objs)


def evaluate(quick=False, seed=1234) -> list:
    from minignext.toy.eval import Metric

    pipeline, settings = load_pipeline()
    n, n_held = (16, 8) if quick else (48, 16)
    objs, dirs, caps = prompts(n, seed, "train", "test")
    h_objs, h_dirs, h_caps = prompts(n_held, seed + 1, "heldout", "test")
    note = f"DDIM {settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}; colour and direction"
    return [Metric("text -> video, held-out prompts", accuracy(pipeline, settings, objs, dirs, caps, seed), 0.85, n, note),
            Metric("text -> video, held-out colour-shape pairs", accuracy(pipeline, settings, h_objs, h_dirs, h_caps, seed),
                   None, n_held, "composition; no threshold")]
