"""IDEFICS and OpenFlamingo end to end (fp32): parity with transformers' IdeficsForVisionText2Text
through Idefics.from_pretrained, parity with the official open-flamingo language-model wrapper
through OpenFlamingo.from_pretrained on a checkpoint.pt written by the official saving rule, the
gate-zero property, the reach of an image, the loaders' errors, generation and prompts."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from conftest import perturb
from minignext import weights
from minignext.clip import CLIPVisionConfig
from minignext.llama import Llama, LlamaConfig
from minignext.perceiver import media_attention_mask
from minignext.systems.flamingo import (IDEFICS_FAKE_TOKEN, IMAGE_TOKEN, Idefics, IdeficsConfig,
                                        IdeficsPerceiverConfig, IdeficsVisionConfig, OpenFlamingo,
                                        OpenFlamingoConfig, idefics_image_marker, interleave)
from minignext.tokenizer import Tokenizer
from oracles import open_flamingo_module

transformers = pytest.importorskip("transformers")

FAKE, IMG = 64, 65          # IDEFICS: the two added tokens; OpenFlamingo: <|endofchunk|> and <image>
# Row 0: text before the first image, then two images; row 1: one image, then a pad image slot.
IDS = torch.tensor([[1, 5, 6, FAKE, IMG, FAKE, 7, 8, 9, FAKE, IMG, FAKE, 10, 11],
                    [1, FAKE, IMG, FAKE, 7, 8, 9, 10, 11, 12, 13, 14, 15, 2]])


def pixels(seed, n=2, frames=None):
    g = torch.Generator().manual_seed(seed)
    shape = (2, n, 3, 16, 16) if frames is None else (2, n, frames, 3, 16, 16)
    return torch.randn(shape, generator=g)


# ---------------------------------------------------------------- IDEFICS

HF_IDEFICS = dict(vocab_size=64, additional_vocab_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=128,
                  vision_config=dict(embed_dim=24, image_size=16, patch_size=8, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48),
                  perceiver_config=dict(resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                                        resampler_head_dim=8, qk_layer_norms_perceiver=True))
IDEFICS_VARIANTS = {
    "resampler": dict(use_resampler=True, cross_layer_interval=2, qk_layer_norms=True),
    "tokens-tied": dict(use_resampler=False, cross_layer_interval=1, alpha_type="vector", tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(IDEFICS_VARIANTS))
def idefics_pair(request, tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.IdeficsConfig(**HF_IDEFICS, **IDEFICS_VARIANTS[request.param])
    hf = perturb(transformers.IdeficsForVisionText2Text(config).eval(), 0.1)   # gates and norms off their init
    folder = tmp_path_factory.mktemp("idefics") / request.param
    hf.save_pretrained(folder)
    return hf, Idefics.from_pretrained(folder)


def test_idefics_matches_transformers(idefics_pair):
    hf, ours = idefics_pair
    px = pixels(1)
    px[1, 1] = 0                                  # row 1 has one image; the processor pads with zeros
    mask = media_attention_mask(IDS, IMG, num_media=2)
    with torch.no_grad():
        ref = hf(input_ids=IDS, pixel_values=px, image_attention_mask=mask.long())
        media = ours.encode_images(px)
        logits = ours(IDS, px, mask)
        by_token = ours(IDS, px, image_token_id=IMG)
    torch.testing.assert_close(media, ref.image_hidden_states, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    assert torch.equal(by_token, logits)
    print(f"IDEFICS max |logits diff| {(logits - ref.logits).abs().max().item():.2e}")


def test_idefics_freezes_like_transformers(idefics_pair):
    hf, ours = idefics_pair
    ours.freeze()
    want = {k: p.requires_grad for k, p in hf.named_parameters()}
    assert {k: p.requires_grad for k, p in ours.named_parameters()} == want
    assert want["model.embed_tokens.additional_embedding.weight"] and not want["model.embed_tokens.weight"]
    ours.requires_grad_(False)


def test_idefics_config_defaults_and_loading(tmp_path):
    for ours, ref in ((IdeficsConfig(), transformers.IdeficsConfig()),
                      (IdeficsVisionConfig(), transformers.IdeficsVisionConfig()),
                      (IdeficsPerceiverConfig(), transformers.IdeficsPerceiverConfig())):
        for f in dataclasses.fields(ours):
            if f.name in ("vision_config", "perceiver_config", "rope_theta") or not hasattr(ref, f.name):
                continue
            assert getattr(ours, f.name) == getattr(ref, f.name), f.name
    assert IdeficsConfig().rope_theta == transformers.IdeficsConfig().rope_parameters["rope_theta"]
    given = transformers.IdeficsConfig(**HF_IDEFICS, use_resampler=True).to_dict()
    frozen = json.dumps(given, sort_keys=True, default=str)
    config = IdeficsConfig.from_hf(given)
    assert json.dumps(given, sort_keys=True, default=str) == frozen                    # not mutated
    assert config.vision_config.embed_dim == 24 and config.perceiver_config.qk_layer_norms_perceiver
    with pytest.raises(ValueError, match="cross_layer_interval"):
        IdeficsConfig.tiny(cross_layer_interval=3)


def llama_with_text_weights(model: Idefics) -> Llama:
    c = model.config
    base = Llama(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                             max_position_embeddings=c.max_position_embeddings)).eval()
    own = model.state_dict()
    base.load_state_dict({k: own[k] for k in base.state_dict()})
    return base


def without_gates(model, names):
    perturb(model, 0.1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in names:
                p.zero_()
    return model.eval()


def test_gate_zero_idefics_is_the_base_llm():
    torch.manual_seed(2)
    model = without_gates(Idefics(IdeficsConfig.tiny()), ("alpha_cross_attn", "alpha_dense"))
    base = llama_with_text_weights(model)
    ids = IDS.clamp(max=63)                       # the base LLM has no added tokens; the mask marks the images
    mask = media_attention_mask(IDS, IMG, num_media=2)
    with torch.no_grad():
        one, other, want = model(ids, pixels(3), mask), model(ids, pixels(4), mask), base(ids)
    assert (one[..., :64] - want).abs().max().item() == 0.0
    assert torch.equal(one, other)


def test_gate_zero_open_flamingo_is_the_base_llm():
    torch.manual_seed(3)
    model = without_gates(OpenFlamingo(OpenFlamingoConfig.tiny()), ("attn_gate", "ff_gate"))
    with torch.no_grad():
        one = model(pixels(3, frames=1), IDS)
        other = model(pixels(4, frames=1), IDS)
        want = model.lang_encoder(IDS)
    assert (one - want).abs().max().item() == 0.0
    assert torch.equal(one, other)


def changed(logits, other):
    return (logits != other).any(-1)


@pytest.mark.parametrize("system", ["idefics", "open_flamingo"])
def test_an_image_never_reaches_text_before_it(system):
    """Text before an image is untouched by it; text from its <image> token on is changed.
    (Text after the next image still sees it through self-attention: only the cross-attention
    reads the latest image alone, see tests/test_perceiver.py.)"""
    torch.manual_seed(5)
    if system == "idefics":
        model = perturb(Idefics(IdeficsConfig.tiny()), 0.3).eval()
        run = lambda px: model(IDS, px, image_token_id=IMG)
    else:
        model = perturb(OpenFlamingo(OpenFlamingoConfig.tiny()), 0.3).eval()
        run = lambda px: model(px[:, :, None], IDS)
    px = pixels(6)
    first, second = px.clone(), px.clone()
    first[:, 0] = torch.randn_like(px[:, 0])
    second[:, 1] = torch.randn_like(px[:, 1])
    with torch.no_grad():
        logits, by_first, by_second = run(px), run(first), run(second)
    starts = (IDS == IMG).int().argmax(-1)
    where = torch.arange(IDS.shape[1])
    assert torch.equal(changed(logits, by_first), where >= starts[:, None])
    assert torch.equal(changed(logits[0], by_second[0]), where >= 10) and torch.equal(logits[1], by_second[1])


# ---------------------------------------------------------------- OpenFlamingo against the official wrapper

def official_checkpoint(container) -> dict:
    """What open_flamingo's training code saves (train_utils.filter_state_dict_to_trainable): the
    state dict minus frozen parameters (embeddings excepted) and minus the duplicate views
    old_decoder_blocks, gated_cross_attn_layers and vision_encoder."""
    state = container.state_dict()
    for name, p in container.named_parameters():
        if "embed" not in name and not p.requires_grad:
            del state[name]
    duplicates = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers", "vision_encoder")
    return {k: v for k, v in state.items() if not any(d in k for d in duplicates)}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Flamingo assembled the way open_flamingo's factory does, on transformers' LLaMA and CLIP."""
    flamingo_lm, helpers = open_flamingo_module("flamingo_lm"), open_flamingo_module("helpers")
    utils = open_flamingo_module("utils")
    tmp = tmp_path_factory.mktemp("open_flamingo")
    torch.manual_seed(7)
    lm = perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128)), 0.1).eval()
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=8)).eval()
    lm.save_pretrained(tmp / "llama")
    clip.save_pretrained(tmp / "clip")
    utils.extend_instance(lm, flamingo_lm.FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    lm.resize_token_embeddings(67)                         # <|endofchunk|> 64, <image> 65, <PAD> 66
    container = nn.Module()
    container.vision_encoder, container.perceiver, container.lang_encoder = clip, helpers.PerceiverResampler(dim=24), lm
    lm.init_flamingo(media_token_id=IMG, lang_hidden_size=32, vis_hidden_size=24, cross_attn_every_n_layers=2,
                     gradient_checkpointing=False)
    container.requires_grad_(False)
    for part in (container.perceiver, lm.gated_cross_attn_layers, lm.get_input_embeddings()):
        part.requires_grad_(True)
    perturb(container.perceiver, 0.1)
    perturb(lm.gated_cross_attn_layers, 0.3)               # the gates leave 0
    torch.save(official_checkpoint(container), tmp / "checkpoint.pt")
    return container, tmp


def official_logits(container, vision_x, ids):
    with torch.no_grad():
        b, n, f = vision_x.shape[:3]
        tokens = container.vision_encoder(pixel_values=vision_x.flatten(0, 2)).last_hidden_state[:, 1:]
        latents = container.perceiver(tokens.reshape(b, n, f, *tokens.shape[1:]))
        lm = container.lang_encoder
        for layer in lm._get_decoder_layers():
            layer.condition_vis_x(latents)
        logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        lm.clear_conditioned_layers()
    return logits


def load_ours(tmp, checkpoint="checkpoint.pt", **settings):
    return OpenFlamingo.from_pretrained(tmp / checkpoint, tmp / "llama", tmp / "clip",
                                        **{"cross_attn_every_n_layers": 2, **settings})


def test_open_flamingo_matches_the_official_wrapper(official):
    container, tmp = official
    ours = load_ours(tmp)
    saved = torch.load(tmp / "checkpoint.pt", weights_only=True)
    assert set(saved) == set(ours.trainable_state_dict())            # the inferred key set, exactly
    assert any(".layers.1.gated_cross_attn_layer." in k for k in saved)
    assert not any(".layers.0.gated_cross_attn_layer." in k for k in saved)
    vision_x = pixels(8, frames=1)
    want = official_logits(container, vision_x, IDS)
    with torch.no_grad():
        got = ours(vision_x, IDS)
    # lm_head rows of the added tokens are not in checkpoint.pt: the official ones are a random
    # resize, ours the mean of the base rows
    torch.testing.assert_close(got[..., :64], want[..., :64], atol=1e-5, rtol=0)
    head = ours.lang_encoder.lm_head.weight
    torch.testing.assert_close(head[64:], head[:64].mean(0, keepdim=True).expand(3, -1))
    print(f"OpenFlamingo max |logits diff| {(got[..., :64] - want[..., :64]).abs().max().item():.2e}")


def test_open_flamingo_reads_training_checkpoints_and_first_release_duplicates(official):
    container, tmp = official
    saved = torch.load(tmp / "checkpoint.pt", weights_only=True)
    aliases = {k.replace("model.layers.", "gated_cross_attn_layers.").replace(".gated_cross_attn_layer.", "."): v
               for k, v in saved.items() if ".gated_cross_attn_layer." in k}
    training = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in {**saved, **aliases}.items()}}
    torch.save(training, tmp / "training.pt")
    vision_x = pixels(9, frames=1)
    with torch.no_grad():
        assert torch.equal(load_ours(tmp, "training.pt")(vision_x, IDS), load_ours(tmp)(vision_x, IDS))


