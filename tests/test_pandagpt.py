"""PandaGPT against its reference, rebuilt from the official parts: the official ImageBind model
code (with PandaGPT's one change: audio without its logit scale), transformers' LlamaForCausalLM
wrapped by peft's LoRA as PandaGPT's OpenLLAMAPEFTModel does, llama_proj, and the delta saved as
its DeepSpeedAgent saves it (every trainable parameter). fp32."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_imagebind import CONFIGS, official  # the official ImageBind, tiny and random

from minignext import imagebind, weights
from minignext.systems.nextgpt import Conversation, encoder_input
from minignext.systems.pandagpt import PandaGPT, expected_delta, load_delta, read_delta
from minignext.tiny import tiny_pandagpt, tiny_tokenizer

R, ALPHA = 4, 32                      # alpha / r = 8, so a wrong LoRA scale shows
IB = CONFIGS["small"]


class OfficialPanda(nn.Module):
    """OpenLLAMAPEFTModel's parts: a frozen ImageBind, a LLaMA with peft LoRA on q, k, v, o, llama_proj."""

    def __init__(self, vicuna_dir):
        super().__init__()
        self.visual_encoder = official(IB).requires_grad_(False)
        llama = transformers.LlamaForCausalLM.from_pretrained(vicuna_dir, dtype=torch.float32)
        config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=R, lora_alpha=ALPHA, lora_dropout=0.1,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        self.llama_model = peft.get_peft_model(llama, config)
        self.llama_proj = nn.Linear(IB["out_embed_dim"], llama.config.hidden_size)

    def embed(self, modality, x):
        """PandaGPT's ImageBind forward: every postprocessor but audio's logit scale."""
        ib = self.visual_encoder
        clips = x.shape[:2] if x.dim() >= 5 else None
        x = x.flatten(0, 1) if clips else x
        pre = ib.modality_preprocessors[modality](**{modality: x})
        out = ib.modality_heads[modality](ib.modality_trunks[modality](**pre["trunk"]), **pre["head"])
        post = ib.modality_postprocessors[modality]
        out = post[0](out) if modality == "audio" else post(out)
        return out.reshape(*clips, -1).mean(1) if clips else out

    def prompt_embeds(self, tok, soft, question):
        """prepare_generation_embedding: bos, '### Human: <Img>', the soft token, '</Img> ...'."""
        before = tok.encode("### Human: <Img>", add_bos=False)
        after = tok.encode(f"</Img> {question}\n### Assistant:", add_bos=False)
        embed = self.llama_model.get_input_embeddings()
        ids = [tok.bos_id] + before + [-1] + after
        parts = [embed(torch.tensor([[tok.bos_id] + before])), self.llama_proj(soft)[:, None], embed(torch.tensor([after]))]
        return torch.cat(parts, 1), ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(reference, minignext PandaGPT), both from the same files: imagebind/, vicuna/, pytorch_model.pt."""
    folder = tmp_path_factory.mktemp("pandagpt")
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    with torch.no_grad():
        for p in llama.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    llama.save_pretrained(folder / "vicuna")
    tok.save(folder / "vicuna")
    ref = OfficialPanda(folder / "vicuna").eval()
    with torch.no_grad():                      # peft starts B at 0: make the LoRA count
        for name, p in ref.llama_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    delta = {k: v for k, v in ref.named_parameters() if v.requires_grad}     # DeepSpeedAgent.save_model
    torch.save(delta, folder / "pytorch_model.pt")
    torch.save(ref.visual_encoder.state_dict(), folder / "imagebind_huge.pth")
    imagebind.convert_checkpoint(folder / "imagebind_huge.pth", folder / "imagebind",
                                 config=imagebind.ImageBindConfig(**IB))
    ours = PandaGPT.from_pretrained(folder, lora_alpha=ALPHA)
    return ref, ours, folder, sorted(delta)


def sources():
    """One input per modality, as a user would give it (the same every call)."""
    rng = np.random.default_rng(0)
    picture = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    t = np.arange(16000 * 3) / 16000
    return {"image": picture(240, 300), "video": rng.integers(0, 256, (24, 240, 256, 3), dtype=np.uint8),
            "audio": (torch.tensor(0.3 * np.sin(2 * np.pi * 440 * t), dtype=torch.float32)[None], 16000),
            "depth": rng.uniform(0.5, 40.0, (230, 300)).astype(np.float32), "thermal": picture(260, 230),
            "imu": rng.standard_normal((6, 2100)).astype(np.float32)}


@pytest.mark.parametrize("modality", ["image", "video", "audio", "depth", "thermal", "imu"])
def test_logits_match_the_reference_for_every_modality(setup, modality):
    ref, ours, _, _ = setup
    source = sources()[modality]
    question = "What is in this input?"
    prompt = ours.build_prompt(Conversation().user(question, **{modality: source}))
    x = encoder_input(ours.visual_encoder, modality, source)
    with torch.no_grad():
        want_embeds, want_ids = ref.prompt_embeds(ours.tokenizer, ref.embed(ours_branch(modality), x), question)
        want = ref.llama_model(inputs_embeds=want_embeds).logits
        got = ours.llama_model(inputs_embeds=prompt.embeds)
    assert prompt.ids == want_ids and prompt.soft_modalities == [modality]
    torch.testing.assert_close(prompt.embeds, want_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def ours_branch(modality):
    return {"image": "vision", "video": "vision"}.get(modality, modality)


def test_thermal_keeps_its_logit_scale_and_audio_does_not(setup):
    _, ours, _, _ = setup
    s = sources()
    with torch.no_grad():
        for modality, norm in [("thermal", 10.0), ("depth", 5.0), ("imu", 5.0), ("audio", 1.0), ("image", 1.0)]:
            x = encoder_input(ours.visual_encoder, modality, s[modality])
            assert ours.imagebind_vector(ours_branch(modality), x).norm().item() == pytest.approx(norm, rel=1e-5)


def test_greedy_generation_matches_the_reference(setup):
    ref, ours, _, _ = setup
    img = sources()["image"]
    conv = Conversation().user("Describe the picture.", image=img)
    prompt = ours.build_prompt(conv)
    with torch.no_grad():
        want = ref.llama_model.generate(inputs_embeds=prompt.embeds, max_new_tokens=10, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0].tolist()
    got = ours.generate_ids(prompt, max_new_tokens=10, progress=False)
    assert got == want[:len(got)] and (len(got) == 10 or "###" in ours.tokenizer.decode(got))
    reply = ours.chat(conv, max_new_tokens=10, progress=False)
    assert reply.generated_ids == got and conv.turns[-1].role == "assistant"


def test_the_delta_has_exactly_the_official_keys(setup):
    """PandaGPT's own save (trainable parameters of the peft model) is the expected key set, and
    a delta missing or adding any key is refused with that key's name."""
    _, ours, folder, official_keys = setup
    assert sorted(read_delta(folder / "pytorch_model.pt")) == sorted(expected_delta(ours, R))
    assert len(official_keys) == 2 + 2 * 4 * 2 and all("embed_tokens" not in k for k in official_keys)
    delta = read_delta(folder / "pytorch_model.pt")
    fresh = PandaGPT.from_pretrained(folder, lora_alpha=ALPHA)      # each load below is refused before it merges
    missing = {k: v for k, v in delta.items() if k != "llama_model.model.layers.1.self_attn.v_proj.lora_B.weight"}
    with pytest.raises(weights.WeightsError, match=r"missing key llama_model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        load_delta(fresh, missing, lora_alpha=ALPHA)
    extra = {**delta, "llama_model.base_model.model.model.embed_tokens.weight": torch.zeros(400, 64)}
    torch.save(extra, folder / "extra.pt")
    with pytest.raises(weights.WeightsError, match=r"unexpected key llama_model\.model\.embed_tokens\.weight"):
        load_delta(fresh, read_delta(folder / "extra.pt"), lora_alpha=ALPHA)
    with pytest.raises(weights.WeightsError, match=r"unexpected key gen_text_hidden_fcs\.0\.fc\.weight"):
        load_delta(fresh, {**delta, "gen_text_hidden_fcs.0.fc.weight": torch.zeros(2, 2)}, lora_alpha=ALPHA)
    bad = {**delta, "llama_proj.weight": torch.zeros(64, 8)}
    with pytest.raises(weights.WeightsError, match=r"wrong shape for llama_proj\.weight: model wants \(64, 16\)"):
        load_delta(fresh, bad, lora_alpha=ALPHA)


def test_lora_training_state_saves_and_reloads_as_the_release(tmp_path):
    """A tiny PandaGPT with LoRA (as it trains) -> save_pretrained -> from_pretrained merges it:
    the same logits, and the saved names are peft's."""
    model = tiny_pandagpt()
    model.add_lora(r=R, alpha=ALPHA)
    with torch.no_grad():
        for name, p in model.llama_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    conv = Conversation().user("What do you feel?", imu=sources()["imu"])
    with torch.no_grad():
        want = model.llama_model(inputs_embeds=model.build_prompt(conv).embeds)
    model.save_pretrained(tmp_path)
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in \
        weights.load_safetensors(tmp_path / "delta.safetensors")
    weights.save_safetensors(model.visual_encoder.state_dict(), tmp_path / "ib" / "model.safetensors")
    (tmp_path / "ib" / "config.json").write_text(json.dumps(model.visual_encoder.config.to_dict()))
    base = tiny_pandagpt().llama_model          # the same seed: the LLM before LoRA
    weights.save_safetensors(base.state_dict(), tmp_path / "llm" / "model.safetensors")
    (tmp_path / "llm" / "config.json").write_text(json.dumps(asdict(base.config)))
    model.tokenizer.save(tmp_path / "llm")
    back = PandaGPT.from_pretrained(tmp_path, imagebind=tmp_path / "ib", vicuna=tmp_path / "llm", lora_alpha=ALPHA)
    with torch.no_grad():
        got = back.llama_model(inputs_embeds=back.build_prompt(Conversation().user("What do you feel?",
                                                                                  imu=sources()["imu"])).embeds)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        tiny_pandagpt().save_pretrained(tmp_path / "none")


def test_prompt_is_pandagpts_two_strings_around_each_soft_token():
    model = tiny_pandagpt()
    conv = Conversation().user("Is it warm?", thermal=sources()["thermal"]).assistant("Yes.").user("And now?")
    segments = model.prompt_segments(conv)
    assert segments[0] == "### Human: <Img>" and segments[1] == (0, 0)
    assert segments[2] == "</Img> Is it warm?\n### Assistant: Yes.\n### Human: And now?\n### Assistant:"
    assert model.splice_ids is None and model.signal_ids == {}
