"""AudioPipeline against diffusers' AudioLDMPipeline built from the same tiny random parts, and the
AudioLDM-style class-conditioned UNet (CLAP vector as class_labels, no text context) alone."""

import pytest
import torch
from torch.testing import assert_close

from minignext.diffusion import AudioPipeline
from minignext.schedulers import DDIMScheduler
from minignext.unet import UNet2DCondition
from conftest import perturb

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CLAP_DIM = 24
AUDIOLDM_SCHEDULER = dict(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
# AudioLDM's UNet shape in miniature: per-block cross_attention_dim equal to the block widths (attn2
# attends to the pixels since there is no text context), the CLAP vector projected and concatenated
# to the time embedding.
AUDIOLDM_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                     norm_num_groups=8, attention_head_dim=4, cross_attention_dim=(16, 32),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     class_embed_type="simple_projection", projection_class_embeddings_input_dim=CLAP_DIM,
                     class_embeddings_concat=True)


@pytest.fixture(scope="module")
def audioldm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_audioldm")
    torch.manual_seed(0)
    unet = perturb(diffusers.UNet2DConditionModel(**AUDIOLDM_UNET)).eval()
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=(8, 16), in_channels=1, out_channels=1, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.9227)).eval()
    vocoder = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
        model_in_dim=16, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3], [1, 3]],
        normalize_before=False))
    with torch.no_grad():
        for p in vocoder.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    vocoder.eval()
    # the pipeline wants a CLAP text encoder object even when it is given the embeddings
    text_encoder = transformers.ClapTextModelWithProjection(transformers.ClapTextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=CLAP_DIM, max_position_embeddings=40)).eval()
    pipe = diffusers.AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                      scheduler=diffusers.DDIMScheduler(**AUDIOLDM_SCHEDULER), vocoder=vocoder)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "audioldm")
    return folder / "audioldm", pipe


@pytest.fixture(scope="module")
def mine(audioldm):
    return AudioPipeline.from_pretrained(audioldm[0])


def test_audioldm_unet_with_class_labels_matches_diffusers(audioldm, mine):
    ref = audioldm[1].unet
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 901])
    clap = torch.nn.functional.normalize(torch.randn(2, CLAP_DIM), dim=-1)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=None, class_labels=clap).sample
        got = mine.unet(x, t, encoder_hidden_states=None, class_labels=clap)
        # the conditioning path alone: [time embedding ; projected CLAP vector]
        temb = torch.cat([ref.time_embedding(ref.time_proj(t)), ref.class_embedding(clap)], dim=-1)
        assert_close(mine.unet.time_embed(x, t, clap), temb, atol=1e-5, rtol=1e-5)
    assert isinstance(mine.unet, UNet2DCondition)
    assert want.abs().max() > 1e-2
    assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seconds", [0.004, 0.0045])       # 0.0045 s rounds up to 18 mel frames, then crops
def test_ten_step_guided_run_matches_diffusers(audioldm, mine, seconds):
    ref = audioldm[1]
    assert isinstance(mine.scheduler, DDIMScheduler)
    _, frames, samples = mine.mel_frames(seconds)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, frames // 2, 8, generator=g)
    cond = torch.nn.functional.normalize(torch.randn(2, CLAP_DIM, generator=g), dim=-1)
    uncond = torch.nn.functional.normalize(torch.randn(2, CLAP_DIM, generator=g), dim=-1)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=10, guidance_scale=2.5,
               latents=latents, audio_length_in_s=seconds, output_type="np").audios
    got = mine(cond, uncond, guidance_scale=2.5, num_inference_steps=10, latents=latents,
               audio_length_in_s=seconds, output_type="np", progress=False)
    assert got.shape == want.shape == (2, samples)
    assert abs(want).max() > 1e-2
    assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-3, rtol=0)
    print(f"audio {seconds}s: max abs diff {abs(got - want).max():.2e}")


def test_unconditional_embedding_and_seed(audioldm, mine):
    ref = audioldm[1]
    cond = torch.nn.functional.normalize(torch.randn(1, CLAP_DIM), dim=-1)
    uncond = torch.nn.functional.normalize(torch.randn(CLAP_DIM), dim=-1)
    pipe = AudioPipeline(mine.unet, mine.vae, mine.scheduler, mine.vocoder, unconditional_embeds=uncond)
    a = pipe(cond, seed=3, progress=False, audio_length_in_s=0.004, output_type="pt")
    b = mine(cond, uncond[None], seed=3, progress=False, audio_length_in_s=0.004, output_type="pt")
    assert_close(a, b)
    assert not torch.equal(a, mine(cond, uncond[None], seed=4, progress=False, audio_length_in_s=0.004,
                                   output_type="pt"))
    # guidance off: the conditional branch alone, no unconditional embedding needed
    latents = torch.randn(1, 4, 8, 8)
    want = ref(prompt_embeds=cond, guidance_scale=1.0, num_inference_steps=3, latents=latents,
               audio_length_in_s=0.004).audios
    got = mine(cond, guidance_scale=1.0, num_inference_steps=3, latents=latents, audio_length_in_s=0.004,
               progress=False)
    assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-4, rtol=0)


