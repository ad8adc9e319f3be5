"""LLaVA-1.5 against transformers' LlavaForConditionalGeneration, loaded from the same file in the
hub layout (llava-hf/llava-1.5-7b-hf's key names, written here: transformers 5's own save_pretrained
writes another layout), fp32."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from minignext import weights
from minignext.systems.llava import (HF_CLIP_VISION_DEFAULTS, HF_LLAMA_DEFAULTS, IGNORE_INDEX, SYSTEM, Llava,
                                     LlavaConfig, convert_original, encode_conversation, preprocess_image)
from minignext.systems.nextgpt import Conversation
from minignext.tiny import tiny_tokenizer

BASE_VOCAB = 400                                  # tiny_tokenizer(); <image> = 400, <pad> = 401, 448 rows
CONFIGS = {
    "mha": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16),
                text=dict(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=256, pad_token_id=401),
                top=dict(image_token_index=BASE_VOCAB, image_seq_length=16)),
    "gqa": dict(vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                            image_size=24, patch_size=6, hidden_act="gelu", layer_norm_eps=1e-6),
                text=dict(vocab_size=448, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                          rope_theta=500.0, rms_norm_eps=1e-5),
                top=dict(image_token_index=BASE_VOCAB, image_seq_length=17, vision_feature_layer=[-3, -1],
                         vision_feature_select_strategy="full", multimodal_projector_bias=False)),
}


def hf_config(name):
    c = CONFIGS[name]
    return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**c["vision"]),
                                    text_config=transformers.LlamaConfig(**c["text"]), **c["top"])


def hub_key(key):
    """transformers 5's module names -> the hub layout's."""
    for old, new in (("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


def write_hub(model, folder):
    weights.save_safetensors({hub_key(k): v for k, v in model.state_dict().items()}, folder / "model.safetensors")
    model.config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, minignext model, folder), both read from one hub-layout file."""
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(hf_config(request.param))
    with torch.no_grad():            # randomise every parameter; rows from <image> on are the mean, as
        for name, p in hf.named_parameters():              # convert_original makes them
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.2) + (1.0 if "norm" in name else 0.0))
        for w in (hf.model.language_model.embed_tokens.weight, hf.lm_head.weight):
            w[BASE_VOCAB:] = w[:BASE_VOCAB].mean(0)
    folder = write_hub(hf, tmp_path_factory.mktemp(request.param))
    tok = tiny_tokenizer()
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.save(folder)
    ref, info = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                            output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return ref.eval(), Llava.from_pretrained(folder), folder


def prompt(model, rows, seed=1):
    """Token ids with `rows[i]` images' worth of placeholders at random places, and the images."""
    g = torch.Generator().manual_seed(seed)
    c, n = model.config, model.config.image_tokens
    ids, top = [], c.image_token_index                     # text ids below the added tokens
    for images in rows:
        row = [1] + torch.randint(3, top, (5,), generator=g).tolist()
        for _ in range(images):
            row += [c.image_token_index] * n + torch.randint(3, top, (3,), generator=g).tolist()
        ids.append(row)
    size = c.vision_config.image_size
    return torch.tensor(ids), torch.randn(sum(rows), 3, size, size, generator=g)


