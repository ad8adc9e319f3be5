"""UNet3DCondition against diffusers' UNet3DConditionModel on tiny random configs, fp32."""

import pytest
import torch
from torch.testing import assert_close

from minignext import weights
from minignext.unet3d import TemporalConvLayer, TransformerTemporalModel, UNet3DCondition, UNet3DConditionConfig
from conftest import perturb

diffusers = pytest.importorskip("diffusers")

BASE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))

CONFIGS = {
    "two_levels": {},
    "three_levels_all_cross": dict(
        block_out_channels=(8, 16, 16), layers_per_block=2, attention_head_dim=8, in_channels=3, out_channels=5,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        mid_block_scale_factor=1.5, norm_eps=1e-6),
}


def build_pair(tmp_path, overrides):
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet3DConditionModel(**{**BASE, **overrides}).eval())
    ref.save_pretrained(tmp_path)
    return ref, UNet3DCondition.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet3d_matches_diffusers(tmp_path, name):
    ref, mine = build_pair(tmp_path, CONFIGS[name])
    cfg = ref.config
    x = torch.randn(2, cfg.in_channels, 3, 8, 8)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, cfg.cross_attention_dim)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context).sample
        got = mine(x, t, context)
        # stage by stage: stem, temporal transformer, first down block
        folded = x.permute(0, 2, 1, 3, 4).reshape(6, cfg.in_channels, 8, 8)
        h_ref, h = ref.conv_in(folded), mine.conv_in(folded)
        assert_close(h, h_ref, atol=1e-6, rtol=1e-6)
        h_ref = ref.transformer_in(h_ref, num_frames=3).sample
        h = mine.transformer_in(h, 3)
        assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        temb_ref = ref.time_embedding(ref.time_proj(t)).repeat_interleave(3, 0)
        temb = mine.time_embedding(mine.time_proj(t)).repeat_interleave(3, 0)
        assert_close(temb, temb_ref, atol=1e-5, rtol=1e-5)
        ctx = context.repeat_interleave(3, 0)
        d_ref = ref.down_blocks[0](h_ref, temb_ref, encoder_hidden_states=ctx, num_frames=3)[0]
        assert_close(mine.down_blocks[0](h, temb, ctx, 3)[0], d_ref, atol=1e-5, rtol=1e-5)
    assert got.shape == want.shape == x.shape[:1] + (cfg.out_channels,) + x.shape[2:]
    assert want.abs().max() > 1e-2
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_odd_size_single_frame_and_scalar_timestep(tmp_path):
    ref, mine = build_pair(tmp_path, {})
    x = torch.randn(1, 4, 1, 6, 10)
    context = torch.randn(1, 5, 12)
    with torch.no_grad():
        assert_close(mine(x, 500, context), ref(x, 500, encoder_hidden_states=context).sample, atol=1e-4, rtol=1e-4)


def test_temporal_layers_only_mix_frames():
    """Frames are independent of each other once the temporal layers are the identity,
    and mixed when they are active."""
    torch.manual_seed(0)
    conv, attn = perturb(TemporalConvLayer(8, groups=2)).eval(), perturb(TransformerTemporalModel(2, 4, 8, 2)).eval()
    x = torch.randn(2 * 4, 8, 3, 3)                     # 2 clips of 4 frames
    x2 = x.clone()
    x2[1] += 1.0                                        # change frame 1 of clip 0
    with torch.no_grad():
        for layer in (conv, attn):
            diff = (layer(x2, 4) - layer(x, 4)).abs().amax(dim=(1, 2, 3))
            assert diff[4:].max() == 0                  # clip 1 untouched
            assert diff[[0, 2, 3]].min() > 0            # other frames of clip 0 changed
        conv.conv4[-1].weight.zero_(), conv.conv4[-1].bias.zero_()
        assert_close(conv(x, 4), x)


def test_config_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one int"):
        UNet3DConditionConfig.tiny(attention_head_dim=(4, 8))
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNet3DConditionConfig.from_hf({"num_attention_heads": 8})
    d = {"block_out_channels": [8, 16], "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
         "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "_class_name": "UNet3DConditionModel"}
    c = UNet3DConditionConfig.from_hf(d)
    assert c.block_out_channels == (8, 16) and c.time_embed_dim == 32 and d["block_out_channels"] == [8, 16]
    model = UNet3DCondition(UNet3DConditionConfig.tiny())
    with pytest.raises(ValueError, match="frames, height, width"):
        model(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 5, 32))
    for ctx in (None, torch.randn(2, 5, 32), torch.randn(1, 5, 16)):
        with pytest.raises(ValueError, match=r"encoder_hidden_states must be a \(1, tokens, 32\)"):
            model(torch.randn(1, 4, 2, 8, 8), 1, ctx)
    build_pair(tmp_path, {})
    sd = weights.load_safetensors(tmp_path, stem="diffusion_pytorch_model")
    sd.pop("transformer_in.proj_out.bias")
    with pytest.raises(weights.WeightsError, match="transformer_in.proj_out.bias"):
        weights.load_into(weights.build_on_meta(UNet3DCondition, UNet3DConditionConfig.from_hf(BASE)), sd)


