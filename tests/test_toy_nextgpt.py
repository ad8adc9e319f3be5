"""NExT-GPT's three stages on the toy foundations: a tiny run on random stand-ins, the delta's layout,
the training tokenisation against the inference prompt, and the shipped toy NExT-GPT when present."""

import json

import numpy as np
import pytest
import torch

from minignext import weights
from minignext.systems.nextgpt import Conversation, NextGPT, signal_token_names
from minignext.systems.nextgpt_checkpoint import load_folder
from minignext.toy import checkers, decoder_text, eval_nextgpt, train_nextgpt, world
from minignext.toy.train_audio_decoder import EMBED_DIM
from minignext.toy.trainer import RunArgs, read_loss_log

SHIPPED = train_nextgpt.OUT_DIR / "nextgpt.json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nextgpt")
    root = train_nextgpt.random_foundations(tmp / "foundations")
    summary = train_nextgpt.train(RunArgs(scale=0.004, resume=False, progress=False, runs_dir=tmp / "runs"),
                                  out_dir=tmp / "out", root=root, bank_per_key=1)
    return tmp, root, summary


def test_stages_train_only_their_parts(trained):
    tmp, root, summary = trained
    st = summary["stages"]
    model, _ = train_nextgpt.build(root)
    h, new = model.llama_model.config.hidden_size, len(model.signal_ids["image"]) + 24 + 8 + 2
    proj = sum(p.numel() for m in ("image", "video", "audio") for p in model.output_projection(m).parameters())
    assert st[1]["trainable"] == sum(p.numel() for p in model.llama_proj.parameters())
    assert st[2]["trainable"] == proj + 2 * new * h                 # the new rows of embed_tokens and lm_head
    lora = 4 * model.llama_model.config.num_hidden_layers * train_nextgpt.LORA["r"]
    assert st[3]["trainable"] > st[1]["trainable"] + st[2]["trainable"] + lora * h
    for stage in (1, 2, 3):
        log = read_loss_log(f"nextgpt_stage{stage}-seed0-scale0.004", runs_dir=tmp / "runs")
        assert len(log) == st[stage]["steps"] and all(np.isfinite(r["loss"]) for r in log)
        assert (stage == 1) == all(r["dist"] == 0 for r in log)     # stage 1 makes no media


def test_delta_has_official_names_and_frozen_parts_stay(trained):
    tmp, root, _ = trained
    delta = weights.load_safetensors(tmp / "out" / "delta.safetensors")
    prefixes = ("llama_model.base_model.model.", "llama_proj.", "gen_text_hidden_fcs.0.", "gen_text_hidden_fcs_video.0.",
                "gen_text_hidden_fcs_audio.0.")
    assert all(k.startswith(prefixes) for k in delta)
    key = "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert delta[key].shape == (train_nextgpt.LORA["r"], 192)
    base = weights.load_safetensors(root / "llm")
    embed = delta["llama_model.base_model.model.model.embed_tokens.weight"]
    torch.testing.assert_close(embed[:base["model.embed_tokens.weight"].shape[0]], base["model.embed_tokens.weight"])
    assert not any("layers.0.self_attn.q_proj.weight" in k for k in delta)     # base weights are not in the delta

    model = load_folder(tmp / "out")       # the toy preset's loader: base + merged LoRA + projections
    q = model.llama_model.model.layers[0].self_attn.q_proj.weight
    a, b = delta[key].float(), delta[key.replace("lora_A", "lora_B")].float()
    scale = train_nextgpt.LORA["alpha"] / train_nextgpt.LORA["r"]
    torch.testing.assert_close(q, base["model.layers.0.self_attn.q_proj.weight"].float() + scale * b @ a)
    torch.testing.assert_close(model.llama_proj.weight, delta["llama_proj.weight"].float())
    reply = model.chat("draw a red circle.", decode=False, progress=False,
                       force_response=" here is a red circle.[IMG0][IMG1][IMG2][IMG3]")
    assert reply.signals and reply.conditioning[0][1].shape == (1, decoder_text.CONTEXT_LENGTH, decoder_text.WIDTH)


