"""ImagePipeline against diffusers' StableDiffusionPipeline built from the same tiny random parts:
10 steps at guidance 7.5 from the same initial latents, final images <= 1e-3."""

import json

import pytest
import torch
from torch.testing import assert_close

from fixtures_clip import write_tiny_clip_tokenizer
from minignext import weights
from minignext.diffusion import ImagePipeline, classifier_free_guidance, denoise
from minignext.schedulers import DDIMScheduler
from conftest import perturb

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, set_alpha_to_one=False, clip_sample=False)



@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    tok_dir = write_tiny_clip_tokenizer(folder / "tok_src")
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])), 0.0).eval()
    unet = perturb(diffusers.UNet2DConditionModel(
        sample_size=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=32,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))).eval()
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)).eval()
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd", pipe


@pytest.fixture(scope="module")
def mine(sd_folder):
    return ImagePipeline.from_pretrained(sd_folder[0])


def test_loads_parts_and_scheduler(sd_folder, mine):
    assert isinstance(mine.scheduler, DDIMScheduler)
    assert mine.vae.scale_factor == 8 and mine.tokenizer is not None and mine.text_encoder is not None


def test_prompt_matches_diffusers(sd_folder, mine):
    ref = sd_folder[1]
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    prompts = ["a red square", "a blue circle"]
    want = ref(prompts, num_inference_steps=10, guidance_scale=7.5, latents=latents, output_type="np").images
    got = mine(prompts, num_inference_steps=10, guidance_scale=7.5, latents=latents, output_type="np",
               progress=False)
    assert got.shape == want.shape == (2, 32, 32, 3)
    assert ((want > 0.01) & (want < 0.99)).mean() > 0.5, "images saturated: the comparison would be weak"
    assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-3, rtol=0)
    # the text conditioning alone, stage by stage
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert_close(mine.encode_text(prompts), ref.text_encoder(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_prompt_embeds_and_negative_match_diffusers(sd_folder, mine):
    ref = sd_folder[1]
    g = torch.Generator().manual_seed(2)
    embeds, latents = torch.randn(1, 77, 32, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    want = ref(prompt_embeds=embeds, num_inference_steps=10, guidance_scale=7.5, latents=latents,
               output_type="np").images
    got = mine(prompt_embeds=embeds, num_inference_steps=10, guidance_scale=7.5, latents=latents,
               output_type="np", progress=False)
    assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-3, rtol=0)
    neg = torch.randn(1, 77, 32, generator=g)
    want = ref(prompt_embeds=embeds, negative_prompt_embeds=neg, num_inference_steps=3, latents=latents,
               output_type="pt").images
    got = mine(prompt_embeds=embeds, negative_prompt_embeds=neg, num_inference_steps=3, latents=latents,
               output_type="pt", progress=False)
    assert_close(got, want, atol=1e-3, rtol=0)


def test_seed_is_reproducible_and_pil_output(mine):
    a = mine("a red square", num_inference_steps=2, seed=5, height=32, width=48, output_type="pt", progress=False)
    b = mine("a red square", num_inference_steps=2, seed=5, height=32, width=48, output_type="pt", progress=False)
    assert a.shape == (1, 3, 32, 48) and torch.equal(a, b)
    images = mine("a red square", num_inference_steps=1, seed=5, progress=False)
    assert images[0].size == (32, 32) and images[0].mode == "RGB"


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_embeds=torch.randn(1, 77, 16)), "prompt_embeds must be"),
    (dict(prompt_embeds=torch.randn(77, 32)), "prompt_embeds must be"),
    (dict(prompt="x", height=60), "divisible by 8"),
    (dict(prompt="x", latents=torch.full((1, 4, 4, 4), float("nan"))), "NaN"),
    (dict(prompt="x", latents=torch.randn(1, 4, 4, 4), height=128), "must be"),
    (dict(prompt="x", prompt_embeds=torch.randn(1, 77, 32)), "exactly one"),
    (dict(prompt_embeds=torch.randn(1, 77, 32), negative_prompt_embeds=torch.randn(1, 10, 32)), "negative"),
    (dict(prompt=["x", "y"], negative_prompt=["z"]), "negative_prompt"),
    (dict(prompt="x", output_type="jpg"), "output_type"),
])
def test_bad_input_is_a_clear_error(mine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mine(num_inference_steps=1, progress=False, **kwargs)


def test_prompt_embeds_without_text_encoder(mine):
    bare = ImagePipeline(mine.unet, mine.vae, mine.scheduler)
    e = torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match="no text encoder"):
        bare(prompt_embeds=e, num_inference_steps=1, progress=False)
    out = bare(prompt_embeds=e, guidance_scale=1.0, num_inference_steps=1, output_type="np", progress=False)
    assert out.shape == (1, 32, 32, 3)


def test_denoise_guidance_arithmetic():
    """With a fake UNet that returns its context, the guided output is u + w (c - u) exactly."""
    class Recorder(DDIMScheduler):
        def step(self, model_output, timestep, sample, generator=None):
            self.seen = model_output
            return super().step(model_output, timestep, sample)

    sched = Recorder.from_config(SD15_SCHEDULER)
    cond, uncond = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 1.0)
    denoise(lambda x, t, c: c.expand_as(x), torch.zeros(1, 4, 2, 2), sched, cond, uncond, guidance_scale=7.5,
            num_inference_steps=1, progress=False)
    assert torch.allclose(sched.seen, torch.full((1, 4, 2, 2), 1.0 + 7.5 * 2.0))
    assert torch.equal(classifier_free_guidance(uncond, cond, 1.0), cond)


SD15_FOLDER = weights.WEIGHTS_DIR / "hub" / "stable-diffusion-v1-5--stable-diffusion-v1-5"


@pytest.mark.skipif(not (SD15_FOLDER / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
                    reason=f"no Stable Diffusion 1.5 at {SD15_FOLDER} (minignext download nextgpt-7b)")
def test_real_sd15_matches_diffusers():
    ref = diffusers.StableDiffusionPipeline.from_pretrained(SD15_FOLDER, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    mine = ImagePipeline.from_pretrained(SD15_FOLDER, scheduler="DDIMScheduler")
    assert mine.unet.config.cross_attention_dim == 768 and mine.vae.scaling_factor == 0.18215
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, guidance_scale=7.5, latents=latents, output_type="np")
    want = ref("a red apple on a table", **kwargs).images
    got = mine("a red apple on a table", progress=False, **kwargs)
    assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-3, rtol=0)