def test_logits_match_transformers_stage_by_stage(pair):
    ref, ours, _ = pair
    ids, pixels = prompt(ours, [2, 2])                    # two rows, two images each
    with torch.no_grad():
        want = torch.stack(ref.model.get_image_features(pixels).pooler_output)
        got = ours.image_features(pixels)
        assert got.shape == (4, ours.config.image_tokens, ours.config.text_config.hidden_size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        want = ref(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
    assert got.shape == want.shape == (*ids.shape, 448)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    ref, ours, _ = pair
    ref.generation_config.eos_token_id = None                 # both write exactly 12 tokens
    for rows in ([1], [1, 1]):
        ids, pixels = prompt(ours, rows, seed=2)
        with torch.no_grad():
            want = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
        got = ours.generate(ids, pixels, max_new_tokens=12, stop_token_ids=[], progress=False)
        assert got.tolist() == want.tolist()


def test_placeholder_count_must_match_the_features(pair):
    _, ours, _ = pair
    ids, pixels = prompt(ours, [1])
    n = ours.config.image_tokens
    with pytest.raises(ValueError, match=rf"holds {n - 1} image placeholders .* 1 image\(s\) give {n} features"):
        ours(torch.cat([ids[:, :6], ids[:, 7:]], 1), pixels)
    with pytest.raises(ValueError, match=rf"holds {n} image placeholders .* 0 image\(s\) give 0 features"):
        ours(ids)
    with pytest.raises(ValueError, match="token ids must be in 0..447, got 448"):
        ours(torch.tensor([[1, 448]]))


def test_chat_prompt_and_answer(pair):
    """chat() builds the vicuna_v1 prompt with one placeholder per feature and answers what
    transformers' greedy generate answers to the same ids and pixels."""
    ref, ours, _ = pair
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    conv = Conversation().user("What is in this picture?", image=img)
    ids, pixels = ours.prompt(conv)
    assert int((ids == ours.config.image_token_index).sum()) == ours.config.image_tokens
    text = ours.tokenizer.decode(ids[0], skip_special=True)
    assert text == f"{SYSTEM} USER: \nWhat is in this picture? ASSISTANT:"
    ref.generation_config.eos_token_id = ours.tokenizer.eos_id
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    reply = ours.chat(conv, max_new_tokens=8, progress=False)
    assert reply.token_ids == want.tolist()
    assert conv.turns[-1].role == "assistant" and conv.turns[-1].text == reply.text
    with pytest.raises(ValueError, match="LLaVA reads images only"):
        ours.chat([{"role": "user", "content": "hi", "audio": "x.wav"}], progress=False)


def test_a_conversations_system_message_stands_before_the_first_turn(pair):
    """chat(system=...) first, then the conversation's own system message, then LLaVA-1.5's."""
    _, ours, _ = pair
    said = lambda conv, system=None: ours.tokenizer.decode(ours.prompt(conv, system)[0][0], skip_special=True)  # noqa: E731
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert said(Conversation.from_messages(asked)) == "Be brief. USER: Hi? ASSISTANT:"
    assert said(Conversation.from_messages(asked), "Be kind.") == "Be kind. USER: Hi? ASSISTANT:"
    assert said(Conversation().user("Hi?")) == f"{SYSTEM} USER: Hi? ASSISTANT:"
    assert said(Conversation(system="").user("Hi?")) == "USER: Hi? ASSISTANT:"


def test_supervised_tokens_per_turn_are_the_answers():
    """The 'tokenization mismatch' of LLaVA's preprocess_v1 silently masks every label (loss 0).
    Here each assistant turn supervises exactly its own tokens and end token, nothing else, and
    the ids before each answer are those chat() sends for the same turns."""
    tok = tiny_tokenizer()
    image_id, = tok.add_special_tokens(["<image>"])
    answers = ["A red circle on a blue background.", "Here is a green square.", "A high tone."]
    conv = (Conversation().user("What is in this picture?", image="a.png").assistant(answers[0])
            .user("Show me a green square.").assistant(answers[1]).user("What do you hear?").assistant(answers[2]))
    ids, labels, images = encode_conversation(tok, conv, image_id, 16)
    assert images == ["a.png"] and len(ids) == len(labels) and ids.count(image_id) == 16
    runs, start = [], None                         # contiguous supervised runs
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    assert [tok.decode(ids[a:b]) for a, b in runs] == [f" {a}</s>" for a in answers]
    assert [ids[a:b] for a, b in runs] == [tok.encode(f" {a}", add_bos=False) + [tok.eos_id] for a in answers]
    assert [labels[a:b] for a, b in runs] == [ids[a:b] for a, b in runs]
    for turn, (a, _) in enumerate(runs):           # the prompt before each answer is what chat() sends
        partial = Conversation()
        partial.turns = conv.turns[:2 * turn + 1]
        assert encode_conversation(tok, partial, image_id, 16)[0] == ids[:a]


def test_image_preprocessing_matches_transformers():
    """Pad to a square with the CLIP mean, resize, crop, normalise: LlavaImageProcessor with do_pad."""
    proc = transformers.LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336},
                                               crop_size={"height": 336, "width": 336})
    rng = np.random.default_rng(0)
    for h, w in [(200, 300), (301, 150), (336, 336)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = torch.as_tensor(np.asarray(proc(img, return_tensors="np")["pixel_values"][0]))
        got = preprocess_image(img)
        assert got.shape == (3, 336, 336)
        assert (got - want).abs().max() < 1e-5


def test_config_defaults_are_transformers():
    """LlavaConfig() is transformers' LlavaConfig(); a hub config.json that leaves sub-config
    fields out (as llava-1.5-7b-hf's does) reads as transformers reads it."""
    hf_llama, hf_clip = transformers.LlamaConfig(), transformers.CLIPVisionConfig()
    assert {k: getattr(hf_llama, k) for k in HF_LLAMA_DEFAULTS if k != "rope_theta"} == \
        {k: v for k, v in HF_LLAMA_DEFAULTS.items() if k != "rope_theta"}
    assert hf_llama.rope_parameters["rope_theta"] == HF_LLAMA_DEFAULTS["rope_theta"]
    assert {k: getattr(hf_clip, k) for k in HF_CLIP_VISION_DEFAULTS} == HF_CLIP_VISION_DEFAULTS
    published = {"image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
                 "projector_hidden_act": "gelu", "tie_word_embeddings": False,
                 "text_config": {"max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                                 "vocab_size": 32064},
                 "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                   "model_type": "clip_vision_model", "num_attention_heads": 16,
                                   "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
                 "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    for ours, ref in [(LlavaConfig(), transformers.LlavaConfig()),
                      (LlavaConfig.from_hf(published), transformers.LlavaConfig(**published))]:
        for name in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                     "projector_hidden_act", "multimodal_projector_bias", "tie_word_embeddings"):
            assert getattr(ours, name) == getattr(ref, name), name
        for name in HF_CLIP_VISION_DEFAULTS:
            assert getattr(ours.vision_config, name) == getattr(ref.vision_config, name), name
        for name in HF_LLAMA_DEFAULTS.keys() - {"rope_theta"} | {"num_key_value_heads", "head_dim"}:
            assert getattr(ours.text_config, name) == getattr(ref.text_config, name), name
    assert LlavaConfig().image_tokens == 576


def test_tiny_config_writes_a_folder_transformers_reads(tmp_path):
    """LlavaConfig.tiny() trains, and its state dict and to_dict() are a hub-layout folder."""
    torch.manual_seed(0)
    model = Llava(LlavaConfig.tiny())
    ids, pixels = prompt(model, [1, 1])
    model(ids, pixels).logsumexp(-1).mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]     # layer -2: the last layer is not read
    assert unused and all(n.startswith(("vision_tower.vision_model.encoder.layers.2.",
                                        "vision_tower.vision_model.post_layernorm.")) for n in unused)
    weights.save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    assert Llava.from_pretrained(tmp_path).config == model.config
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixels), ref(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=1e-5)