def test_training_tokens_match_the_inference_prompt(trained):
    _, root, _ = trained
    model, texts = train_nextgpt.build(root)
    rng = np.random.default_rng(0)
    first = world.turn("describe_image", rng, "train", "train")
    second = world.turn("make_audio", rng, "train", "train")
    bank = {("image", first.user_media.obj, None): torch.randn(1, model.llama_proj.in_features)}
    ex = train_nextgpt.encode_dialogue(model, [first, second], bank, train_nextgpt.caption_targets(texts), rng)
    conv = Conversation().user(first.user, image=np.zeros((32, 32, 3), np.uint8))
    conv.assistant(first.assistant).user(second.user)
    conv.turns[0].soft.append(torch.zeros(1, model.llama_model.config.hidden_size))   # no encoder pass needed
    prompt = model.build_prompt(conv)
    n = len(prompt.ids)
    assert [0 if i == -1 else i for i in prompt.ids] == ex["ids"][:n]
    answer = [t for t in ex["labels"][n:] if t != -100]
    assert model.tokenizer.decode(answer) == f" {second.assistant}" + "".join(
        f"[AUD{i}]" for i in range(8)) + "\n###"
    (modality, start, target), = ex["runs"]
    assert modality == "audio" and ex["ids"][start:start + 8] == model.signal_ids["audio"]
    assert target.shape == (1, EMBED_DIM)


def test_supervised_tokens_per_turn_are_each_answer_its_signals_and_its_stop(trained):
    """Counted per turn on stage 3's dialogues (the world's grammar and MosIT-style ones): each
    answer's run of labels is its text, the signal runs of what it makes, and the "\\n###" that ends
    it, and nothing else is supervised."""
    _, root, _ = trained
    model, texts = train_nextgpt.build(root)
    tok, targets, rng = model.tokenizer, train_nextgpt.caption_targets(texts), np.random.default_rng(2)

    class AnyMedium(dict):                   # an ImageBind vector for every medium, no encoder pass
        def __missing__(self, key):
            return torch.zeros(1, model.llama_proj.in_features)

    for _ in range(16):
        turns = train_nextgpt.stage_turn(3, rng, mosit=0.5)
        ex = train_nextgpt.encode_dialogue(model, turns, AnyMedium(), targets, rng)
        supervised = np.flatnonzero(np.diff(np.r_[0, np.array(ex["labels"]) != -100, 0]))
        runs = list(zip(supervised[::2], supervised[1::2]))
        want = [f" {t.assistant}" + "".join("".join(signal_token_names(m.modality)) for m in
                                          train_nextgpt.made_media(t)) + "\n###" for t in turns]
        assert [tok.decode(ex["ids"][a:b]) for a, b in runs] == want
        assert [b - a for a, b in runs] == [len(tok.encode(w, add_bos=False)) for w in want]
        assert all(ex["labels"][i] == ex["ids"][i] for a, b in runs for i in range(a, b))


def test_stage_two_quiet_share_shows_media_and_makes_none():
    """Stage 2's `quiet` share: a shown medium answered by its caption alone; the rest make a medium
    from a request; quiet = 0 draws nothing but make-requests (the toy recipe, as NExT-GPT's stage 2)."""
    rng = np.random.default_rng(4)
    drawn = [train_nextgpt.stage_turn(2, rng, quiet=0.25)[0] for _ in range(400)]
    quiet = [t for t in drawn if not train_nextgpt.made_media(t)]
    assert 0.18 < len(quiet) / len(drawn) < 0.32
    assert all(t.kind.startswith("describe_") and t.user_media is not None and t.user_media.obj.colour
               in t.assistant for t in quiet if t.user_media.modality != "audio")
    loud = [t for t in drawn if train_nextgpt.made_media(t)]
    assert all(t.user_media is None and t.kind.startswith("make_") for t in loud)
    plain = [train_nextgpt.stage_turn(2, rng)[0] for _ in range(100)]
    assert all(train_nextgpt.made_media(t) for t in plain)
    assert train_nextgpt.RECIPES["nextgpt"].quiet == 0


