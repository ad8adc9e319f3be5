"""CLIP tokenizer and towers against transformers (test-only oracle), fp32."""

import pytest
import torch

from fixtures_clip import write_tiny_clip_tokenizer
from minignext import clip

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
