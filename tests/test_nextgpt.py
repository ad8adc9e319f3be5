"""The any-to-any loop: splicing, signal-token runs, gradient masking, and the tiny-random
NextGPT end to end (text + image / audio / video in; text + image, audio, video out)."""

import numpy as np
import pytest
import torch

from minignext.systems.nextgpt import (SIGNALS, added_tokens, find_signal_runs, freeze_old_rows, signal_states,
                               signal_token_names, splice_soft_tokens)

SIG = {"image": [10, 11, 12, 13], "audio": [20, 21, 22]}


def test_added_tokens_give_the_official_ids():
    names = added_tokens()
    assert len(names) == 38 and 32000 + names.index("[IMG0]") == 32002
    assert 32000 + names.index("[VID0]") == 32006 and 32000 + names.index("[AUD7]") == 32037
    assert signal_token_names("audio") == [f"[AUD{i}]" for i in range(SIGNALS["audio"][1])]


def test_splice_soft_tokens_against_direct_concatenation():
    tok = torch.randn(6, 8)
    soft = torch.randn(2, 8)
    out, pos = splice_soft_tokens(tok, soft, [2, 4])
    expected = torch.cat([tok[:2], soft[:1], tok[2:4], soft[1:], tok[4:]])
    assert pos == [2, 5]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out, pos = splice_soft_tokens(tok, soft, [0, 0])     # two inputs back to back at the start
    assert pos == [0, 1] and torch.equal(out[2:], tok)
    with pytest.raises(ValueError, match="non-decreasing"):
        splice_soft_tokens(tok, soft, [4, 2])


def test_complete_run_is_found_at_its_position():
    ids = [1, 2, 10, 11, 12, 13, 3]
    fixed, runs, notices = find_signal_runs(ids, SIG)
    assert fixed == ids and runs == [("image", 2)] and notices == []


def test_partial_run_is_completed_with_a_notice():
    fixed, runs, notices = find_signal_runs([5, 10, 11, 6, 20, 21, 22], SIG)
    assert fixed == [5, 10, 11, 12, 13, 6, 20, 21, 22]
    assert runs == [("image", 1), ("audio", 6)]
    assert len(notices) == 1 and "completed" in notices[0] and "image" in notices[0]


def test_out_of_order_and_headless_runs():
    fixed, runs, notices = find_signal_runs([10, 12, 11, 7, 21, 22, 8], SIG)
    assert fixed == [10, 11, 12, 13, 7, 8]                # image completed, audio without [AUD0] dropped
    assert runs == [("image", 0)]
    assert any("dropped" in n and "audio" in n for n in notices)


def test_signal_states_are_read_at_the_tokens_not_one_before():
    hidden = torch.arange(10.0)[None, :, None].expand(1, 10, 3)
    got = signal_states(hidden, 4, 3)
    assert got[0, :, 0].tolist() == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        signal_states(hidden, 8, 3)


def test_freeze_old_rows_trains_only_the_new_rows():
    emb = torch.nn.Embedding(10, 4)
    freeze_old_rows(emb.weight, 7)
    emb(torch.tensor([1, 5, 8, 9])).sum().backward()
    assert emb.weight.grad[:7].abs().sum() == 0
    assert (emb.weight.grad[8:] != 0).all()


# ---------------------------------------------------------------- tiny-random, end to end

from minignext import media  # noqa: E402
from minignext.systems.nextgpt import Conversation, NextGPT, WeightsError  # noqa: E402