def test_open_flamingo_loader_names_what_is_wrong(official):
    _, tmp = official
    saved = torch.load(tmp / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "perceiver.norm.weight"}, tmp / "missing.pt")
    with pytest.raises(weights.WeightsError, match=r"missing\.pt.*\n.*missing key perceiver\.norm\.weight"):
        load_ours(tmp, "missing.pt")
    with pytest.raises(weights.WeightsError, match=r"unexpected key lang_encoder\.model\.layers\.1\.gated"):
        load_ours(tmp, cross_attn_every_n_layers=4)
    torch.save({"lang_encoder.transformer.wte.weight": torch.zeros(3, 2)}, tmp / "mpt.pt")
    with pytest.raises(weights.WeightsError, match=r"mpt\.pt is an OpenFlamingo checkpoint on an MPT"):
        load_ours(tmp, "mpt.pt")
    with pytest.raises(weights.WeightsError, match=r"model\.safetensors is a language model's own weights"):
        load_ours(tmp, "llama/model.safetensors")
    torch.save({"perceiver.latents": torch.zeros(2), "hook": print}, tmp / "unsafe.pt")
    with pytest.raises(weights.WeightsError, match=r"weights_only=True"):
        load_ours(tmp, "unsafe.pt")


def test_open_flamingo_checkpoint_round_trip(tmp_path, official):
    _, tmp = official
    ours = load_ours(tmp)
    for name in ("again.pt", "again.safetensors"):
        ours.save_checkpoint(tmp / name, overwrite=True)
        other = load_ours(tmp, name)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in ours.state_dict().items())


