"""VQModel against diffusers' VQModel on tiny random configs (fp32, <= 1e-5), and the vector
quantiser's training pieces (straight-through estimator, codebook and commitment losses) by hand."""

import pytest
import torch
from torch.testing import assert_close

from minignext import weights
from minignext.vq import VectorQuantizer, VQModel, VQModelConfig, straight_through, vq_loss
from conftest import perturb

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "two_levels_narrow_codebook": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                       latent_channels=4, num_vq_embeddings=32, vq_embed_dim=3),
    "three_levels_no_attention": dict(block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                                      up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2,
                                      norm_num_groups=4, latent_channels=3, num_vq_embeddings=16,
                                      mid_block_add_attention=False),
}


def build_pair(tmp_path, name):
    torch.manual_seed(0)
    ref = diffusers.VQModel(**CONFIGS[name]).eval()
    perturb(ref)
    with torch.no_grad():    # codebook rows on the scale of the latents, so that many codes are used
        ref.quantize.embedding.weight.normal_(0.0, 0.3)
    ref.save_pretrained(tmp_path)
    return ref, VQModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_quantise_decode_match_diffusers(tmp_path, name):
    ref, mine = build_pair(tmp_path, name)
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        h_ref, h = ref.encode(x).latents, mine.encode(x)
        assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        q_ref, loss_ref, (_, _, idx_ref) = ref.quantize(h_ref)
        q, loss, codes = mine.quantize(h)
        assert torch.equal(codes.flatten(), idx_ref)
        assert codes.unique().numel() > 4                       # not a degenerate all-one-code case
        assert_close(q, q_ref, atol=1e-6, rtol=1e-6)
        assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
        assert_close(mine.decode(h), ref.decode(h_ref).sample, atol=1e-5, rtol=1e-5)
        assert_close(mine.decode(h, quantize=False), ref.decode(h_ref, force_not_quantize=True).sample,
                     atol=1e-5, rtol=1e-5)
        rows = ref.quantize.get_codebook_entry(idx_ref, (2, *codes.shape[1:], h.shape[1]))
        assert_close(mine.decode_codes(codes), ref.decode(rows, force_not_quantize=True).sample,
                     atol=1e-5, rtol=1e-5)
        out = ref(x)
        recon, commit, _ = mine(x)
        assert_close(recon, out.sample, atol=1e-5, rtol=1e-5)
        assert_close(commit, out.commit_loss, atol=1e-6, rtol=1e-6)
    assert codes.shape == (2, 16 // mine.scale_factor, 24 // mine.scale_factor)
    assert torch.equal(mine.encode_codes(x), codes)


def test_straight_through_and_the_two_loss_terms():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, _, codes = vq(z)
    rows = vq.embedding.weight[codes].permute(0, 3, 1, 2)
    assert_close(z_q, rows)
    upstream = torch.randn_like(z)
    (z_q * upstream).sum().backward()
    assert_close(z.grad, upstream)                          # the lookup is skipped in the backward pass
    assert vq.embedding.weight.grad is None                # and the codebook gets nothing from it

    n = z.numel()
    for legacy, (w_commit, w_codebook) in ((True, (1.0, 0.25)), (False, (0.25, 1.0))):
        z.grad, vq.embedding.weight.grad = None, None
        vq_loss(z, vq.lookup(codes), 0.25, legacy).backward()
        diff = (z - rows).detach()
        assert_close(z.grad, w_commit * 2 * diff / n)       # commitment: the encoder moves to its code
        row_grad = torch.zeros_like(vq.embedding.weight).index_add_(
            0, codes.flatten(), (-w_codebook * 2 * diff / n).permute(0, 2, 3, 1).reshape(-1, 3))
        assert_close(vq.embedding.weight.grad, row_grad)    # codebook term: the code moves to the encoder
    assert_close(straight_through(z, rows), rows)


def test_tiny_trains_through_the_codebook():
    torch.manual_seed(0)
    model = VQModel(VQModelConfig.tiny())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, loss, codes = model(x)
    assert recon.shape == x.shape and codes.shape == (2, 8, 8)
    (torch.mean((recon - x) ** 2) + loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0     # reached through the straight-through path
    assert model.quantize.embedding.weight.grad.abs().sum() > 0  # reached through the codebook term
    assert model.decode_codes(codes).shape == x.shape


def test_bad_config_codes_and_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="spatial"):
        VQModelConfig.from_hf({"norm_type": "spatial"})
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        VQModelConfig.from_hf({"down_block_types": ["DownBlock2D"]})
    ref, mine = build_pair(tmp_path, "two_levels_narrow_codebook")
    with pytest.raises(ValueError, match="0..31"):
        mine.decode_codes(torch.full((1, 2, 2), 32))
    sd = weights.load_safetensors(tmp_path, stem="diffusion_pytorch_model")
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"][:16]
    with pytest.raises(weights.WeightsError, match=r"quantize.embedding.weight: model wants \(32, 3\)"):
        weights.load_into(weights.build_on_meta(VQModel, mine.config), sd)
