"""BLIP-2 with a LLaMA against transformers' Blip2ForConditionalGeneration (fp32), MiniGPT-4 built
from tiny files in the official layouts (LAVIS + MiniGPT-4 checkpoint + HF LLaMA folder), its
strict checkpoint loader, its training sequence and its image preprocessing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_blip2 import hf_blip2_config, randomize, save, to_lavis
from minignext import blip2, weights
from minignext.llama import LlamaConfig
from minignext.systems import minigpt4 as mg
from minignext.tiny import tiny_tokenizer

transformers = pytest.importorskip("transformers")
TOL = dict(rtol=0, atol=1e-5)
IMAGE_ID = 100
TEXT = dict(model_type="llama", vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def blip2_llama(tmp_path_factory):
    """transformers' Blip2ForConditionalGeneration (tiny, random, LLaMA text model) and its folder."""
    config = blip2.Blip2Config.tiny(use_qformer_text_input=False, image_token_index=IMAGE_ID)
    ref = randomize(transformers.Blip2ForConditionalGeneration(hf_blip2_config(transformers, config, TEXT)))
    return ref, save(ref, tmp_path_factory.mktemp("blip2"))


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (2, 11), generator=g)
    ids[0, 1:5] = IMAGE_ID                           # the four query outputs go here
    ids[1, 3:7] = IMAGE_ID
    return torch.randn(2, 3, 28, 28, generator=g), ids


def test_blip2_with_llama_matches_transformers(blip2_llama):
    ref, folder = blip2_llama
    ours = mg.Blip2ForConditionalGeneration.from_pretrained(folder)
    x, ids = prompts()
    with torch.no_grad():
        want, got = ref(pixel_values=x, input_ids=ids).logits, ours(x, ids)
        torch.testing.assert_close(got, want, **TOL)
        print(f"BLIP-2 + LLaMA logits max diff {(got - want).abs().max().item():.2e}")
        want_new = ref.generate(pixel_values=x, input_ids=ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    got_new = ours.generate(x, ids, max_new_tokens=8)
    assert got_new.tolist() == want_new.tolist()
    with pytest.raises(ValueError, match=r"exactly 4 image positions.*\[3, 4\]"):
        ours(x, torch.where(torch.arange(11) == 1, 5, ids))


def minigpt4_files(tmp_path, ref, has_qformer=True):
    """Tiny files in MiniGPT-4's official layouts from the transformers model's weights."""
    lavis = to_lavis(ref.state_dict())
    vit = {k[len("visual_encoder."):]: t for k, t in lavis.items() if k.startswith("visual_encoder.")}
    vit.update({k.replace("blocks.1.", "blocks.2."): t for k, t in vit.items() if k.startswith("blocks.1.")})
    torch.save(vit, tmp_path / "eva_vit_g.pth")      # the bare ViT, one block more than BLIP-2 uses
    blip = {k: t for k, t in lavis.items() if k.startswith(("ln_vision", "Qformer", "query_tokens", "t5_proj"))}
    blip["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(48, 32)   # unused text side
    torch.save({"model": blip}, tmp_path / "blip2_pretrained.pth")
    proj = ref.language_projection if has_qformer else torch.nn.Linear(4 * 32, 48)
    trained = {"llama_proj.weight": proj.weight.detach(), "llama_proj.bias": proj.bias.detach(),
               "Qformer.bert.embeddings.position_ids": torch.arange(64)[None]}
    torch.save({"model": trained, "optimizer": {"state": {}}, "epoch": 4}, tmp_path / "minigpt4.pth")
    ref.language_model.save_pretrained(tmp_path / "vicuna")
    return tmp_path, proj


def tiny_config(has_qformer=True):
    return mg.MiniGPT4Config.tiny(has_qformer, text_config=LlamaConfig.from_hf(TEXT))


def test_minigpt4_from_official_files_matches_blip2(tmp_path, blip2_llama):
    ref, _ = blip2_llama
    files, _ = minigpt4_files(tmp_path, ref)
    model = mg.MiniGPT4.from_official(files / "vicuna", files / "minigpt4.pth", files / "blip2_pretrained.pth",
                                      files / "eva_vit_g.pth", config=tiny_config())
    x, ids = prompts(seed=1)
    with torch.no_grad():
        want = ref(pixel_values=x, input_ids=ids).logits
        got = model(x, ids, ids == IMAGE_ID)
    torch.testing.assert_close(got, want, **TOL)
    print(f"MiniGPT-4 (LAVIS files) logits max diff {(got - want).abs().max().item():.2e}")


def test_minigpt4_llama2_variant_concatenates_four_vit_tokens(tmp_path, blip2_llama):
    ref, _ = blip2_llama
    files, proj = minigpt4_files(tmp_path, ref, has_qformer=False)
    model = mg.MiniGPT4.from_official(files / "vicuna", files / "minigpt4.pth", eva_vit=files / "eva_vit_g.pth",
                                      config=tiny_config(has_qformer=False))
    assert not hasattr(model, "qformer") and model.config.num_image_tokens == 4
    x, ids = prompts(seed=2)
    with torch.no_grad():
        vision = ref.vision_model
        vision.post_layernorm.weight.fill_(1.0)      # MiniGPT-4's LLaMA-2 variant never loads ln_vision
        vision.post_layernorm.bias.fill_(0.0)
        patches = vision(pixel_values=x).last_hidden_state[:, 1:]       # (2, 16, 32), row by row
        tokens = proj(patches.reshape(2, 4, 4 * 32))
        got_tokens = model.encode_image(x)
        torch.testing.assert_close(got_tokens, tokens, **TOL)
        embeds = ref.language_model.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_ID)[..., None], tokens)
        want = ref.language_model(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(x, ids, ids == IMAGE_ID), want, **TOL)