def test_zeroscope_sized_config_has_the_checkpoint_keys_and_shapes():
    """ZeroScope v2's UNet config, built on meta by both: same 1.4 B-parameter state dict layout."""
    cfg = dict(_class_name="UNet3DConditionModel", attention_head_dim=64, block_out_channels=[320, 640, 1280, 1280],
               cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
               up_block_types=["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3, in_channels=4, out_channels=4,
               layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, sample_size=32, act_fn="silu")
    with torch.device("meta"):
        ref = diffusers.UNet3DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    mine = weights.build_on_meta(UNet3DCondition, UNet3DConditionConfig.from_hf(cfg))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(mine) == shapes(ref)


def test_temporal_positions_match_diffusers_sinusoidal_temporal_transformer():
    """temporal_positions is diffusers' TransformerTemporalModel(positional_embeddings="sinusoidal"), the
    AnimateDiff motion-module form; without it the frames are an unordered set."""
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel as Ref

    torch.manual_seed(0)
    ref = perturb(Ref(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2,
                      double_self_attention=True, positional_embeddings="sinusoidal", num_positional_embeddings=6)).eval()
    mine = TransformerTemporalModel(2, 4, 8, 2, positions=6).eval()
    weights.load_into(mine, ref.state_dict())
    x = torch.randn(2 * 5, 8, 3, 3)                  # 2 clips of 5 frames
    with torch.no_grad():
        assert_close(mine(x, 5), ref(x, num_frames=5).sample, atol=1e-5, rtol=1e-5)
        flipped = x.reshape(2, 5, 8, 3, 3).flip(1).reshape(10, 8, 3, 3)
        unordered = TransformerTemporalModel(2, 4, 8, 2).eval()
        weights.load_into(unordered, {k: v for k, v in ref.state_dict().items() if "pos_embed" not in k})
        back = lambda y: y.reshape(2, 5, 8, 3, 3).flip(1).reshape(10, 8, 3, 3)      # noqa: E731
        assert_close(back(unordered(flipped, 5)), unordered(x, 5), atol=1e-5, rtol=1e-5)
        assert (back(mine(flipped, 5)) - mine(x, 5)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="longer than the 6 positions"):
        mine(torch.randn(7, 8, 3, 3), 7)


def test_temporal_positions_reach_every_temporal_attention():
    cfg = UNet3DConditionConfig.from_hf({**BASE, "temporal_positions": 8})
    model = UNet3DCondition(cfg)
    temporal = [m for m in model.modules() if isinstance(m, TransformerTemporalModel)]
    assert len(temporal) == 5          # transformer_in, the down block (1), the mid block (1), the up block (2)
    for m in temporal:
        block = m.transformer_blocks[0]
        assert block.pos_embed.pe.shape == (1, 8, block.norm1.normalized_shape[0])
    x, context = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 12)
    assert model(x, 10, context).shape == x.shape
    assert UNet3DCondition(UNet3DConditionConfig.tiny(**BASE)).transformer_in.transformer_blocks[0].pos_embed is None


def test_temporal_cross_attention_matches_diffusers_temporal_transformer_with_text():
    """temporal_cross_attention is diffusers' TransformerTemporalModel with a cross_attention_dim (attn2
    reads the text), given one copy of the clip's text per pixel sequence."""
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel as Ref

    torch.manual_seed(0)
    ref = perturb(Ref(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2,
                      cross_attention_dim=6, double_self_attention=False, positional_embeddings="sinusoidal",
                      num_positional_embeddings=8)).eval()
    mine = TransformerTemporalModel(2, 4, 8, 2, positions=8, cross_attention_dim=6).eval()
    weights.load_into(mine, ref.state_dict())
    x, text = torch.randn(2 * 5, 8, 3, 3), torch.randn(2, 4, 6)          # 2 clips of 5 frames, 3x3 pixels
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=text.repeat_interleave(9, 0), num_frames=5).sample
        got = mine(x, 5, text.repeat_interleave(5, 0))                     # the UNet's per-frame context
        assert_close(got, want, atol=1e-5, rtol=1e-5)
        other = mine(x, 5, torch.randn(2, 4, 6).repeat_interleave(5, 0))
    assert (other - got).abs().max() > 1e-3


def test_unet3d_with_both_extensions_runs_and_reads_the_text_in_time():
    model = perturb(UNet3DCondition(UNet3DConditionConfig.tiny(**BASE, temporal_positions=8,
                                                          temporal_cross_attention=True))).eval()
    assert model.down_blocks[0].temp_attentions[0].transformer_blocks[0].attn2.to_k.in_features == 12
    assert not model.transformer_in.cross
    x, context = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 12)
    with torch.no_grad():
        assert model(x, 10, context).shape == x.shape