def test_full_size_layout_matches_transformers():
    """LLaVA-1.5-7B built on meta by both: the same keys (in the hub layout) and shapes."""
    cfg = LlavaConfig()
    ref_cfg = transformers.LlavaConfig(text_config=transformers.LlamaConfig(vocab_size=32064, pad_token_id=32001))
    with torch.device("meta"):
        ref = {hub_key(k): v.shape for k, v in transformers.LlavaForConditionalGeneration(ref_cfg).state_dict().items()}
    from dataclasses import replace
    ours = weights.build_on_meta(Llava, replace(cfg, text_config=replace(cfg.text_config, vocab_size=32064)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref
    assert sum(p.numel() for p in ours.parameters()) == 7_063_427_072


@pytest.mark.parametrize("pair", ["mha"], indirect=True)      # the original release reads one vision layer
def test_original_layout_converts_to_the_hub_layout(pair, tmp_path):
    """The original release (model.*, lm_head, model.mm_projector.{0,2}) and stage 1's
    mm_projector.bin next to a plain Vicuna both convert to the very tensors of the hub file."""
    _, ours, hub = pair
    c = ours.config
    hub_sd = weights.load_safetensors(hub)
    clip = tmp_path / "clip"            # a whole CLIPModel checkpoint, as openai/clip-vit-large-patch14-336
    weights.save_safetensors({**{k[len("vision_tower."):]: v for k, v in hub_sd.items() if k.startswith("vision_tower.")},
                              "text_model.final_layer_norm.weight": torch.ones(8)}, clip / "model.safetensors")
    (clip / "config.json").write_text(json.dumps({"vision_config": CONFIGS["mha"]["vision"]}))
    llm = {k.replace("language_model.", "", 1): v[:BASE_VOCAB] if "embed_tokens" in k or "lm_head" in k else v
           for k, v in hub_sd.items() if k.startswith("language_model.")}
    projector = {k.replace("multi_modal_projector.linear_", "model.mm_projector.").replace("projector.1.", "projector.0."):
                 v for k, v in hub_sd.items() if k.startswith("multi_modal_projector.")}
    text = {**CONFIGS["mha"]["text"], "vocab_size": BASE_VOCAB, "pad_token_id": None}
    mm = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
          "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32}
    original, vicuna = tmp_path / "original", tmp_path / "vicuna"
    for folder, sd, extra in [(original, {**llm, **projector}, mm), (vicuna, llm, {})]:
        folder.mkdir()
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps({**text, **extra}))
    tiny_tokenizer().save(original)
    torch.save(projector, tmp_path / "mm_projector.bin")
    for out in (convert_original(original, tmp_path / "a", clip),
                convert_original(vicuna, tmp_path / "b", clip, projector=tmp_path / "mm_projector.bin")):
        converted = weights.load_safetensors(out)
        assert converted.keys() == hub_sd.keys()
        for key, value in hub_sd.items():
            torch.testing.assert_close(converted[key], value, rtol=0, atol=0)
        assert Llava.from_pretrained(out).config == c
    assert Llava.from_pretrained(tmp_path / "a").tokenizer.token_to_id("<image>") == BASE_VOCAB
    with pytest.raises(FileExistsError):
        convert_original(original, tmp_path / "a", clip)