def test_official_layouts_have_the_published_projection_shapes():
    for has_qformer, shape, tokens in ((True, (4096, 768), 32), (False, (4096, 5632), 64)):
        config = mg.MiniGPT4Config.official(LlamaConfig.vicuna_7b(), has_qformer)
        model = weights.build_on_meta(mg.MiniGPT4, config)
        assert tuple(model.llama_proj.weight.shape) == shape and config.num_image_tokens == tokens
        assert hasattr(model, "qformer") == has_qformer
    assert config.prompt_template == "[INST] {} [/INST] " and config.end_sym == "</s>"


def test_checkpoint_loader_names_missing_and_extra_keys(tmp_path):
    model = weights.build_on_meta(mg.MiniGPT4, tiny_config())
    w, b = torch.zeros(48, 32), torch.zeros(48)
    with pytest.raises(weights.WeightsError, match=r"missing key llama_proj\.bias"):
        mg.check_trained(model, mg.read_checkpoint({"llama_proj.weight": w}))
    with pytest.raises(weights.WeightsError, match=r"unexpected key qformer\.layernorm\.weight"):
        mg.check_trained(model, mg.read_checkpoint({"llama_proj.weight": w, "llama_proj.bias": b,
                                                    "qformer.layernorm.weight": torch.ones(32)}))
    with pytest.raises(weights.WeightsError, match=r"wrong shape for llama_proj\.bias"):
        mg.check_trained(model, {"llama_proj.weight": w, "llama_proj.bias": torch.zeros(47)})
    buffers = {"llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6),
               "Qformer.bert.embeddings.position_ids": torch.arange(512)[None]}
    torch.save({"model": {"llama_proj.weight": w, "llama_proj.bias": b, **buffers}}, tmp_path / "ckpt.pth")
    mg.check_trained(model, mg.read_checkpoint(tmp_path / "ckpt.pth"))     # buffers carry nothing learned
    official = weights.build_on_meta(mg.MiniGPT4, mg.MiniGPT4Config.official(LlamaConfig.from_hf(TEXT)))
    with pytest.raises(weights.WeightsError, match="LLaMA-2 variant"):
        mg.check_trained(official, {"llama_proj.weight": torch.zeros(48, 5632), "llama_proj.bias": b})


TURNS = [("<Img><ImageHere></Img> Describe this image in detail.", "A red circle moving left."),
         ("What colour is it?", "It is red."), ("And the shape?", "A circle.")]


