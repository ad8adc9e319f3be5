"""The toy NExT-GPT's quality table, measured through the public API: every answer comes from
`NextGPT.chat` (with decode=False, so that the media of many answers can be decoded in batches)
and every medium from `model.decoder(modality)` at that decoder's own sampling defaults, exactly
as `minignext chat` and `minignext demo` run them. The analytic checkers judge the results.

    python -m minignext.toy.eval nextgpt
"""

import numpy as np
import torch

from minignext.systems.nextgpt import Conversation, signal_token_names
from minignext.toy import checkers, world
from minignext.toy.trainer import TOY_DIR

EVAL_N = {"describe": 48, "describe_video": 32, "make": 48, "make_video": 32, "cross": 40, "chat": 24, "held": 12}


def load(folder=None):
    from minignext.systems.nextgpt import NextGPT

    return NextGPT.from_pretrained(folder or TOY_DIR / "nextgpt", dtype=torch.float32)


def source(m: world.Media, rng):
    """A rendered medium in the form NextGPT.encode takes (PIL image, (waveform, rate), frames)."""
    from PIL import Image

    x = m.render(rng)
    if m.modality == "image":
        return Image.fromarray(x)
    return (torch.from_numpy(x), world.SAMPLE_RATE) if m.modality == "audio" else x


def conversation(turns, rng) -> Conversation:
    """World turns as a Conversation; the earlier answers as the data has them, signal tokens included."""
    conv = Conversation()
    for t in turns:
        m = t.user_media
        conv.user(t.user, **({m.modality: [source(m, rng)]} if m is not None else {}))
        if t is not turns[-1]:
            made = t.assistant_media
            conv.assistant(t.assistant + ("".join(signal_token_names(made.modality)) if made else ""))
    return conv


def respond(model, turns, rng, max_new_tokens=64):
    """The model's reply to the last of `turns`, media projected but not decoded."""
    return model.chat(conversation(turns, rng), max_new_tokens=max_new_tokens, decode=False, progress=False)


def signals_ok(model, reply, modality) -> bool:
    """The LLM generated exactly one complete, in-order run of `modality` (None: no signal token)."""
    owner = {t: m for m, ids in model.signal_ids.items() for t in ids}
    found = [t for t in reply.generated_ids if t in owner]
    return not found if modality is None else found == model.signal_ids[modality]


@torch.no_grad()
def decode(model, modality, conds, seed, batch=32) -> list:
    """Media for a list of conditionings, in batches, through the model's own decoder."""
    decoder, out = model.decoder(modality), []
    for i in range(0, len(conds), batch):
        out += decoder.generate(torch.cat(conds[i:i + batch]), seed=seed + i, progress=False)
    return out


def judge(sample, want: world.Media) -> bool:
    if want.modality == "image":
        return checkers.check_image(sample, want=want.obj).ok
    if want.modality == "audio":
        return checkers.check_audio(sample[0], want=want.obj).ok
    return checkers.check_video(sample, want={"colour": want.obj.colour, "direction": want.direction}).ok


