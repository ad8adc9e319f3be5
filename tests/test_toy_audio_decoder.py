"""The toy audio decoder: its mel, a tiny training run end to end, and the shipped weights."""

import json

import numpy as np
import pytest
import torch

from minignext.diffusion import AudioPipeline
from minignext.media import hz_to_mel
from minignext.toy import checkers, world
from minignext.toy import train_audio_decoder as audio
from minignext.toy.trainer import RunArgs
from minignext.vocoder import GriffinLim

SHIPPED = audio.OUT_DIR / "model_index.json"


def test_log_mel_frames_and_band_of_a_sine():
    t = torch.arange(world.SAMPLE_RATE) / world.SAMPLE_RATE
    freqs = torch.tensor([330.0, 700.0, 1200.0])
    mel = audio.log_mel(torch.sin(2 * torch.pi * freqs[:, None] * t))
    assert mel.shape == (3, audio.FRAMES, audio.N_MELS)
    # band b is centred on the (b + 1)-th of N_MELS + 2 mel-spaced edges from 0 to F_MAX
    centres = torch.linspace(0, hz_to_mel(audio.F_MAX).item(), audio.N_MELS + 2)[1:-1]
    want = (centres[None] - hz_to_mel(freqs.double())[:, None].float()).abs().argmin(1)
    assert torch.equal(mel[:, 10:-10].mean(1).argmax(1), want)
    assert mel.min() >= np.log(audio.MEL_FLOOR) - 1e-6


def test_train_tiny_saves_a_pipeline_that_loads(tmp_path):
    summary = audio.train(RunArgs(scale=0.001, resume=False, progress=False, runs_dir=tmp_path / "runs"),
                          out_dir=tmp_path / "out")
    folder = tmp_path / "out"
    assert summary["megabytes"] > 0
    assert json.loads((folder / "model_index.json").read_text())["vocoder"] == ["minignext", "GriffinLim"]
    pipeline, text_encoder, tokenizer, settings = audio.load_pipeline(folder)
    assert isinstance(pipeline, AudioPipeline) and pipeline.sampling_rate == world.SAMPLE_RATE
    embeds = audio.text_embeds(text_encoder, tokenizer, ["a rising low tone", ""])
    assert embeds.shape == (2, audio.EMBED_DIM)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(torch.as_tensor(pipeline.unconditional_embeds), embeds[1])
    wave = pipeline(prompt_embeds=embeds[:1], seed=0, guidance_scale=2.0, num_inference_steps=2, progress=False)
    assert wave.shape == (1, world.SAMPLE_RATE) and np.isfinite(wave).all()


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.is_file():
        pytest.skip("the toy audio decoder's weights are not in weights/toy/audio_decoder")
    return audio.load_pipeline()


def test_griffin_lim_turns_true_mels_back_into_the_right_tones():
    vocoder = GriffinLim(audio.vocoder_config())
    waves, objs = audio.render_sounds(8, np.random.default_rng(7))
    out = vocoder(audio.log_mel(waves))
    assert out.shape == waves.shape
    assert sum(checkers.check_audio(w.numpy(), want=o).ok for w, o in zip(out, objs)) >= 7


def test_shipped_decoder_makes_the_asked_tones(shipped):
    objs, captions = audio.prompts(8, seed=99, split="train", phrasing="test")
    assert audio.accuracy(shipped, objs, captions, seed=0) >= 6 / 8