def test_supervised_tokens_are_the_assistants_tokens_per_turn():
    tok = tiny_tokenizer()
    ex = mg.build_example(tok, TURNS, num_image_tokens=4)
    supervised = ex.labels != -100
    assert torch.equal(ex.labels[supervised], ex.input_ids[supervised])
    starts = (supervised & ~F.pad(supervised, (1, 0))[:-1]).nonzero().flatten().tolist()
    ends = (supervised & ~F.pad(supervised, (0, 1))[1:]).nonzero().flatten().tolist()
    assert len(starts) == len(TURNS)                 # one supervised run per turn
    for (human, answer), s, e in zip(TURNS, starts, ends):
        want = tok.encode(answer + "###", add_bos=False)
        assert e + 1 - s == len(want) and ex.input_ids[s:e + 1].tolist() == want
        assert tok.decode(ex.input_ids[s:e + 1]) == answer + "###"
    assert ex.image_mask.sum() == 4 and not supervised[ex.image_mask].any()
    assert (ex.input_ids == tok.bos_id).sum() == len(TURNS) and ex.input_ids[0] == tok.bos_id
    prompt = tok.decode(ex.input_ids[1:starts[0]][~ex.image_mask[1:starts[0]]])
    assert prompt == "###Human: <Img></Img> Describe this image in detail. ###Assistant: "
    short = mg.build_example(tok, TURNS[:1], 4, max_txt_len=3)
    assert (short.labels != -100).sum() == 3
    with pytest.raises(ValueError, match="exactly one <ImageHere>"):
        mg.build_example(tok, [("Describe it.", "A circle.")], 4)


def test_a_tiny_minigpt4_trains_its_projection_only():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = mg.MiniGPT4(mg.MiniGPT4Config.tiny())
    model.requires_grad_(False).llama_proj.requires_grad_(True)      # stage 1 and 2 train llama_proj alone
    batch = mg.collate([mg.build_example(tok, TURNS[:1], 4), mg.build_example(tok, TURNS, 4)])
    x = torch.randn(2, 3, 28, 28)
    logits = model(x, batch["input_ids"], batch["image_mask"], batch["attention_mask"])
    manual = [F.cross_entropy(logits[b, t - 1], batch["labels"][b, t], reduction="sum")
              for b in range(2) for t in range(1, logits.shape[1]) if batch["labels"][b, t] != -100]
    torch.testing.assert_close(mg.lm_loss(logits, batch["labels"]), torch.stack(manual).mean())
    opt = torch.optim.Adam(model.llama_proj.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = mg.lm_loss(model(x, batch["input_ids"], batch["image_mask"], batch["attention_mask"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and model.qformer.layernorm.weight.grad is None


def test_preprocessing_matches_blip_image_processor():
    img = (np.random.RandomState(0).rand(37, 50, 3) * 255).astype(np.uint8)
    ref = transformers.BlipImageProcessorPil(size={"height": 224, "width": 224})
    want = ref(img, return_tensors="pt").pixel_values[0]
    got = mg.preprocess_image(img)
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert mg.preprocess_image([img, img]).shape == (2, 3, 224, 224)


def test_chat_prompt_and_a_tiny_chat():
    want = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
            "it to you. Please answer my questions.###Human: <Img><ImageHere></Img> What is it?###Assistant: ")
    assert mg.chat_prompt("What is it?") == want
    two = mg.chat_prompt("Why?", [("What is it?", "A cat.")], mg.LLAMA2)
    assert two.endswith("<s>[INST] <Img><ImageHere></Img> What is it? [/INST] A cat.<s>[INST] Why? [/INST] ")
    torch.manual_seed(0)
    model = mg.MiniGPT4(mg.MiniGPT4Config.tiny()).eval()
    img = (np.random.RandomState(1).rand(40, 40, 3) * 255).astype(np.uint8)
    answer = model.chat(tiny_tokenizer(), img, "What is it?", max_new_tokens=6)
    assert isinstance(answer, str) and "###" not in answer
    with pytest.raises(ValueError, match="2 <ImageHere> but 1 image"):
        model.context_embeds(tiny_tokenizer(), "<ImageHere><ImageHere>", torch.zeros(1, 4, 64))