def test_bad_input(mine):
    cond = torch.randn(1, CLAP_DIM)
    with pytest.raises(ValueError, match="no CLAP text encoder"):
        mine("a dog barking")
    with pytest.raises(ValueError, match=rf"\(batch, {CLAP_DIM}\)"):
        mine(torch.randn(1, 77, CLAP_DIM), progress=False)
    with pytest.raises(ValueError, match=rf"\(batch, {CLAP_DIM}\)"):
        mine(torch.randn(2, CLAP_DIM + 1), progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        mine(cond, guidance_scale=2.5, progress=False)
    with pytest.raises(ValueError, match=f"one {CLAP_DIM}-d CLAP vector"):
        AudioPipeline(mine.unet, mine.vae, mine.scheduler, mine.vocoder, torch.randn(CLAP_DIM + 2))(cond, progress=False)
    with pytest.raises(ValueError, match="shape of prompt_embeds"):
        mine(cond, torch.randn(2, CLAP_DIM), progress=False)
    for seconds in (0, -1.0, 0.0001, float("nan"), "5"):
        with pytest.raises(ValueError, match="audio_length_in_s"):
            mine(cond, cond, audio_length_in_s=seconds, progress=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        mine(cond, cond, latents=torch.randn(1, 4, 8, 9), audio_length_in_s=0.004, progress=False)
    with pytest.raises(ValueError, match="output_type"):
        mine(cond, cond, output_type="pil")


def test_save_writes_wav_and_never_overwrites(mine, tmp_path):
    from minignext.media import read_wav

    waves = mine(torch.randn(2, CLAP_DIM), guidance_scale=1.0, num_inference_steps=2, seed=0,
                 audio_length_in_s=0.004, progress=False)
    paths = mine.save(waves, tmp_path)
    back, sr = read_wav(paths[1])
    assert sr == 16000 and back.shape == (1, waves.shape[1])
    assert_close(back[0], torch.from_numpy(waves[1]).clamp(-1, 1), atol=1 / 32768 + 1e-6, rtol=0)
    with pytest.raises(FileExistsError):
        mine.save(waves, tmp_path)
    assert mine.save(waves, tmp_path, overwrite=True) == paths


def test_audioldm_sized_parts_have_the_checkpoint_keys_and_shapes():
    """AudioLDM-sized UNet, VAE and vocoder configs, built on meta by both sides: same state dict layout."""
    from minignext import weights
    from minignext.unet import UNet2DConditionConfig
    from minignext.vae import AutoencoderKL, AutoencoderKLConfig
    from minignext.vocoder import HifiGan, HifiGanConfig

    unet = dict(block_out_channels=[128, 256, 384, 640], cross_attention_dim=[128, 256, 384, 640],
                attention_head_dim=8, in_channels=8, out_channels=8, layers_per_block=2, sample_size=128,
                class_embed_type="simple_projection", class_embeddings_concat=True,
                projection_class_embeddings_input_dim=512,
                down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"])
    vae = dict(block_out_channels=[128, 256, 512], in_channels=1, out_channels=1, latent_channels=8,
               layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=0.9227)
    vocoder = dict(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024,
                   upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
                   resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3, normalize_before=False)
    with torch.device("meta"):
        refs = [diffusers.UNet2DConditionModel(**unet), diffusers.AutoencoderKL(**vae),
                transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(**vocoder))]
    mine = [weights.build_on_meta(UNet2DCondition, UNet2DConditionConfig.from_hf(unet)),
            weights.build_on_meta(AutoencoderKL, AutoencoderKLConfig.from_hf(vae)),
            weights.build_on_meta(HifiGan, HifiGanConfig.from_hf(vocoder))]
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    for ref, ours in zip(refs, mine):
        assert shapes(ours) == shapes(ref), type(ours).__name__
    assert mine[2].config.hop_length == 160          # 10 ms of 16 kHz audio per mel frame