def test_open_flamingo_defaults_follow_the_reference():
    import inspect
    helpers = open_flamingo_module("helpers")
    resampler = {k: p.default for k, p in inspect.signature(helpers.PerceiverResampler).parameters.items()}
    block = {k: p.default for k, p in inspect.signature(helpers.GatedCrossAttentionBlock).parameters.items()}
    c = OpenFlamingoConfig()
    assert (c.perceiver_depth, c.perceiver_dim_head, c.perceiver_heads, c.perceiver_num_latents, c.perceiver_ff_mult,
            c.max_num_media, c.max_num_frames) == tuple(resampler[k] for k in (
                "depth", "dim_head", "heads", "num_latents", "ff_mult", "max_num_media", "max_num_frames"))
    assert (c.cross_attn_dim_head, c.cross_attn_heads, c.cross_attn_ff_mult) == (
        block["dim_head"], block["heads"], block["ff_mult"])
    assert (c.vocab_size, c.eoc_token_id, c.media_token_id) == (32003, 32000, 32001)


def test_training_starts_at_the_frozen_llm():
    """With the gates at 0 the first step moves only the gates (every other trainable gets an exact
    zero gradient); the LLM and the vision tower never move; the next step reaches the perceiver."""
    torch.manual_seed(10)
    model = OpenFlamingo(OpenFlamingoConfig.tiny()).freeze()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not model.is_checkpoint_key(k)}
    latents = model.perceiver.latents.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    vision_x = pixels(14, frames=1)
    for step in range(2):
        logits = model(vision_x, IDS)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
            assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("_gate"))
            assert all(not g.any() for n, g in grads.items() if not n.endswith("_gate") and "embed" not in n)
        optimizer.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(model.perceiver.latents, latents)


