"""Checkpoints as older library versions wrote them, on tiny models: the VAE attention names of
diffusers < 0.17, the buffers old transformers saved (CLIP's position_ids, LLaMA's inv_freq),
pickle-only folders (converted once to safetensors beside them), and which hub files a loader fetches."""

import json
import logging

import pytest
import torch
from torch.testing import assert_close

from minignext import weights
from minignext.clip import CLIPText
from minignext.llama import Llama
from minignext.vae import AutoencoderKL, legacy_key
from minignext.weights import WeightsError

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

OLD_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def rewrite(folder, stem, edit):
    """Load a saved safetensors file, let `edit(dict)` change it, write it back."""
    file = folder / f"{stem}.safetensors"
    sd = weights.load_safetensors(file)
    sd = {k: v.clone() for k, v in sd.items()}
    edit(sd)
    weights.save_safetensors(sd, file, overwrite=True)
    return sd


def tiny_vae(folder):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(folder)
    return ref


def to_old_vae_names(sd):
    for key in [k for k in sd if ".mid_block.attentions.0." in k]:
        for new, old in OLD_VAE_NAMES.items():
            if f".attentions.0.{new}." in key:
                sd[key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")] = sd.pop(key)


def test_vae_with_pre_017_attention_names_loads_like_diffusers_loads_it(tmp_path):
    tiny_vae(tmp_path)
    stored = rewrite(tmp_path, "diffusion_pytorch_model", to_old_vae_names)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in stored and not any(".to_q." in k for k in stored)
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()      # diffusers renames them on load
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-5)
        z = torch.randn(1, 4, 4, 4)
        assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_vae_legacy_table_is_pure_and_narrow():
    t = torch.zeros(2)
    assert legacy_key("decoder.mid_block.attentions.0.value.bias", t) == [("decoder.mid_block.attentions.0.to_v.bias", t)]
    assert legacy_key("encoder.mid_block.attentions.0.proj_attn.weight", t)[0][0] == \
        "encoder.mid_block.attentions.0.to_out.0.weight"
    for key in ("encoder.down_blocks.0.resnets.0.conv1.weight", "encoder.mid_block.attentions.0.group_norm.weight",
                "decoder.up_blocks.0.key.weight"):
        assert legacy_key(key, t) == [(key, t)]


def test_unknown_vae_key_is_still_an_error(tmp_path):
    tiny_vae(tmp_path)
    rewrite(tmp_path, "diffusion_pytorch_model",
            lambda sd: sd.update({"encoder.mid_block.attentions.0.qkv.weight": torch.zeros(16, 16)}))
    with pytest.raises(WeightsError, match=r"unexpected key encoder\.mid_block\.attentions\.0\.qkv\.weight"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_clip_text_with_position_ids_buffer(tmp_path, caplog):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=98)
    ref = transformers.CLIPTextModel(config).eval()
    ref.save_pretrained(tmp_path)
    # SD-1.5's text_encoder/model.safetensors: text_model.* keys and the int64 position index
    rewrite(tmp_path, "model", lambda sd: sd.update(
        {**{("text_model." + k if not k.startswith("text_model.") else k): sd.pop(k) for k in list(sd)},
         "text_model.embeddings.position_ids": torch.arange(77)[None]}))
    with caplog.at_level(logging.INFO, logger="minignext"):
        ours = CLIPText.from_pretrained(tmp_path)
    assert "text_model.embeddings.position_ids" in caplog.text
    ids = torch.tensor([[5, 17, 42, 98, 0]])
    with torch.no_grad():
        assert_close(ours(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def save_llama(folder, legacy_buffers=False, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, **overrides)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(folder)
    if legacy_buffers:      # what transformers 4.28-4.30 wrote for every layer
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
        rewrite(folder, "model", lambda sd: sd.update(
            {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(2)}))
    return ref


def test_llama_with_rotary_inv_freq_buffers(tmp_path, caplog):
    ref = save_llama(tmp_path, legacy_buffers=True)
    with caplog.at_level(logging.INFO, logger="minignext"):
        ours = Llama.from_pretrained(tmp_path)
    assert caplog.text.count("rotary_emb.inv_freq") == 2
    ids = torch.tensor([[1, 7, 30, 2, 9]])
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_other_unknown_llama_buffer_is_an_error(tmp_path):
    save_llama(tmp_path)
    rewrite(tmp_path, "model", lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.cos_cached": torch.zeros(3)}))
    with pytest.raises(WeightsError, match=r"unexpected key model\.layers\.0\.self_attn\.rotary_emb\.cos_cached"):
        Llama.from_pretrained(tmp_path)


# ---------------------------------------------------------------- pickle-only folders

def test_pickle_only_vae_is_converted_once_beside_it(tmp_path):
    ref = tiny_vae(tmp_path)
    sd = weights.load_safetensors(tmp_path, stem="diffusion_pytorch_model")
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    to_old_vae_names(sd)                                   # AudioLDM's VAE: a pickle with the old names
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    ours = AutoencoderKL.from_pretrained(tmp_path)
    converted = tmp_path / "diffusion_pytorch_model.safetensors"
    assert converted.is_file()
    stamp = converted.stat().st_mtime_ns
    AutoencoderKL.from_pretrained(tmp_path)
    assert converted.stat().st_mtime_ns == stamp          # read, not converted again
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_sharded_pickle_llama(tmp_path):
    """A Vicuna merged with 2023 tools: pytorch_model-0000i-of-00002.bin and their index."""
    ref = save_llama(tmp_path, legacy_buffers=True)
    sd = weights.load_safetensors(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({k: sd[k] for k in part}, tmp_path / name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    ours = Llama.from_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*.safetensors*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_pickle_with_code_is_refused(tmp_path):
    save_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": logging.getLogger}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="weights_only=True"):
        Llama.from_pretrained(tmp_path)


# ---------------------------------------------------------------- which hub files a loader fetches

SD15_FILES = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned.safetensors",
              "v1-5-pruned-emaonly.safetensors", "README.md", "feature_extractor/preprocessor_config.json",
              "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
              "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
              "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
              "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
              "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
              "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.fp16.bin"]


def test_select_files_for_a_pipeline():
    got = weights.select_files(SD15_FILES, ("unet", "vae", "scheduler", "text_encoder", "tokenizer"))
    assert got == ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                   "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
                   "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors"]


def test_select_files_falls_back_to_pickles_per_folder():
    audioldm = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin", "vae/config.json",
                "vae/diffusion_pytorch_model.bin", "vocoder/config.json", "vocoder/pytorch_model.bin",
                "text_encoder/pytorch_model.bin", "scheduler/scheduler_config.json"]
    assert weights.select_files(audioldm, ("unet", "vae", "vocoder", "scheduler")) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "vocoder/config.json", "vocoder/pytorch_model.bin"]
    vicuna = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
              "pytorch_model.bin.index.json", "training_args.bin", "tokenizer.model", "tokenizer_config.json"]
    assert weights.select_files(vicuna) == [n for n in vicuna if n != "training_args.bin"]


def test_resolve_fetches_only_the_selected_files(tmp_path, monkeypatch):
    import huggingface_hub

    asked = {}

    def fake_snapshot(repo_id, local_dir, allow_patterns):
        asked.update(repo=repo_id, files=allow_patterns)
        return str(local_dir)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(weights, "hub_files", lambda repo: {name: None for name in SD15_FILES})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    weights.resolve("stable-diffusion-v1-5/stable-diffusion-v1-5", folders=("unet", "vae"))
    assert asked["repo"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert asked["files"] == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                              "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
