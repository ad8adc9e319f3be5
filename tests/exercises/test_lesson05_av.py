import pytest
import torch
import torch.nn.functional as F

from conftest import check

LESSON = "lesson05_av"
CHAINED = "the branches were chained; each must read the same input, and their outputs are averaged"

transformers = pytest.importorskip("transformers")
from transformers.models.speecht5.modeling_speecht5 import HifiGanResidualBlock  # noqa: E402


def random_block(channels, kernel, dilations, slope, seed):
    torch.manual_seed(seed)
    block = HifiGanResidualBlock(channels, kernel, dilations, slope).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block


@pytest.mark.parametrize("kernel, dilations, slope", [(3, (1, 3, 5), 0.1), (7, (1, 2), 0.2)])
def test_hifigan_resblock_matches_transformers(ex, kernel, dilations, slope):
    ref = random_block(4, kernel, dilations, slope, seed=kernel)
    convs1 = [(c.weight.detach(), c.bias.detach()) for c in ref.convs1]
    convs2 = [(c.weight.detach(), c.bias.detach()) for c in ref.convs2]
    x = torch.randn(2, 4, 19)
    got = ex.hifigan_resblock(x, convs1, convs2, dilations, slope)
    with torch.no_grad():
        want = ref(x)
    assert got.shape == x.shape, (f"the output has shape {tuple(got.shape)}, the input {tuple(x.shape)}: a "
                                  f"kernel K with dilation d needs padding d*(K-1)//2 to keep the length")
    check(got, want, f"hifigan_resblock (kernel {kernel}, dilations {dilations}) vs transformers' "
          f"HifiGanResidualBlock", atol=1e-5, rtol=1e-5)


def test_mrf_reproduces_the_speecht5_vocoder(ex):
    """Rebuild SpeechT5HifiGan's forward around ex.mrf; it must give the model's waveform."""
    cfg = transformers.SpeechT5HifiGanConfig(model_in_dim=6, upsample_initial_channel=16, upsample_rates=[2, 2],
                                             upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 5],
                                             resblock_dilation_sizes=[[1, 3], [1, 2]], normalize_before=False)
    torch.manual_seed(0)
    voc = transformers.SpeechT5HifiGan(cfg).eval()
    with torch.no_grad():
        for p in voc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        mel = torch.randn(1, 7, 6)
        x = voc.conv_pre(mel.transpose(1, 2))
        for i, up in enumerate(voc.upsampler):
            x = up(F.leaky_relu(x, cfg.leaky_relu_slope))
            branches = [voc.resblocks[2 * i], voc.resblocks[2 * i + 1]]
            check(ex.mrf(x, branches), (branches[0](x) + branches[1](x)) / 2, f"mrf after upsampler {i}",
                  wrong=[(CHAINED, branches[1](branches[0](x))), (CHAINED, branches[1](branches[0](x)) / 2)],
                  atol=1e-5, rtol=1e-5)
            x = ex.mrf(x, branches)
        wave = torch.tanh(voc.conv_post(F.leaky_relu(x)))[:, 0]
        check(wave, voc(mel), "the SpeechT5HifiGan forward rebuilt around your mrf vs the model's", atol=1e-5, rtol=1e-5)


def test_fold_and_unfold_frames(ex):
    x = torch.randn(2, 3, 4, 5, 6)                              # (B, C, F, H, W)
    folded = ex.fold_frames(x)
    assert folded.shape == (8, 3, 5, 6), f"fold_frames: expected (8, 3, 5, 6), got {tuple(folded.shape)}"
    check(folded[1 * 4 + 2], x[1, :, 2], "folded image 6, which must be clip 1, frame 2 (clip-major)",
          wrong=[("frame-major order: the folded batch must hold all frames of clip 0 first", x[0, :, 3])])
    check(ex.unfold_frames(folded, 4), x, "unfold_frames(fold_frames(x)), which must give x back")
    # diffusers' own formula in UNet3DConditionModel.forward
    check(folded, x.permute(0, 2, 1, 3, 4).reshape(8, 3, 5, 6), "fold_frames vs diffusers' formula")


def test_pixels_as_sequences_round_trip(ex):
    b, c, f, h, w = 2, 3, 4, 5, 6
    frames = torch.randn(b * f, c, h, w)
    seqs = ex.pixels_as_sequences(frames, f)
    assert seqs.shape == (b * h * w, f, c), f"expected (B*H*W, F, C) = {(b * h * w, f, c)}, got {tuple(seqs.shape)}"
    # pixel (row 1, col 2) of clip 1 is the sequence of that pixel over the clip's frames
    check(seqs[1 * h * w + 1 * w + 2], frames[f:2 * f, :, 1, 2], "the sequence of clip 1's pixel (1, 2)")
    # diffusers' formula in TransformerTemporalModel.forward
    want = frames.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4).permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)
    check(seqs, want, "pixels_as_sequences vs diffusers' formula")
    check(ex.sequences_as_pixels(seqs, h, w), frames, "sequences_as_pixels(pixels_as_sequences(x)), which must give x back")


@pytest.mark.parametrize("frames", [4, 6])
def test_temporal_attention_equals_the_unet_layer(ex, frames):
    from minignext.unet3d import TransformerTemporalModel

    torch.manual_seed(frames)
    layer = TransformerTemporalModel(heads=2, dim_head=4, in_channels=8, groups=4).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.2)        # proj_out starts at zero: make it matter
        x = torch.randn(2 * frames, 8, 3, 5)
        check(ex.temporal_attention(x, layer, frames), layer(x, frames),
              f"temporal_attention over {frames} frames vs minignext's TransformerTemporalModel", atol=1e-5, rtol=1e-5)