IMG = "".join(signal_token_names("image"))
AUD = "".join(signal_token_names("audio"))
VID = "".join(signal_token_names("video"))
FAST = dict(num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def model():
    return NextGPT.from_preset("tiny-random")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "red.png")
    t = np.arange(16000) / 16000
    media.write_wav(folder / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    frames = np.zeros((16, 32, 32, 3), np.uint8)
    for k in range(16):
        frames[k, 10:20, k:k + 10] = 255
    media.write_gif(folder / "clip.gif", frames, fps=8)
    return {"image": folder / "red.png", "audio": folder / "tone.wav", "video": folder / "clip.gif"}


def reference_conditioning(model, reply, modality):
    """Independently: one forward over [prompt; answer], states AT the run + its embeddings."""
    llm = model.llama_model
    ids = torch.tensor(reply.token_ids)
    with torch.no_grad():
        seq = torch.cat([reply.prompt.embeds[0], llm.model.embed_tokens.weight[ids]])
        hidden = llm.hidden_states(inputs_embeds=seq[None])
        pos = next(p for m, p in reply.signals if m == modality)
        n = len(model.signal_ids[modality])
        run = llm.model.embed_tokens.weight[torch.tensor(model.signal_ids[modality])]
        at = model.output_projection(modality)(hidden[:, pos:pos + n], run[None])
        before = model.output_projection(modality)(hidden[:, pos - 1:pos - 1 + n], run[None])
    return at, before


@pytest.mark.parametrize("modality,signal,shape", [
    ("image", IMG, (1, 77, 32)), ("audio", AUD, (1, 16)), ("video", VID, (1, 77, 32))])
def test_input_and_output_in_each_modality(model, inputs, modality, signal, shape):
    conv = Conversation().user("What is this? Make one like it.", **{modality: inputs[modality]})
    reply = model.chat(conv, force_response=f"It is red. Here: {signal}", **FAST)
    assert reply.text.startswith("It is red")
    assert "[" not in reply.text and signal_token_names(modality)[0] in reply.raw_text

    # splicing: one soft token between <Img> and </Img>, equal to llama_proj(ImageBind(x))
    p = reply.prompt
    (soft,) = p.soft_positions
    assert p.ids[soft] == -1 and p.ids[soft - 1] == model.splice_ids[0] and p.ids[soft + 1] == model.splice_ids[1]
    assert p.soft_modalities == [modality]
    expected_soft = model.encode(modality, inputs[modality])
    torch.testing.assert_close(p.embeds[0, soft], expected_soft[0])

    # the signal run sits where the forced answer put it, and routes to the right projection
    sig0 = model.signal_ids[modality][0]
    assert reply.signals == [(modality, len(p.ids) + reply.token_ids.index(sig0))]
    ((routed, cond),) = reply.conditioning
    assert routed == modality and tuple(cond.shape) == shape
    at, before = reference_conditioning(model, reply, modality)
    torch.testing.assert_close(cond, at[:, 0] if modality == "audio" else at, atol=1e-5, rtol=1e-5)
    assert (cond - (before[:, 0] if modality == "audio" else before)).abs().max() > 1e-4   # not off by one

    images, audios, videos = reply.images, reply.audios, reply.videos
    assert (len(images), len(audios), len(videos)) == (
        int(modality == "image"), int(modality == "audio"), int(modality == "video"))
    if modality == "image":
        assert images[0].size == (32, 32)
    if modality == "audio":
        wave, sr = audios[0]
        assert sr == 16000 and wave.ndim == 1 and wave.shape[0] == 8000 and np.isfinite(wave).all()
    if modality == "video":
        assert videos[0].shape == (8, 16, 16, 3) and videos[0].dtype == np.uint8
    assert reply.notices == []


def test_two_outputs_in_one_answer_route_separately(model):
    reply = model.chat("Draw it and play it.", force_response=f"Look {IMG} and listen {AUD}", decode=False,
                       progress=False)
    assert [m for m, _ in reply.signals] == ["image", "audio"]
    assert [tuple(c.shape) for _, c in reply.conditioning] == [(1, 77, 32), (1, 16)]
    assert reply.images == [] and reply.audios == []              # decode=False stops at the projection


def test_partial_signal_run_is_completed_and_said(model):
    partial = "".join(signal_token_names("image")[:2])
    reply = model.chat("Draw a cat.", force_response=f"Sure {partial}", **FAST)
    assert any("completed" in n for n in reply.notices)
    assert reply.token_ids[-4:] == model.signal_ids["image"]
    assert len(reply.images) == 1


def test_multi_turn_keeps_earlier_media_in_context(model, inputs):
    conv = Conversation().user("Look at this.", image=inputs["image"])
    model.chat(conv, force_response="A red square.", **FAST)
    conv.user("And listen to this.", audio=inputs["audio"])
    reply = model.chat(conv, force_response="A tone.", **FAST)
    assert reply.prompt.soft_modalities == ["image", "audio"]
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    first, second = reply.prompt.soft_positions
    assert first < second
    torch.testing.assert_close(reply.prompt.embeds[0, first], model.encode("image", inputs["image"])[0])


def test_sampled_generation_never_starts_mid_run(model):
    reply = model.chat("Tell me something.", max_new_tokens=12, temperature=1.0, seed=3, decode=False,
                       progress=False)
    _, _, notices = find_signal_runs(reply.token_ids, model.signal_ids)
    assert notices == [] and len(reply.token_ids) <= 12 + 23


def test_tiny_random_is_deterministic(model):
    other = NextGPT.from_preset("tiny-random")
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_unreadable_media_file(model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        model.chat(Conversation().user("What is this?", image=bad), progress=False)
    with pytest.raises(FileNotFoundError):
        model.chat(Conversation().user("And this?", audio=tmp_path / "missing.wav"), progress=False)


def test_missing_weights_name_the_download_command(monkeypatch, tmp_path):
    import minignext.presets as ng
    monkeypatch.setattr(ng, "REAL_DIR", tmp_path / "real")
    monkeypatch.setattr(ng, "TOY_DIR", tmp_path / "toy")
    with pytest.raises(WeightsError, match="minignext download nextgpt-7b"):
        NextGPT.from_preset("nextgpt-7b")
    with pytest.raises(WeightsError, match="toy weights"):
        NextGPT.from_preset("toy")
    with pytest.raises(ValueError, match="unknown preset"):
        NextGPT.from_preset("nextgpt-13b")


def test_save_and_load_as_the_toy_preset(model, monkeypatch, tmp_path):
    import minignext.presets as ng
    model.save_pretrained(tmp_path / "toy" / "nextgpt")
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "toy" / "nextgpt")
    monkeypatch.setattr(ng, "TOY_DIR", tmp_path / "toy")
    assert ng.default_preset() == "toy"
    loaded = NextGPT.from_preset("toy")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    answer = f"Here {IMG}"
    want = model.chat("Draw a cat.", force_response=answer, decode=False, progress=False)
    got = loaded.chat("Draw a cat.", force_response=answer, decode=False, progress=False)
    assert got.token_ids == want.token_ids and got.signals == want.signals
    torch.testing.assert_close(got.conditioning[0][1], want.conditioning[0][1], rtol=0, atol=0)
    reply = loaded.chat("Draw a cat.", force_response=answer, progress=False)
    assert reply.images == [] and any("no image decoder" in n for n in reply.notices)


def test_add_nextgpt_tokens_grows_vocab_and_embeddings():
    from minignext.llama import Llama, LlamaConfig
    from minignext.systems.nextgpt import add_nextgpt_tokens
    from minignext.tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    base = tok.vocab_size
    llm = Llama(LlamaConfig.tiny(vocab_size=base, hidden_size=32, intermediate_size=64, num_attention_heads=4))
    old = llm.model.embed_tokens.weight.detach().clone()
    ids = add_nextgpt_tokens(tok, llm)
    assert ids == list(range(base, base + 38)) and tok.vocab_size == base + 38
    assert llm.model.embed_tokens.weight.shape[0] == base + 38 and llm.lm_head.weight.shape[0] == base + 38
    assert torch.equal(llm.model.embed_tokens.weight[:base], old)
    assert tok.encode("[IMG0][AUD7]", add_bos=False) == [tok.token_to_id("[IMG0]"), tok.token_to_id("[AUD7]")]


def test_a_decoder_that_cannot_load_fails_the_reply_with_the_reason(model, monkeypatch):
    def missing():
        raise WeightsError("weights/real/nextgpt-7b/audioldm_unconditional.safetensors is missing")
    monkeypatch.setitem(model.decoder_loaders, "audio", missing)
    monkeypatch.setattr(model, "_decoders", {})
    conv = Conversation().user("Play a tone.")
    with pytest.raises(WeightsError, match="audio decoder could not be loaded: .*audioldm_unconditional"):
        model.chat(conv, force_response=f"Listen {AUD}", **FAST)
    assert [t.role for t in conv.turns] == ["user"]         # no half answer joins the history


REAL = __import__("minignext.presets", fromlist=["REAL_DIR"]).REAL_DIR


@pytest.mark.skipif(not all((REAL / p).exists() for p in ("imagebind", "vicuna-7b-v0", "delta.safetensors")),
                    reason="the nextgpt-7b weights are not here (minignext download nextgpt-7b)")
def test_real_nextgpt_7b_layout():
    model = NextGPT.from_preset("nextgpt-7b")
    assert model.llama_model.config.vocab_size == 32038
    assert model.signal_ids["image"] == [32002, 32003, 32004, 32005]
    assert model.output_projection("video").config.out_dim == 1024
    reply = model.chat("Draw a cat.", force_response=IMG, decode=False, progress=False)
    assert tuple(reply.conditioning[0][1].shape) == (1, 77, 768)


def test_decoders_load_on_demand_and_can_be_capped(monkeypatch):
    m = NextGPT.from_preset("tiny-random")
    built = []
    for name in ("image", "audio"):
        monkeypatch.setitem(m.decoder_loaders, name, lambda name=name: built.append(name) or name)
    assert m.loaded_decoders == [] and built == []
    m.decoder("image"), m.decoder("image")
    assert built == ["image"]
    m.max_loaded_decoders = 1
    m.decoder("audio")
    assert m.loaded_decoders == ["audio"] and built == ["image", "audio"]


def test_several_inputs_of_several_modalities_in_one_turn(model, inputs):
    conv = Conversation().user("Compare them.", image=[inputs["image"], inputs["image"]], audio=inputs["audio"])
    prompt = model.build_prompt(conv)
    assert prompt.soft_modalities == ["image", "image", "audio"]
    a, b, c = prompt.soft_positions
    assert (b - a, c - b) == (3, 3)                    # <Img>[soft]</Img> back to back
    for p in prompt.soft_positions:
        assert prompt.ids[p - 1] == model.splice_ids[0] and prompt.ids[p + 1] == model.splice_ids[1]
    torch.testing.assert_close(prompt.embeds[0, a], prompt.embeds[0, b])
    torch.testing.assert_close(prompt.embeds[0, c], model.encode("audio", inputs["audio"])[0])


def test_a_waveform_rate_pair_is_one_audio_input():
    import numpy as np
    from minignext.systems.nextgpt import Conversation
    wave = np.zeros(16000, dtype=np.float32)
    conv = Conversation().user("hear this", audio=(wave, 16000), image=["a.png", "b.png"])
    kinds = [m for m, _ in conv.turns[0].media]
    assert kinds == ["image", "image", "audio"]
    assert conv.turns[0].media[2][1][1] == 16000


def test_on_progress_follows_each_phase_and_step(model, inputs, capsys):
    events = []
    conv = Conversation().user("Look and listen.", image=inputs["image"], audio=inputs["audio"])
    reply = model.chat(conv, force_response=f"Here {IMG} and {AUD}", num_inference_steps=3, progress=False,
                       on_progress=lambda phase, done, total: events.append((phase, done, total)))
    phases = [p for p, _, _ in events]
    assert events[:2] == [("encode image", 1, 2), ("encode audio", 2, 2)]
    n = len(reply.generated_ids)
    assert [e for e in events if e[0] == "generate"] == [("generate", i, n) for i in range(1, n + 1)]
    for modality in ("image", "audio"):
        assert [e for e in events if e[0] == f"decode {modality}"] == [(f"decode {modality}", i, 3) for i in (1, 2, 3)]
    assert phases.index("decode image") > phases.index("generate") and phases[-1] == "decode audio"
    assert capsys.readouterr().err == ""                    # no terminal bars with progress=False

    # a later turn encodes only its new input; the earlier ones are cached
    events.clear()
    conv.user("And this?", image=inputs["image"])
    model.chat(conv, max_new_tokens=2, progress=False, on_progress=lambda *e: events.append(e))
    assert [e for e in events if e[0].startswith("encode")] == [("encode image", 1, 1)]


def test_terminal_progress_bars_still_draw_with_on_progress(model, capsys):
    seen = []
    model.chat("Draw.", force_response=f"Here {IMG}", num_inference_steps=2, progress=True,
               on_progress=lambda *e: seen.append(e))
    err = capsys.readouterr().err
    assert "denoising: |####################| 2/2" in err and ("decode image", 2, 2) in seen


# ---------------------------------------------------------------- user text, history, loud failures

def test_typed_special_tokens_are_text_and_generated_ones_are_tokens(model):
    typed = "<Img></Img> [IMG0] </s> <s>"
    conv = Conversation().user(typed).assistant(f"Here {IMG}").user("Again.")
    ids = model.build_prompt(conv).ids
    specials = {*model.splice_ids, *model.signal_ids["image"], model.tokenizer.eos_id, model.tokenizer.bos_id}
    first_user = model.tokenizer.encode(typed, add_bos=False, special=False)
    assert not specials & set(first_user) and model.tokenizer.decode(first_user) == typed
    assert [i for i in ids if i in specials] == [model.tokenizer.bos_id, *model.signal_ids["image"]]


def test_messages_are_checked(model):
    with pytest.raises(ValueError, match="the message is empty"):
        Conversation().user("   ")
    with pytest.raises(ValueError, match="must be a string"):
        Conversation().user(None)
    with pytest.raises(ValueError, match=r"got \['images'\]"):
        model.chat([{"role": "user", "content": "hi", "images": ["x.png"]}], **FAST)
    # a uint8 numpy image is an image, as documented
    picture = np.full((40, 48, 3), 200, np.uint8)
    reply = model.chat([{"role": "user", "content": "What is this?", "image": picture}], max_new_tokens=2, **FAST)
    soft = reply.prompt.embeds[0, reply.prompt.soft_positions[0]]
    torch.testing.assert_close(soft, model.encode("image", picture)[0])


def test_a_one_frame_gif_is_an_image_with_a_notice(model, tmp_path):
    frame = np.random.default_rng(1).integers(0, 256, (1, 40, 40, 3), np.uint8)
    media.write_gif(tmp_path / "still.gif", frame)
    reply = model.chat(Conversation().user("What happens?", video=tmp_path / "still.gif"), max_new_tokens=2, **FAST)
    assert reply.prompt.soft_modalities == ["image"] and any("single frame" in n for n in reply.notices)
    still = media.load_video(tmp_path / "still.gif")[0]
    torch.testing.assert_close(reply.prompt.embeds[0, reply.prompt.soft_positions[0]], model.encode("image", still)[0])


def test_a_long_history_drops_its_oldest_turns_and_keeps_their_inputs(model, inputs):
    conv = Conversation().user("Look at this.", image=inputs["image"]).assistant("A red square.")
    for i in range(40):
        conv.user(f"Question number {i}: what colour is it, really?").assistant(f"It is red, answer {i}.")
    conv.user("And now?")
    positions = model.llama_model.config.max_position_embeddings
    assert model.prompt_length(conv) + 64 > positions
    reply = model.chat(conv, max_new_tokens=64, **FAST)
    notice = next(n for n in reply.notices if "oldest turns were dropped" in n)
    assert "1 of their 1 inputs were kept" in notice
    assert conv.turns[0].role == "user" and conv.turns[0].media[0] == ("image", inputs["image"])
    assert reply.prompt.soft_modalities == ["image"] and reply.prompt.embeds.shape[1] + 64 <= positions
    with pytest.raises(ValueError, match="the last message .* exceed the LLM's 512 positions"):
        model.chat("word " * 600, **FAST)


def test_non_finite_weights_and_outputs_are_errors(model, monkeypatch):
    norm = model.llama_model.model.norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm[0] = float("nan")
        with pytest.raises(WeightsError, match="logits after 0 new tokens are NaN"):
            model.chat("Hello.", **FAST)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    from minignext.systems.nextgpt import MediaDecoder

    class Broken:
        sampling_rate, scheduler = 16000, None

        def __call__(self, **kwargs):
            return [np.full(100, np.nan, np.float32)]
    decoder = MediaDecoder("audio", Broken())
    with pytest.raises(WeightsError, match="audio decoder produced NaN"):
        decoder.generate(torch.zeros(1, 16))
    with pytest.raises(WeightsError, match="conditioning holds NaN"):
        decoder.generate(torch.full((1, 16), float("nan")))


def test_zero_guidance_is_a_value_and_nan_options_are_errors(model):
    default = model.chat("Draw.", force_response=f"Here {IMG}", **FAST).images[0]
    unguided = model.chat("Draw.", force_response=f"Here {IMG}", guidance_scale=0, **FAST).images[0]
    assert np.asarray(default).tolist() != np.asarray(unguided).tolist()
    for bad in (dict(guidance_scale=float("nan")), dict(num_inference_steps=0), dict(temperature=float("nan")),
                dict(top_p=0.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            model.chat("Draw.", **{**FAST, **bad})


def test_a_conversation_may_bring_its_own_system_message(model):
    """A first message of role "system" opens the prompt as model.system would, in its place; ""
    turns the model's off; a system message anywhere else, or with media, is refused."""
    asked = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"}]
    own = model.build_prompt(Conversation.from_messages(asked)).ids
    plain = model.build_prompt(Conversation().user("hi")).ids
    before = model.system
    try:
        model.system = "Answer in one word."
        assert model.build_prompt(Conversation().user("hi")).ids == own != plain
        assert model.build_prompt(Conversation(system="").user("hi")).ids == plain
    finally:
        model.system = before
    with pytest.raises(ValueError, match="system message comes first"):
        Conversation.from_messages([{"role": "user", "content": "hi"}, asked[0]])
    with pytest.raises(ValueError, match="system message comes first"):
        Conversation.from_messages([{**asked[0], "image": np.zeros((8, 8, 3), np.uint8)}, asked[1]])
    with pytest.raises(ValueError, match="role must be 'system', 'user' or 'assistant'"):
        Conversation.from_messages([{"role": "tool", "content": "hi"}])
