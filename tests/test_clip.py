"""CLIP tokenizer and towers against transformers (test-only oracle), fp32."""

import pytest
import torch

from fixtures_clip import write_tiny_clip_tokenizer
from minignext import clip, weights

PROMPTS = ["a photo of a cat", "A RED   circle moving left!!", "the astronaut riding a horse, 2 dogs",
           "high &amp; low sound", "", "zebra's painting"]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(tmp_path, pad_token):
    transformers = pytest.importorskip("transformers")
    folder = write_tiny_clip_tokenizer(tmp_path, pad_token=pad_token)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = clip.CLIPTokenizer.from_pretrained(folder)
    # transformers skips CLIP's HTML unescaping, and splits its pad token "!" out as a special token
    plain = [p for p in PROMPTS if "&" not in p and pad_token not in p]
    want = ref(plain, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ours(plain), want, rtol=0, atol=0)
    assert ours.pad_token_id == ref.pad_token_id
    assert ours(["high &amp; low sound"]).tolist() == ours(["high & low sound"]).tolist()


def test_tokenizer_truncates_keeping_the_end_token(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_tiny_clip_tokenizer(tmp_path)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = clip.CLIPTokenizer.from_pretrained(folder)
    long = " ".join(["a photo of the red circle"] * 20)
    ids = ours([long], max_length=16)
    want = ref([long], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ids, want, rtol=0, atol=0)
    assert ids[0, -1] == ours.eos_token_id and ids[0, 0] == ours.bos_token_id
    assert ours.decode(ours(["a photo of the cat"])[0]) == "a photo of the cat"


def test_tokenizer_from_tokenizer_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tiny_clip_tokenizer(tmp_path / "slow")
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "slow")
    ref.save_pretrained(tmp_path / "fast")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "fast" / name).unlink(missing_ok=True)
    ours = clip.CLIPTokenizer.from_pretrained(tmp_path / "fast")
    want = ref(PROMPTS[:3], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ours(PROMPTS[:3]), want, rtol=0, atol=0)


def test_tokenizer_rejects_bad_input(tmp_path):
    ours = clip.CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="strings"):
        ours([1, 2])


# ---------------------------------------------------------------- towers

VISION_CONFIGS = [
    dict(cls="CLIPVisionModelWithProjection", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
         num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu"),
    dict(cls="CLIPVisionModel", hidden_size=48, intermediate_size=80, num_hidden_layers=3,
         num_attention_heads=3, image_size=28, patch_size=7, hidden_act="gelu", layer_norm_eps=1e-6),
]


def _save_hf(transformers, spec, folder, config_cls):
    spec = dict(spec)
    model_cls = getattr(transformers, spec.pop("cls"))
    torch.manual_seed(0)
    ref = model_cls(getattr(transformers, config_cls)(**spec)).eval()
    with torch.no_grad():                 # HF zero-initialises biases: randomise every tensor
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ref.save_pretrained(folder)
    return ref


@pytest.mark.parametrize("spec", VISION_CONFIGS, ids=lambda s: s["cls"])
def test_vision_matches_transformers(tmp_path, spec):
    transformers = pytest.importorskip("transformers")
    ref = _save_hf(transformers, spec, tmp_path, "CLIPVisionConfig")
    ours = clip.CLIPVision.from_pretrained(tmp_path)
    assert ours.config.with_projection == ("Projection" in spec["cls"])
    pixels = torch.randn(2, 3, spec["image_size"], spec["image_size"])
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == spec["num_hidden_layers"] + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=lambda m: f"hidden state {i}: {m}")
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)
    if got.embeds is not None:
        torch.testing.assert_close(got.embeds, want.image_embeds, rtol=0, atol=1e-5)
        pooled = ref.vision_model(pixel_values=pixels).pooler_output
    else:
        pooled = want.pooler_output
    torch.testing.assert_close(got.pooled, pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(48, 48), (40, 24)])
def test_vision_interpolates_positions_like_transformers(tmp_path, size):
    transformers = pytest.importorskip("transformers")
    ref = _save_hf(transformers, VISION_CONFIGS[0], tmp_path, "CLIPVisionConfig")
    ours = clip.CLIPVision.from_pretrained(tmp_path)
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        want = ref(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        got = ours(pixels, output_hidden_states=True)
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.embeds, want.image_embeds, rtol=0, atol=1e-5)


