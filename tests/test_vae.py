"""AutoencoderKL against diffusers' AutoencoderKL on tiny random configs, fp32, <= 1e-4."""

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL
from torch.testing import assert_close

from minignext import weights
from minignext.vae import AutoencoderKL, AutoencoderKLConfig
from conftest import perturb

CONFIGS = {
    "sd_like": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4),
    "three_levels_two_layers": dict(block_out_channels=(8, 16, 16), layers_per_block=2,
                                    down_block_types=("DownEncoderBlock2D",) * 3,
                                    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
                                    latent_channels=8, scaling_factor=0.5),
    "mel_like_no_attention": dict(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  mid_block_add_attention=False),
}



def build_pair(tmp_path, name):
    torch.manual_seed(0)
    ref = RefAutoencoderKL(**CONFIGS[name]).eval()
    perturb(ref)
    ref.save_pretrained(tmp_path)
    return ref, AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers(tmp_path, name):
    ref, mine = build_pair(tmp_path, name)
    x = torch.randn(2, ref.config.in_channels, 24, 32)
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, mine.encode(x)
        assert_close(got.mean, want.mean, atol=1e-4, rtol=1e-4)
        assert_close(got.logvar, want.logvar, atol=1e-4, rtol=1e-4)
        assert_close(got.sample(torch.Generator().manual_seed(3)),
                     want.sample(torch.Generator().manual_seed(3)), atol=1e-4, rtol=1e-4)
        assert_close(got.kl(), want.kl(), atol=1e-3, rtol=1e-4)
        z = torch.randn_like(want.mean)
        assert_close(mine.decode(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)
        assert_close(mine.encoder.conv_in(x), ref.encoder.conv_in(x), atol=1e-6, rtol=1e-6)
    assert mine.scaling_factor == ref.config.scaling_factor
    assert mine.scale_factor == 2 ** (len(ref.config.block_out_channels) - 1)


def test_bad_config_and_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderKLConfig.from_hf({"down_block_types": ["DownBlock2D"], "block_out_channels": [8]})
    ref, mine = build_pair(tmp_path, "sd_like")
    sd = weights.load_safetensors(tmp_path, stem="diffusion_pytorch_model")
    sd["quant_conv.weight"] = sd["quant_conv.weight"][:4]
    with pytest.raises(weights.WeightsError, match="quant_conv.weight"):
        weights.load_into(weights.build_on_meta(AutoencoderKL, mine.config), sd)