def test_start_at_words_points_each_soft_token_at_its_own_words(trained):
    """After start_at_words, each medium's soft token is nearer (cosine) to the LLM's embedding of its
    own attribute words than to any other medium's, at a token row's norm. The bank is synthetic (a
    centre per medium, a little noise): random stand-in encoders barely tell the media apart."""
    _, root, _ = trained
    model, _ = train_nextgpt.build(root, decoders=False)
    gen = torch.Generator().manual_seed(0)
    keys = [(m, o, None) for m in ("image", "audio") for o in world.train_combinations()]
    width = model.llama_proj.in_features
    bank = {k: torch.randn(width, generator=gen) + 0.05 * torch.randn(3, width, generator=gen) for k in keys}
    train_nextgpt.start_at_words(model, bank)
    llm, tok = model.llama_model, model.tokenizer
    words = torch.stack([llm.embed(torch.tensor(tok.encode(" " + world.Media(*k).attributes(), add_bos=False)))
                         .mean(0) for k in keys])
    soft = torch.stack([model.llama_proj(bank[k])[:, 0].mean(0) for k in keys])
    similarity = torch.nn.functional.normalize(soft, dim=-1) @ torch.nn.functional.normalize(words, dim=-1).T
    assert (similarity.argmax(1) == torch.arange(len(keys))).all()
    rows = llm.model.embed_tokens.weight[:model.first_new_id].norm(dim=-1).mean()
    torch.testing.assert_close(soft.norm(dim=-1).mean(), rows, rtol=0.1, atol=0)


def test_distance_loss_is_mean_euclidean_not_squared(trained):
    _, root, _ = trained
    model, _ = train_nextgpt.build(root)
    hidden = torch.randn(2, 12, model.llama_model.config.hidden_size)
    target = torch.randn(1, EMBED_DIM)
    loss = train_nextgpt.distance_loss(model, [("audio", hidden[1, 3:11], target)])
    ids = torch.tensor(model.signal_ids["audio"])
    pred = model.output_projection("audio")(hidden[1:, 3:11], model.llama_model.embed(ids)[None])
    torch.testing.assert_close(loss, torch.sqrt(((pred[0] - target) ** 2).sum(-1)).mean())


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the toy NExT-GPT is not trained yet")
def test_shipped_toy_nextgpt_answers_and_asks_for_media():
    model = NextGPT.from_preset("toy")
    rng = np.random.default_rng(7)
    right = 0
    for _ in range(4):
        t = world.turn("describe_image", rng, "test", "train")
        reply = eval_nextgpt.respond(model, [t], rng)
        right += checkers.check_text(reply.text, want=t.user_media).ok and eval_nextgpt.signals_ok(model, reply, None)
    assert right >= 3
    made = 0
    for kind, shape in (("make_image", (1, 16, 64)), ("make_video", (1, 16, 64)), ("make_audio", (1, EMBED_DIM))):
        t = world.turn(kind, rng, "test", "train")      # held-out instructions
        reply = eval_nextgpt.respond(model, [t], rng)
        made += eval_nextgpt.signals_ok(model, reply, t.assistant_media.modality) and \
            reply.conditioning[0][1].shape == shape
    assert made == 3


