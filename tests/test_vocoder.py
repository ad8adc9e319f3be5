"""HiFi-GAN vocoder parity with transformers' SpeechT5HifiGan on tiny random configs."""

import pytest
import torch
from torch.testing import assert_close

from minignext import weights
from minignext.vocoder import HifiGan, HifiGanConfig

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "two_ups": dict(model_in_dim=8, upsample_initial_channel=16, upsample_rates=[4, 2],
                    upsample_kernel_sizes=[8, 4], resblock_kernel_sizes=[3, 5],
                    resblock_dilation_sizes=[[1, 3], [1, 2]], normalize_before=False),
    "normalized": dict(model_in_dim=12, upsample_initial_channel=32, upsample_rates=[5, 4, 2],
                       upsample_kernel_sizes=[16, 8, 4], resblock_kernel_sizes=[3, 7, 11],
                       resblock_dilation_sizes=[[1, 3, 5]] * 3, leaky_relu_slope=0.2, normalize_before=True),
}


def reference(tmp_path, fields, seed=0):
    torch.manual_seed(seed)
    ref = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(**fields)).eval()
    with torch.no_grad():       # non-trivial statistics so normalize_before is really exercised
        ref.mean.copy_(torch.randn_like(ref.mean))
        ref.scale.copy_(torch.rand_like(ref.scale) + 0.5)
        for p in ref.parameters():   # the default init (std 0.01) makes near-zero output; use fan-in scaling
            fan_in = p[0].numel() if p.dim() > 1 else 10
            p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    ref.save_pretrained(tmp_path)
    return ref


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_speecht5_hifigan(tmp_path, name):
    ref = reference(tmp_path, CONFIGS[name])
    ours = HifiGan.from_pretrained(tmp_path)
    assert ours.config.normalize_before == CONFIGS[name]["normalize_before"]
    mel = torch.randn(2, 9, CONFIGS[name]["model_in_dim"])
    with torch.no_grad():
        want_batched, got_batched = ref(mel), ours(mel)
        want_single, got_single = ref(mel[1]), ours(mel[1])
    assert got_batched.shape == want_batched.shape and got_single.shape == want_single.shape
    assert want_batched.abs().max() > 1e-3          # the comparison is not between two zeros
    assert_close(got_batched, want_batched, atol=1e-5, rtol=0)
    assert_close(got_single, want_single, atol=1e-5, rtol=0)


def test_mrf_block_matches_reference():
    from transformers.models.speecht5.modeling_speecht5 import HifiGanResidualBlock
    from minignext.vocoder import ResBlock

    torch.manual_seed(1)
    ref = HifiGanResidualBlock(6, kernel_size=5, dilation=(1, 3, 5), leaky_relu_slope=0.1)
    ours = ResBlock(6, kernel_size=5, dilations=(1, 3, 5), slope=0.1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 20)
    with torch.no_grad():
        assert_close(ours(x), ref(x), atol=1e-6, rtol=0)


def test_config_keeps_known_fields_and_is_not_mutated():
    d = {"model_in_dim": 64, "upsample_rates": [5, 4], "upsample_kernel_sizes": [10, 8],
         "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]],
         "model_type": "speecht5_hifigan", "foo": 1}
    copy = {k: v for k, v in d.items()}
    c = HifiGanConfig.from_hf(d)
    assert (c.model_in_dim, c.hop_length, c.upsample_rates) == (64, 20, (5, 4))
    assert d == copy


def test_bad_input_and_bad_checkpoint(tmp_path):
    model = HifiGan(HifiGanConfig.tiny())
    with pytest.raises(ValueError, match="mel spectrogram"):
        model(torch.randn(2, 9, 5))
    with pytest.raises(ValueError, match="same length"):
        HifiGanConfig.tiny(upsample_rates=(4, 4), upsample_kernel_sizes=(8,))
    reference(tmp_path, CONFIGS["two_ups"])
    sd = weights.load_safetensors(tmp_path)
    sd.pop("conv_post.bias")
    with pytest.raises(weights.WeightsError, match="conv_post.bias"):
        weights.load_into(weights.build_on_meta(HifiGan, HifiGanConfig.from_hf(weights.read_config(tmp_path))), sd)
