"""VideoPipeline against diffusers' TextToVideoSDPipeline built from the same tiny random parts:
10 steps with guidance from the same initial latents, frames <= 1e-3."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from minignext.diffusion import VideoPipeline
from minignext.schedulers import DDIMScheduler
from minignext.unet3d import UNet3DCondition
from conftest import perturb

diffusers = pytest.importorskip("diffusers")

TEXT_DIM = 12
ZEROSCOPE_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_t2v")
    torch.manual_seed(0)
    unet = perturb(diffusers.UNet3DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=TEXT_DIM, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))).eval()
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)).eval()
    pipe = diffusers.TextToVideoSDPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                           scheduler=diffusers.DDIMScheduler(**ZEROSCOPE_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "t2v")
    return folder / "t2v", pipe


@pytest.fixture(scope="module")
def mine(t2v):
    return VideoPipeline.from_pretrained(t2v[0])


def test_loads_parts(mine):
    assert isinstance(mine.unet, UNet3DCondition) and isinstance(mine.scheduler, DDIMScheduler)
    assert mine.vae.scale_factor == 8 and mine.text_encoder is None and mine.tokenizer is None


def test_ten_step_guided_run_matches_diffusers(t2v, mine):
    ref = t2v[1]
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 3, 4, 6, generator=g)                 # 2 clips, 3 frames, 32x48 pixels
    cond, uncond = torch.randn(2, 7, TEXT_DIM, generator=g), torch.randn(2, 7, TEXT_DIM, generator=g)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=3, height=32, width=48,
               num_inference_steps=10, guidance_scale=9.0, latents=latents, output_type="np").frames
    got = mine(cond, uncond, num_frames=3, height=32, width=48, num_inference_steps=10, guidance_scale=9.0,
               latents=latents, output_type="np", progress=False)
    assert got.shape == want.shape == (2, 3, 32, 48, 3)
    assert want.std() > 1e-2                                            # not a flat image
    assert_close(torch.from_numpy(got), torch.from_numpy(np.asarray(want)), atol=1e-3, rtol=0)
    print(f"video: max abs diff {abs(got - want).max():.2e}")
    pt = mine(cond, uncond, num_frames=3, num_inference_steps=10, latents=latents, output_type="pt", progress=False)
    assert_close(pt.permute(0, 1, 3, 4, 2), torch.from_numpy(got))


def test_seed_default_size_and_no_guidance(t2v, mine):
    ref = t2v[1]
    cond = torch.randn(1, 5, TEXT_DIM)
    a = mine(cond, num_frames=2, guidance_scale=1.0, num_inference_steps=2, seed=7, progress=False)
    b = mine(cond, num_frames=2, guidance_scale=1.0, num_inference_steps=2, seed=7, progress=False)
    assert a.shape == (1, 2, 32, 32, 3)                                 # unet sample_size 4 * VAE factor 8
    np.testing.assert_array_equal(a, b)
    latents = torch.randn(1, 4, 2, 4, 4)
    want = ref(prompt_embeds=cond, num_frames=2, guidance_scale=1.0, num_inference_steps=3, latents=latents).frames
    got = mine(cond, num_frames=2, guidance_scale=1.0, num_inference_steps=3, latents=latents, progress=False)
    assert_close(torch.from_numpy(got), torch.from_numpy(np.asarray(want)), atol=1e-3, rtol=0)


def test_bad_input(mine):
    cond = torch.randn(1, 5, TEXT_DIM)
    with pytest.raises(ValueError, match=rf"\(batch, tokens, {TEXT_DIM}\)"):
        mine(torch.randn(1, TEXT_DIM), cond, progress=False)
    with pytest.raises(ValueError, match=rf"\(batch, tokens, {TEXT_DIM}\)"):
        mine(torch.randn(1, 5, TEXT_DIM + 1), cond, progress=False)
    with pytest.raises(ValueError, match="text encoder"):
        mine(cond, guidance_scale=9.0, progress=False)                  # no negative, no text encoder
    for frames in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_frames must be a positive integer"):
            mine(cond, cond, num_frames=frames, progress=False)
    with pytest.raises(ValueError, match="latents hold 3 frames but num_frames=4"):
        mine(cond, cond, num_frames=4, latents=torch.randn(1, 4, 3, 4, 4), progress=False)
    with pytest.raises(ValueError, match="divisible by 8"):
        mine(cond, cond, num_frames=2, height=36, progress=False)
    with pytest.raises(ValueError, match="output_type"):
        mine(cond, cond, output_type="pil")


def test_save_writes_gif_and_never_overwrites(mine, tmp_path):
    from minignext.media import load_video

    video = mine(torch.randn(1, 5, TEXT_DIM), num_frames=3, guidance_scale=1.0, num_inference_steps=2, seed=0,
                 progress=False)
    (path,) = mine.save(video, tmp_path, fps=4)
    back = load_video(path)
    assert back.shape[1:] == (32, 32, 3) and 1 <= back.shape[0] <= 3
    with pytest.raises(FileExistsError):
        mine.save(video, tmp_path)
    assert mine.save(video, tmp_path, overwrite=True) == [path]
