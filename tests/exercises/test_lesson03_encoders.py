import pytest
import torch
import torch.nn.functional as F

LESSON = "lesson03_encoders"


def test_patchify_cuts_patches_in_reading_order(ex):
    images = torch.randn(2, 3, 12, 8)
    got = ex.patchify(images, 4)
    assert got.shape == (2, 6, 48)
    for n, (i, j) in enumerate((i, j) for i in range(3) for j in range(2)):
        torch.testing.assert_close(got[:, n], images[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, -1))


def test_patchify_then_linear_is_the_patch_convolution(ex):
    images, weight = torch.randn(1, 3, 16, 16), torch.randn(10, 3, 8, 8)
    conv = F.conv2d(images, weight, stride=8).flatten(2).transpose(1, 2)     # (B, N, D)
    torch.testing.assert_close(ex.patchify(images, 8) @ weight.flatten(1).T, conv, rtol=1e-5, atol=1e-4)


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
    assert got.shape == (1 + new_h * new_w, 8)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], table[0])