def evaluate(quick=False, seed=1234, folder=None) -> list:
    """The quality table on held-out prompts (test phrasings), judged by minignext.toy.checkers."""
    from minignext.toy.eval import Metric

    model = load(folder)
    n = {k: (6 if quick else v) for k, v in EVAL_N.items()}
    rng = np.random.default_rng(seed)
    metrics, sig_media, sig_text = [], [], []

    def turns_of(kind, count, split="train"):
        return [[world.turn(kind, rng, "test", split)] for _ in range(count)]

    def describe(modality, count, split="train", threshold=None, name=None):
        right = 0
        for turns in turns_of(f"describe_{modality}", count, split):
            reply = respond(model, turns, rng)
            right += checkers.check_text(reply.text, want=turns[-1].user_media).ok
            sig_text.append(signals_ok(model, reply, None))
        metrics.append(Metric(name or f"{modality} -> text", right / count, threshold, count,
                              "attribute accuracy" + ("" if split == "train" else ", held-out pairs")))

    def make(kind, count, split="train", threshold=None, name=None):
        pending, right = {}, 0
        for turns in turns_of(kind, count, split):
            want = turns[-1].assistant_media
            reply = respond(model, turns, rng)
            ok = signals_ok(model, reply, want.modality)
            sig_media.append(ok)
            if ok:
                pending.setdefault(want.modality, []).append((reply.conditioning[0][1], want))
        for modality, items in pending.items():
            samples = decode(model, modality, [c for c, _ in items], seed)
            right += sum(judge(s, w) for s, (_, w) in zip(samples, items))
        metrics.append(Metric(name or kind.replace("make_", "text -> ").replace("_to_", " -> "), right / count,
                              threshold, count, "checker-judged" + ("" if split == "train" else ", held-out pairs")))

    describe("image", n["describe"], threshold=0.95)
    describe("audio", n["describe"], threshold=0.95)
    describe("video", n["describe_video"], threshold=0.90)
    make("make_image", n["make"], threshold=0.90)
    make("make_audio", n["make"], threshold=0.90)
    make("make_video", n["make_video"], threshold=0.85)
    make("image_to_audio", n["cross"], threshold=0.85)
    make("audio_to_image", n["held"])
    for turns in [[world.turn("chat", rng, "test", "train")] for _ in range(n["chat"])]:
        sig_text.append(signals_ok(model, respond(model, turns, rng), None))
    metrics.append(Metric("signal tokens emitted correctly when media are requested", float(np.mean(sig_media)),
                          0.98, len(sig_media), "one complete, in-order run of the right modality"))
    metrics.append(Metric("no signal tokens in text-only answers", float(np.mean(sig_text)), 0.98, len(sig_text)))
    describe("image", n["held"], "heldout", name="image -> text, held-out colour-shape pairs")
    make("make_image", n["held"], "heldout", name="text -> image, held-out colour-shape pairs")
    make("image_to_audio", n["held"], "heldout", name="image -> audio, held-out pairs")
    right = 0
    for _ in range(n["held"]):
        first = world.turn("describe_image", rng, "test", "train")
        follow = world.turn("ask_first_colour", rng, "test", "train", first=first.user_media, last=first.user_media)
        right += checkers.check_text(respond(model, [first, follow], rng).text,
                                     want={"colour": first.user_media.obj.colour}).ok
    metrics.append(Metric("follow-up: colour of the first image", right / n["held"], None, n["held"]))
    return metrics


def family_row(cases):
    """NExT-GPT's row of the family table (minignext.toy.family), through chat like every user."""
    from PIL import Image

    from minignext import weights
    from minignext.toy import family

    folder = TOY_DIR / "nextgpt"
    model = load(folder)
    accuracy = {}
    for direction, turns in cases.items():
        replies = []
        for t, x in zip(turns, family.inputs(direction, turns)):
            attach = {} if x is None else {t.user_media.modality: [
                Image.fromarray(x) if t.user_media.modality == "image" else
                (torch.from_numpy(x), world.SAMPLE_RATE) if t.user_media.modality == "audio" else x]}
            replies.append(model.chat(Conversation().user(t.user, **attach), decode=False, progress=False))
        if direction.endswith("->text"):
            right = [family.text_ok(t, r.text) for t, r in zip(turns, replies)]
        else:
            want = turns[0].assistant_media.modality
            made = [r.conditioning[0][1] if signals_ok(model, r, want) else None for r in replies]
            samples = iter(decode(model, want, [c for c in made if c is not None], seed=0))
            right = [family.media_ok(t, next(samples) if c is not None else None) for t, c in zip(turns, made)]
        accuracy[direction] = (float(np.mean(right)), len(turns))
    delta = weights.load_safetensors(folder / "delta.safetensors")
    new_rows = model.llama_model.config.vocab_size - model.tokenizer.token_to_id("<Img>")   # the first added token
    grown = ("embed_tokens.weight", "lm_head.weight")
    trainable = sum(t[-new_rows:].numel() if k.endswith(grown) else t.numel() for k, t in delta.items())
    record = family.training_record(folder)
    return family.Row("NExT-GPT", "ImageBind vector -> Linear (signal tokens -> transformer -> decoder)", "1",
                      trainable, record.get("minutes"), record.get("examples"), accuracy)
