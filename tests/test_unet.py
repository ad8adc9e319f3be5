"""UNet2DCondition against diffusers' UNet2DConditionModel on tiny random configs, fp32."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.testing import assert_close

from minignext import weights
from minignext.unet import UNet2DCondition, UNet2DConditionConfig, timestep_embedding
from conftest import perturb

BASE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

CONFIGS = {
    "sd_like": {},
    "three_levels_head_list_linear": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=(2, 4, 8),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=True, transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1),
    "audioldm_like_class_concat": dict(
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=12,
        class_embeddings_concat=True, cross_attention_dim=(32, 64), in_channels=8, out_channels=8),
    "class_add_only_cross": dict(
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=12,
        only_cross_attention=True, upcast_attention=True, layers_per_block=(1, 2)),
}



def build_pair(tmp_path, overrides):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**{**BASE, **overrides}).eval()
    perturb(ref)
    ref.save_pretrained(tmp_path)
    return ref, UNet2DCondition.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(tmp_path, name):
    ref, mine = build_pair(tmp_path, CONFIGS[name])
    cfg = ref.config
    x = torch.randn(2, cfg.in_channels, 16, 16)
    t = torch.tensor([10, 700])
    kwargs = {"encoder_hidden_states": None}     # AudioLDM: no context, attn2 attends to the pixels
    if name != "audioldm_like_class_concat":
        kwargs["encoder_hidden_states"] = torch.randn(2, 7, cfg.cross_attention_dim)
    if cfg.class_embed_type:
        kwargs["class_labels"] = torch.randn(2, cfg.projection_class_embeddings_input_dim)
    with torch.no_grad():
        want = ref(x, t, **kwargs).sample
        got = mine(x, t, **kwargs)
        # stage by stage: the time embedding, then the first down block
        emb = mine.time_embed(x, t, kwargs.get("class_labels"))
        ref_emb = ref.time_embedding(ref.get_time_embed(x, t))
        ref_h = ref.conv_in(x)
    if not cfg.class_embed_type:
        assert_close(emb, ref_emb, atol=1e-5, rtol=1e-5)
        assert_close(mine.conv_in(x), ref_h, atol=1e-6, rtol=1e-6)
    assert got.shape == want.shape
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_scalar_timestep_and_odd_size(tmp_path):
    ref, mine = build_pair(tmp_path, {})
    x, ctx = torch.randn(1, 4, 10, 14), torch.randn(1, 5, 24)
    with torch.no_grad():
        assert_close(mine(x, 37, ctx), ref(x, 37, ctx).sample, atol=1e-4, rtol=1e-4)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0, 999.0])
    e = timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1)
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(4)])
    assert_close(e, torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], dim=1))


def test_config_from_hf_ignores_unknown_and_rejects_unsupported():
    cfg = UNet2DConditionConfig.from_hf({**BASE, "_class_name": "UNet2DConditionModel", "foo": 1})
    assert cfg.block_out_channels == (32, 64) and cfg.time_embed_dim == 128
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNet2DConditionConfig.from_hf({**BASE, "addition_embed_type": "text"})


def test_missing_class_labels_and_bad_checkpoint(tmp_path):
    ref, mine = build_pair(tmp_path, CONFIGS["class_add_only_cross"])
    with pytest.raises(ValueError, match="class_labels"):
        mine(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 3, 24))
    sd = weights.load_safetensors(tmp_path, stem="diffusion_pytorch_model")
    sd.pop("conv_in.weight")
    with pytest.raises(weights.WeightsError, match="conv_in.weight"):
        weights.load_into(weights.build_on_meta(UNet2DCondition, mine.config), sd)