TEXT_CONFIGS = [
    dict(cls="CLIPTextModel", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
         num_attention_heads=4, max_position_embeddings=16, eos_token_id=99, bos_token_id=98, pad_token_id=99),
    dict(cls="CLIPTextModelWithProjection", vocab_size=120, hidden_size=48, intermediate_size=96,
         num_hidden_layers=3, num_attention_heads=6, max_position_embeddings=20, projection_dim=24,
         hidden_act="gelu", eos_token_id=2, bos_token_id=1, pad_token_id=0),
]


def _ids(spec, batch=3):
    """bos, random words, eos, then padding, with a different length per row."""
    t, eos, bos = spec["max_position_embeddings"], spec["eos_token_id"], spec["bos_token_id"]
    g = torch.Generator().manual_seed(1)
    ids = torch.full((batch, t), spec["pad_token_id"])
    lengths = [t - 2, 5, 1][:batch]
    for row, n in enumerate(lengths):
        ids[row, 0] = bos
        ids[row, 1:1 + n] = torch.randint(3, 90, (n,), generator=g)
        ids[row, 1 + n] = eos
    mask = (torch.arange(t)[None] <= torch.tensor(lengths)[:, None] + 1).long()
    return ids, mask


@pytest.mark.parametrize("spec", TEXT_CONFIGS, ids=lambda s: s["cls"])
def test_text_matches_transformers(tmp_path, spec):
    transformers = pytest.importorskip("transformers")
    ref = _save_hf(transformers, spec, tmp_path, "CLIPTextConfig")
    ours = clip.CLIPText.from_pretrained(tmp_path)
    ids, mask = _ids(spec)
    for attention_mask in (None, mask):
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
            got = ours(ids, attention_mask=attention_mask, output_hidden_states=True)
        assert len(got.hidden_states) == spec["num_hidden_layers"] + 1
        for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=lambda m: f"hidden state {i}: {m}")
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)
        if spec["cls"] == "CLIPTextModel":
            assert got.embeds is None
            torch.testing.assert_close(got.pooled, want.pooler_output, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(got.embeds, want.text_embeds, rtol=0, atol=1e-5)


def test_full_clip_checkpoint_loads_each_tower(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=99),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8), projection_dim=8)
    ref = transformers.CLIPModel(config).eval()
    ref.save_pretrained(tmp_path)
    vision, text = clip.CLIPVision.from_pretrained(tmp_path), clip.CLIPText.from_pretrained(tmp_path)
    pixels, ids = torch.randn(1, 3, 16, 16), torch.tensor([[98, 5, 6, 99]])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels)        # CLIPModel L2-normalises its embeddings
        unit = torch.nn.functional.normalize
        torch.testing.assert_close(unit(vision(pixels).embeds, dim=-1), want.image_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(unit(text(ids).embeds, dim=-1), want.text_embeds, rtol=0, atol=1e-5)


def test_vision_rejects_bad_images(tmp_path):
    model = clip.CLIPVision(clip.CLIPVisionConfig.tiny())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))


def test_presets():
    assert clip.CLIPVisionConfig.vit_l_14().num_positions == 257
    assert clip.CLIPVisionConfig.vit_l_14(336).num_positions == 577
    assert clip.CLIPTextConfig.sd15_text().hidden_size == 768


def test_text_loads_the_sd15_layout(tmp_path):
    """SD 1.5 keeps text_encoder/ (keys with the `text_model.` prefix) and tokenizer/ in one repo."""
    transformers = pytest.importorskip("transformers")
    spec = dict(TEXT_CONFIGS[0], cls="CLIPTextModel")
    ref = _save_hf(transformers, spec, tmp_path / "hf", "CLIPTextConfig")
    (tmp_path / "repo" / "text_encoder").mkdir(parents=True)
    (tmp_path / "repo" / "text_encoder" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    weights.save_safetensors({f"text_model.{k}": v for k, v in weights.load_safetensors(tmp_path / "hf").items()},
                             tmp_path / "repo" / "text_encoder" / "model.safetensors")
    write_tiny_clip_tokenizer(tmp_path / "repo" / "tokenizer")
    ours = clip.CLIPText.from_pretrained(tmp_path / "repo")
    tok = clip.CLIPTokenizer.from_pretrained(tmp_path / "repo")
    assert tok.pad_token_id == tok.eos_token_id
    ids, _ = _ids(spec)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=1e-5)
    with pytest.raises(weights.WeightsError):
        clip.CLIPVision.from_pretrained(tmp_path / "repo")