# ---------------------------------------------------------------- generation and prompts

@pytest.mark.parametrize("system", ["idefics", "open_flamingo"])
def test_cached_generation_equals_full_forward(system):
    torch.manual_seed(11)
    if system == "idefics":
        model = perturb(Idefics(IdeficsConfig.tiny()), 0.3).eval()
        media, px = model.encode_images(pixels(12)), pixels(12)
        out = model.generate(IDS, px, max_new_tokens=5, image_token_id=IMG, stop_token_ids=[])
    else:
        model = perturb(OpenFlamingo(OpenFlamingoConfig.tiny()), 0.3).eval()
        media = model.encode_vision_x(pixels(12, frames=2))
        out = model.generate(pixels(12, frames=2), IDS, max_new_tokens=5, stop_token_ids=[])
    prompt_mask = media_attention_mask(IDS, IMG, num_media=2)
    full_mask = torch.cat([prompt_mask, prompt_mask[:, -1:].expand(-1, 5, -1)], dim=1)   # new tokens: latest image
    with torch.no_grad():
        hidden = model.hidden_states(out, media=media, media_mask=full_mask)
    want = model.lm_head(hidden)[:, IDS.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(out[:, IDS.shape[1]:], want)


def test_prompts_and_chat():
    tok = Tokenizer.from_pretrained("weights/toy/llm")
    base = tok.vocab_size
    image = torch.rand(3, 16, 16)
    text = LlamaConfig(vocab_size=base, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              image_size=16, patch_size=8, with_projection=False)
    torch.manual_seed(13)
    flamingo = OpenFlamingo(OpenFlamingoConfig.tiny(text_config=text, vision_config=vision)).eval()
    with pytest.raises(ValueError, match="no <image> token"):
        flamingo.chat(tok, [image, "a red circle"])
    assert tok.add_special_tokens(["<|endofchunk|>", IMAGE_TOKEN, "<PAD>"]) == [base, base + 1, base + 2]
    reply = flamingo.chat(tok, [image, "a red circle<|endofchunk|>", image, "a"], max_new_tokens=3)
    assert isinstance(reply, str)

    tok = Tokenizer.from_pretrained("weights/toy/llm")
    tok.add_special_tokens([IDEFICS_FAKE_TOKEN, IMAGE_TOKEN])
    ids, px = interleave(tok, ["User:", image, image, "what is it?"], 16, idefics_image_marker)
    assert tok.decode(ids[0]).replace(" ", "").endswith(
        "User:<fake_token_around_image><image><fake_token_around_image><image><fake_token_around_image>whatisit?")
    assert px.shape == (1, 2, 3, 16, 16) and ids[0, 0] == tok.bos_id
    idefics = Idefics(IdeficsConfig.tiny(vocab_size=base, num_hidden_layers=2)).eval()
    assert isinstance(idefics.chat(tok, ["User:", image, "what is it?"], max_new_tokens=3), str)



def test_chat_takes_videos_as_frames():
    """A uint8 (F, H, W, 3) array is a video: one <image>, F frames through the tower and the resampler."""
    import numpy as np

    from minignext import media

    tok = Tokenizer.from_pretrained("weights/toy/llm")
    base = tok.vocab_size
    tok.add_special_tokens(["<|endofchunk|>", IMAGE_TOKEN])
    text = LlamaConfig(vocab_size=base, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              image_size=16, patch_size=8, with_projection=False)
    torch.manual_seed(17)
    model = perturb(OpenFlamingo(OpenFlamingoConfig.tiny(text_config=text, vision_config=vision, added_tokens=2,
                                                         max_num_frames=3)), 0.3).eval()
    video = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    items = [video, "a red circle<|endofchunk|>", video[::-1].copy(), "a"]
    ids, px = interleave(tok, items, 16, lambda _: IMAGE_TOKEN)
    assert px.shape == (1, 2, 3, 3, 16, 16)
    torch.testing.assert_close(px[0, 1], media.preprocess_image(video[::-1].copy(), size=16))
    out = model.generate(px, ids, max_new_tokens=4, stop_token_ids=[])
    want = tok.decode(out[0, ids.shape[1]:], skip_special=True).strip()
    assert model.chat(tok, items, max_new_tokens=4, stop_token_ids=[]) == want
    with pytest.raises(ValueError, match="all images or all videos"):
        interleave(tok, [video, np.zeros((16, 16, 3), np.uint8)], 16, lambda _: IMAGE_TOKEN)
