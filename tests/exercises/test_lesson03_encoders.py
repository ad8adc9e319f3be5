import pytest
import torch
import torch.nn.functional as F

from conftest import check

LESSON = "lesson03_encoders"
CHANNEL_LAST = ("each patch is flattened channel-last (row, column, channel); a Conv2d weight "
                "(D, C, p, p) flattens channel first")


def test_patchify_cuts_patches_in_reading_order(ex):
    images = torch.randn(2, 3, 12, 8)
    got = ex.patchify(images, 4)
    assert got.shape == (2, 6, 48), f"expected (2, 6, 48) for 2 images of 12x8 in patches of 4, got {tuple(got.shape)}"
    channel_last = images.reshape(2, 3, 3, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, 48)
    for n, (i, j) in enumerate((i, j) for i in range(3) for j in range(2)):
        check(got[:, n], images[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, -1),
              f"patch {n} (tile row {i}, column {j})", wrong=[(CHANNEL_LAST, channel_last[:, n])])


def test_patchify_then_linear_is_the_patch_convolution(ex):
    images, weight = torch.randn(1, 3, 16, 16), torch.randn(10, 3, 8, 8)
    conv = F.conv2d(images, weight, stride=8).flatten(2).transpose(1, 2)     # (B, N, D)
    check(ex.patchify(images, 8) @ weight.flatten(1).T, conv, "patchify @ W.flatten(1).T vs the stride-8 Conv2d",
          rtol=1e-5, atol=1e-4)


def test_patchify_rejects_ragged_images(ex):
    with pytest.raises(ValueError):
        ex.patchify(torch.randn(1, 3, 10, 8), 4)


@pytest.mark.parametrize("old,new", [(4, 6), (4, (2, 5)), ((3, 3), (3, 3))])
def test_interpolate_pos_embed_matches_transformers(ex, old, new):
    transformers = pytest.importorskip("transformers")
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    grid = old if isinstance(old, int) else old[0]
    config = transformers.CLIPVisionConfig(hidden_size=8, num_attention_heads=2, image_size=grid * 2,
                                            patch_size=2)
    embeddings = CLIPVisionEmbeddings(config)
    table = torch.randn(1 + grid * grid, 8)
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(table)
    new_h, new_w = (new, new) if isinstance(new, int) else new
    tokens = torch.zeros(1, 1 + new_h * new_w, 8)
    want = embeddings.interpolate_pos_encoding(tokens, new_h * 2, new_w * 2)[0]
    got = ex.interpolate_pos_embed(table, old, new)
    check(got, want.detach(), f"the {old} table resized to {new} vs transformers' interpolate_pos_encoding",
          rtol=1e-5, atol=1e-5)
    check(got[0], table[0], "the class token's row (it must stay as it was)")


@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_vision_tokens_equal_clip_embeddings(ex, size):
    from minignext.clip import CLIPVisionConfig, CLIPVisionEmbeddings

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    embeddings = CLIPVisionEmbeddings(config)
    with torch.no_grad():
        for p in embeddings.parameters():
            p.normal_()
        pixels = torch.randn(2, 3, *size)
        got = ex.vision_tokens(pixels, embeddings.patch_embedding.weight, embeddings.class_embedding,
                               embeddings.position_embedding.weight, config.grid)
        check(got, embeddings(pixels), f"vision_tokens of {size[0]}x{size[1]} images vs minignext's "
              f"CLIPVisionEmbeddings", atol=1e-4, rtol=1e-4)
