"""The Flamingo blocks (fp32): the media-location mask by hand and against IDEFICS's processor,
the OpenFlamingo layout against the official open-flamingo helpers, the IDEFICS layout against
transformers' blocks, and the rule that an image reaches only the text after it."""

from types import SimpleNamespace

import pytest
import torch

from conftest import perturb
from minignext.perceiver import (GatedCrossAttentionBlock, IdeficsGatedCrossAttentionLayer,
                                 IdeficsPerceiverResampler, PerceiverResampler, media_attention_mask)
from minignext.systems.flamingo import IdeficsConfig
from oracles import open_flamingo_module

IMG, EOD = 9, 2
# text before the first image, two images, text after each
IDS = torch.tensor([[5, 6, IMG, 7, 8, 3, IMG, 4, 5, 6],
                    [IMG, 7, 8, 3, 4, 5, 6, 4, 3, 5]])


def spans(mask):
    """For each row, the image index each token sees (-1: none)."""
    return [[row.nonzero().item() if row.any() else -1 for row in m] for m in mask]


def test_media_mask_latest_image_only():
    mask = media_attention_mask(IDS, IMG)
    assert mask.shape == (2, 10, 2) and mask.dtype == torch.bool
    assert spans(mask) == [[-1, -1, 0, 0, 0, 0, 1, 1, 1, 1], [0] * 10]
    assert media_attention_mask(IDS, IMG, num_media=3).shape == (2, 10, 3)
    with pytest.raises(ValueError, match="2 <image> tokens .* only 1 media"):
        media_attention_mask(IDS, IMG, num_media=1)


def test_media_mask_reset_matches_idefics_processor():
    pytest.importorskip("transformers")
    from transformers.models.idefics import processing_idefics as p
    ids = torch.tensor([[5, IMG, 7, EOD, 4, 4, IMG, 3, EOD, 5, IMG, 6],
                        [IMG, 7, IMG, 3, EOD, 5, 5, 5, 5, 5, 5, 5]])
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: IMG, eos_token_id=EOD)
    incremental, _ = p.image_attention_mask_for_packed_input_ids(ids, tokenizer, "pt")
    want = p.incremental_to_binary_attention_mask(incremental, "pt", num_classes=3)
    got = media_attention_mask(ids, IMG, num_media=3, reset_token_id=EOD)
    assert torch.equal(got, want.bool()), (got.int(), want)


def official_helpers():
    return open_flamingo_module("helpers")


@pytest.mark.parametrize("frames", [1, 3])
def test_resampler_matches_open_flamingo(frames):
    helpers = official_helpers()
    kw = dict(dim=24, depth=2, dim_head=8, heads=3, num_latents=5, max_num_media=2, max_num_frames=3, ff_mult=2)
    torch.manual_seed(0)
    ref = perturb(helpers.PerceiverResampler(**kw)).eval()
    ours = PerceiverResampler(**kw)
    ours.load_state_dict(ref.state_dict(), strict=True)      # same keys, same shapes
    x = torch.randn(2, 2, frames, 7, 24)                      # 2 media items of `frames` frames, 7 tokens each
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def gated_pair(helpers):
    torch.manual_seed(1)
    ref = perturb(helpers.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4, ff_mult=2), 0.1)
    with torch.no_grad():
        ref.attn_gate.fill_(0.8)
        ref.ff_gate.fill_(-0.5)
    ours = GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4, ff_mult=2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def test_gated_block_matches_open_flamingo():
    ref, ours = gated_pair(official_helpers())
    x, media = torch.randn(2, 10, 32), torch.randn(2, 2, 5, 24)
    with torch.no_grad():
        want = ref(x, media, media_locations=IDS == IMG)
        got = ours(x, media, media_attention_mask(IDS, IMG))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        no_image_yet = ours.attn(x, media, media_attention_mask(IDS, IMG))[0, :2]
        assert not no_image_yet.any()   # exactly 0: text before the first image reads nothing
        # decoding with cached media: new tokens see the last image of the prompt
        new = torch.randn(2, 3, 32)
        want = ref(new, media, media_locations=IDS == IMG, use_cached_media=True)
        got = ours(new, media, media_attention_mask(IDS, IMG)[:, -1:].expand(-1, 3, -1))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_default_settings_are_open_flamingos():
    import inspect
    helpers = official_helpers()
    for ours, ref in ((PerceiverResampler, helpers.PerceiverResampler),
                      (GatedCrossAttentionBlock, helpers.GatedCrossAttentionBlock)):
        want = {k: p.default for k, p in inspect.signature(ref).parameters.items()
                if k != "only_attend_immediate_media"}
        assert {k: p.default for k, p in inspect.signature(ours).parameters.items()} == want


def idefics_hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    return transformers.IdeficsConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vision_config=dict(embed_dim=24, image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=48),
        perceiver_config=dict(resampler_n_latents=5, resampler_depth=2, resampler_n_heads=3, resampler_head_dim=8,
                              qk_layer_norms_perceiver=True), **kw)


def test_idefics_resampler_matches_transformers():
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler as Reference
    torch.manual_seed(2)
    ref = perturb(Reference(idefics_hf_config(), 24, 2, 3, 8, 5)).eval()
    ours = IdeficsPerceiverResampler(24, 2, 3, 8, 5, qk_layer_norms=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha_type", ["float", "vector"])
def test_idefics_gated_layer_matches_transformers(alpha_type):
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer as Reference
    hf_config = idefics_hf_config(qk_layer_norms=True, alpha_type=alpha_type)
    torch.manual_seed(3)
    ref = perturb(Reference(hf_config, layer_idx=0), 0.3).eval()
    config = IdeficsConfig.tiny(num_hidden_layers=2, qk_layer_norms=True, alpha_type=alpha_type)
    ours = IdeficsGatedCrossAttentionLayer(config, kv_dim=24).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, media = torch.randn(2, 10, 32), torch.randn(2, 2, 5, 24)
    mask = media_attention_mask(IDS, IMG)
    additive = torch.zeros(2, 1, 10, 10).masked_fill(~mask.repeat_interleave(5, -1)[:, None], torch.finfo().min)
    with torch.no_grad():
        want = ref(x, None, media.flatten(1, 2), image_attention_mask=additive,
                   cross_attention_gate=mask.any(-1).float())
        torch.testing.assert_close(ours(x, media, mask), want, atol=1e-5, rtol=0)


def changed_tokens(block, x, media, mask, item):
    """Which tokens' outputs change when media item `item` is replaced."""
    other = media.clone()
    other[:, item] = torch.randn_like(other[:, item])
    with torch.no_grad():
        return (block(x, media, mask) != block(x, other, mask)).any(-1)


@pytest.mark.parametrize("layout", ["open_flamingo", "idefics"])
def test_an_image_reaches_only_the_text_up_to_the_next_image(layout):
    torch.manual_seed(4)
    if layout == "idefics":
        block = perturb(IdeficsGatedCrossAttentionLayer(IdeficsConfig.tiny(), kv_dim=24), 0.3)
    else:
        block = perturb(GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4), 0.3)
    x, media = torch.randn(2, 10, 32), torch.randn(2, 2, 5, 24)
    mask = media_attention_mask(IDS, IMG)
    first = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0], [1] * 10], dtype=torch.bool)
    second = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1], [0] * 10], dtype=torch.bool)
    assert torch.equal(changed_tokens(block, x, media, mask, 0), first)
    assert torch.equal(changed_tokens(block, x, media, mask, 1), second)