def test_stage3_fillers_come_from_the_training_phrasings_only():
    fillers = train_nextgpt.filler_words()
    assert fillers and set(fillers) <= set(train_nextgpt.FILLERS)
    # no held-out instruction is a training one with filler words put in
    bare = lambda t: " ".join(x for x in t.split() if x not in fillers)  # noqa: E731
    for options in world.INSTRUCTIONS.values():
        train = {bare(t) for t in world._templates(options, "train")}
        assert not train & {bare(t) for t in world._templates(options, "test")}, options
    rng = np.random.default_rng(0)
    texts = [train_nextgpt.add_fillers("draw a red circle.", rng, p=1.0) for _ in range(20)]
    for text in texts:
        extra = text.split()
        for word in "draw a red circle.".split():
            extra.remove(word)
        assert 1 <= len(extra) <= 2 and set(extra) <= set(fillers), text


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the toy NExT-GPT is not trained yet")
def test_chat_samples_each_decoder_with_its_own_defaults_and_honours_zero():
    """`chat` (what `minignext chat` and the demo run) uses each decoder's sampling.json, the same
    settings the quality table is measured with; an explicit guidance_scale=0.0 is a value."""
    model = NextGPT.from_preset("toy")
    calls = []

    class Recorder:             # stands in front of a pipeline and notes how it is called
        def __init__(self, modality, pipe):
            self.modality, self.pipe = modality, pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, **kw):
            calls.append((self.modality, kw["guidance_scale"], kw["num_inference_steps"]))
            return self.pipe(**kw)

    for modality in ("image", "audio"):
        decoder = model.decoder(modality)
        decoder.pipeline = Recorder(modality, decoder.pipeline)
    sounds = "".join(signal_token_names("audio"))
    pictures = "".join(signal_token_names("image"))
    model.chat("play a deep tone.", force_response=f"here it is. {sounds}", progress=False)
    model.chat("draw a red circle.", force_response=f"here it is. {pictures}", progress=False)
    model.chat("play a deep tone.", force_response=f"here it is. {sounds}", guidance_scale=0.0,
               num_inference_steps=3, progress=False)
    folder = SHIPPED.parent.parent
    audio = json.loads((folder / "audio_decoder" / "sampling.json").read_text())
    image = json.loads((folder / "image_decoder" / "sampling.json").read_text())
    assert audio["guidance_scale"] != image["guidance_scale"]          # else this test proves nothing
    assert calls == [("audio", audio["guidance_scale"], audio["num_inference_steps"]),
                     ("image", image["guidance_scale"], image["num_inference_steps"]),
                     ("audio", 0.0, 3)]


def test_micro_batches_give_the_one_batch_loss(trained):
    """Length-sorted micro-batches (the smol recipe's) change the padding, not the loss."""
    _, root, _ = trained
    model, texts = train_nextgpt.build(root)
    rng = np.random.default_rng(3)
    bank = train_nextgpt.media_bank(model.visual_encoder, ("image", "audio", "video"), rng, "train", 1)
    targets = train_nextgpt.caption_targets(texts)
    examples = [train_nextgpt.encode_dialogue(model, train_nextgpt.stage_turn(3, rng, mosit=0.5), bank, targets, rng)
                for _ in range(6)]
    whole = train_nextgpt.loss_fn(model, examples)
    parts = train_nextgpt.loss_fn(model, examples, max_tokens=2 * min(len(e["ids"]) for e in examples))
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stage_three_dialogues_run_as_long_as_the_recipe_says():
    """The toy recipe's stage 3 holds dialogues of 1..8 turns, as long as the demo's seven and users'
    conversations, with questions about the first medium six turns back; the default stays 1..3."""
    recipe, rng = train_nextgpt.RECIPES["nextgpt"], np.random.default_rng(5)
    long = [train_nextgpt.stage_turn(3, rng, recipe.mosit, recipe.quiet, recipe.max_turns) for _ in range(400)]
    assert {len(d) for d in long} == set(range(1, recipe.max_turns + 1)) and recipe.max_turns >= 7
    assert any(t.kind.startswith("ask_first") for d in long for t in d[6:])
    assert max(len(train_nextgpt.stage_turn(3, rng)) for _ in range(200)) == 3
