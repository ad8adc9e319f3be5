"""The toy AnyGPT (minignext/toy/train_anygpt.py) measured through its own `AnyGPT.generate`.

A question becomes one Vicuna-v0 user turn whose medium, if any, is its token span (the tokenizers'
codes between <soim>/<eoim> or <somu>/<eomu>); the LLM answers in words and, where asked, a media span
of its own, sampled at the temperature generation.json sets for that modality, which the tokenizers'
decoders turn back into an image or a sound for the checkers.

    python -m minignext.toy.eval anygpt [--quick]      (its row of the family table)
"""

import numpy as np
import torch

from minignext.systems.anygpt import AnyGPT, AnyGPTReply
from minignext.toy import family, world
from minignext.toy.train_anygpt import MODALITY, OUT_DIR, load, media_tensor, prompt_ids, stop_id

MAX_NEW_TOKENS = 160          # words, a media span and the closing "###"


def ask(model: AnyGPT, generation: dict, text: str, media=None, modality=None, seed=0) -> AnyGPTReply:
    """One question to the toy AnyGPT: `text`, with one rendered medium of the world (uint8 image
    (H, W, 3) or waveform) of `modality` ("image" or "audio") if given."""
    if (media is None) != (modality is None):
        raise ValueError("give a medium together with its modality ('image' or 'audio'), or neither")
    if modality is not None and modality not in MODALITY:
        raise ValueError(f"the toy AnyGPT reads {sorted(MODALITY)}; got {modality!r}")
    span = None if media is None else model.media_ids(MODALITY[modality], media_tensor(modality, media))[0]
    temperatures = {name: g["temperature"] for name, g in generation.items()}
    return model.generate(prompt_ids(model.tokenizer, text, span), MAX_NEW_TOKENS, temperature=temperatures,
                          seed=seed, stop_token_ids=[stop_id(model.tokenizer)])


def reply_text(model: AnyGPT, reply: AnyGPTReply) -> str:
    """The words of a reply, without the "###" that ends it."""
    text = "".join(s.text for s in reply.segments if s.modality == "text")
    return text.removesuffix(model.tokenizer.decode([stop_id(model.tokenizer)])).strip()


def picture(image: torch.Tensor) -> np.ndarray:
    """A decoded image (3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1], as the checkers and imshow take it."""
    return ((image.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def reply_media(reply: AnyGPTReply, modality: str):
    """The first medium of a world modality in a reply, as the checkers take it (an image (H, W, 3) in
    [0, 1], a waveform at world.SAMPLE_RATE), or None."""
    for s in reply.segments:
        if s.modality == MODALITY[modality] and s.media is not None:
            return picture(s.media) if modality == "image" else s.media[0].float().numpy()
    return None


def trainable_parameters(model: AnyGPT) -> dict:
    """What the toy's training changed: all of the LLM, and the two tokenizers it trained first."""
    return {name: sum(p.numel() for p in part.parameters())
            for name, part in (("llm", model.llm), ("image tokenizer", model.image_tokenizer),
                               ("audio tokenizer", model.music_tokenizer))}


@torch.no_grad()
def family_row(cases, folder=None):
    """AnyGPT's row of the family table (minignext.toy.family): every direction but video's."""
    model, generation = load(folder or OUT_DIR)
    accuracy = {}
    for direction, turns in cases.items():
        if "video" in direction:
            continue
        right = []
        for i, (t, x) in enumerate(zip(turns, family.inputs(direction, turns))):
            modality = None if t.user_media is None else t.user_media.modality
            reply = ask(model, generation, t.user, x, modality, seed=i)
            if direction.endswith("->text"):
                right.append(family.text_ok(t, reply_text(model, reply)))
            else:
                right.append(family.media_ok(t, reply_media(reply, t.assistant_media.modality)))
        accuracy[direction] = (float(np.mean(right)), len(turns))
    sizes = trainable_parameters(model)
    record = family.training_record(folder or OUT_DIR)
    grid = model.image_grid
    audio = model.music_tokenizer
    frames = int(world.AUDIO_SECONDS * audio.config.sampling_rate / np.prod(audio.config.upsampling_ratios))
    books = model.vocab.config.music_codebook_num
    return family.Row("AnyGPT", "none: media are discrete codes in the LLM's vocabulary (VQ image tokenizer, "
                      "mel codec for sounds)", f"image {grid * grid}, audio {books * frames} ({books} x {frames})",
                      sum(sizes.values()), record.get("minutes"), record.get("examples"), accuracy,
                      notes=", ".join(f"{k} {v:,}" for k, v in sizes.items()) + "; video out of scope")


def evaluate(quick=False, **_):
    return family.evaluate(quick, systems=["AnyGPT"])
