"""Checkpoint loading and its failures: truncated files, missing, unexpected and mis-shaped
keys, sharded indexes, pickle conversion, LoRA merging, and never overwriting."""

import dataclasses
import json

import pytest
import torch

from minignext import weights
from minignext.llama import Llama, LlamaConfig
from minignext.weights import WeightsError

CONFIG = LlamaConfig.tiny(vocab_size=40, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                     max_position_embeddings=32)


def save_llama(folder, config=CONFIG, edit=None):
    """A minignext Llama saved in HF layout; `edit(state_dict)` may break it first."""
    torch.manual_seed(0)
    model = Llama(config)
    sd = dict(model.state_dict())
    if edit:
        edit(sd)
    folder.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return model, folder


def test_round_trip_through_own_files(tmp_path):
    model, folder = save_llama(tmp_path / "m")
    loaded = Llama.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    assert loaded.model.rope_cos.device.type == "cpu"          # init_buffers ran after the meta build


@pytest.mark.parametrize("keep", [10, 0.5])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    _, folder = save_llama(tmp_path / "m")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        Llama.from_pretrained(folder)


def test_missing_key_is_named(tmp_path):
    _, folder = save_llama(tmp_path / "m", edit=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing key model\.layers\.1\.mlp\.up_proj\.weight .*\(32, 16\)"):
        Llama.from_pretrained(folder)


def test_unexpected_key_is_named(tmp_path):
    _, folder = save_llama(tmp_path / "m", edit=lambda sd: sd.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(WeightsError, match=r"unexpected key model\.extra\.weight"):
        Llama.from_pretrained(folder)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 16)
    _, folder = save_llama(tmp_path / "m", edit=edit)
    with pytest.raises(WeightsError) as err:
        Llama.from_pretrained(folder)
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(16, 16)" in msg and "(8, 16)" in msg


def test_missing_files(tmp_path):
    with pytest.raises(WeightsError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(CONFIG)))
    with pytest.raises(WeightsError, match="model.safetensors"):
        Llama.from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="not a hub repo id"):
        weights.resolve(tmp_path / "does-not-exist")


def test_unknown_hub_repo_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError, match="could not be downloaded"):
        weights.resolve("nobody-here/no-such-model")


def test_prompt_longer_than_max_position_embeddings(tmp_path):
    _, folder = save_llama(tmp_path / "m")
    model = Llama.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"max_position_embeddings \(32"):
        model(torch.ones(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than max_position_embeddings"):
        model.generate(torch.ones(1, 33, dtype=torch.long), 4)


def test_sharded_checkpoint_with_index(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
    shards[-1].unlink()
    with pytest.raises(WeightsError, match="shards that are not there"):
        Llama.from_pretrained(tmp_path)


class NotATensor:
    pass


def test_convert_pickle_round_trip(tmp_path):
    sd = {"a.weight": torch.randn(4, 3), "b.bias": torch.arange(5, dtype=torch.float16)}
    torch.save({"state_dict": sd}, tmp_path / "ckpt.pt")
    out = weights.convert_pickle(tmp_path / "ckpt.pt", tmp_path / "ckpt.safetensors")
    back = weights.load_safetensors(out)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    with pytest.raises(FileExistsError):
        weights.convert_pickle(tmp_path / "ckpt.pt", tmp_path / "ckpt.safetensors")
    renamed = weights.convert_pickle(tmp_path / "ckpt.pt", tmp_path / "r.safetensors", dtype=torch.float32,
                                     rename=lambda k, t: [("x." + k, t)])
    assert set(weights.load_safetensors(renamed)) == {"x.a.weight", "x.b.bias"}
    assert weights.load_safetensors(renamed)["x.b.bias"].dtype == torch.float32


def test_convert_pickle_refuses_arbitrary_objects(tmp_path):
    torch.save({"w": torch.zeros(2), "payload": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights_only=True"):
        weights.convert_pickle(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()


def test_merge_lora_matches_the_low_rank_forward():
    torch.manual_seed(0)
    w, a, b = torch.randn(6, 5), torch.randn(3, 5), torch.randn(6, 3)
    x = torch.randn(4, 5)
    merged = weights.merge_lora(w, a, b, alpha=12)
    # the un-merged LoRA layer: x W^T + (alpha / r) x A^T B^T
    torch.testing.assert_close(x @ merged.T, x @ w.T + (12 / 3) * (x @ a.T) @ b.T, atol=1e-5, rtol=0)
    half = weights.merge_lora(w.half(), a.half(), b.half(), alpha=3)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), w + b @ a, atol=1e-2, rtol=1e-3)
    with pytest.raises(WeightsError, match="do not fit"):
        weights.merge_lora(w, a, torch.randn(6, 2), alpha=1)


def test_save_never_overwrites(tmp_path):
    path = tmp_path / "w.safetensors"
    weights.save_safetensors({"x": torch.ones(2)}, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        weights.save_safetensors({"x": torch.zeros(2)}, path)
    assert torch.equal(weights.load_safetensors(path)["x"], torch.ones(2))
    weights.save_safetensors({"x": torch.zeros(2)}, path, overwrite=True)
    assert torch.equal(weights.load_safetensors(path)["x"], torch.zeros(2))


def test_tied_tensors_are_saved_once_each(tmp_path):
    model = Llama(dataclasses.replace(CONFIG, tie_word_embeddings=True))
    path = weights.save_safetensors(model.state_dict(), tmp_path / "tied.safetensors")
    sd = weights.load_safetensors(path)
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
