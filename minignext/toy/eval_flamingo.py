"""The toy Flamingo measured the way users run it: every answer comes from `OpenFlamingo.chat` on an
interleaved prompt of images (or videos, as frames) and text.

    describe   "### Human:<image> what do you see in this picture?\\n### Assistant:" -> the caption,
               on the world's held-out phrasings, judged by minignext.toy.checkers.
    few-shot   two images, each followed by a word that names one attribute (the colour, the shape, or
               through the world's mapping the pitch or contour of its sound; drawn per episode), then a
               third image: "<image>a deep.<|endofchunk|><image>a low.<|endofchunk|><image>" -> "a high."
               The third object differs from the examples in that attribute, so no word can be copied,
               and the image alone does not say which attribute is asked: a model that knew every
               attribute but chose which to name at random would be right a quarter of the time (the
               chance level); the same query with no examples measures what it does without them.

    python -m minignext.toy.eval flamingo
"""

import numpy as np
import torch

from minignext.systems.flamingo import END_OF_CHUNK
from minignext.tokenizer import VICUNA_V0
from minignext.toy import checkers, world
from minignext.toy.train_flamingo import NAMINGS, OUT_DIR, load, naming_chunk, video_frames

FEWSHOT_EPISODES = 48
SHOTS = 2
CHANCE = 1 / len(NAMINGS)
CONNECTOR = "perceiver resampler -> tanh-gated cross-attention before every 2nd LLM layer"


def stop_ids(model, tokenizer) -> list:
    """A reply ends at <|endofchunk|>, at </s>, or (in a dialogue) at the "###" of the next turn."""
    return [model.config.eoc_token_id, tokenizer.eos_id, tokenizer.token_to_id(VICUNA_V0.stop[0])]


def describe_items(medium, question) -> list:
    """A question about one image (uint8 (H, W, 3)) or video (uint8 (F, H, W, 3) frames, of which the
    model reads VIDEO_FRAMES) as chat items, in the toy LLM's Vicuna-v0 template with the medium where
    its corpus had it."""
    medium = video_frames(medium) if medium.ndim == 4 else medium
    return [VICUNA_V0.user.rstrip(), medium, f" {question}{VICUNA_V0.sep}{VICUNA_V0.assistant.rstrip()}"]


def describe(model, tokenizer, medium, question) -> str:
    reply = model.chat(tokenizer, describe_items(medium, question), max_new_tokens=32,
                       stop_token_ids=stop_ids(model, tokenizer), progress=False)
    return VICUNA_V0.cut(reply)


def naming_episode(rng, shots=SHOTS):
    """One few-shot episode on fresh renders of training objects: the chat items (`shots` examples,
    each an image and its word, then the query image), what the examples name and the query's word."""
    naming = NAMINGS[rng.integers(len(NAMINGS))]
    objs = world.train_combinations()
    examples, seen = [], set()
    for obj in (objs[i] for i in rng.permutation(len(objs))):
        if getattr(obj, naming) not in seen:
            examples.append(obj)
            seen.add(getattr(obj, naming))
    query = examples[shots]
    items = []
    for obj in examples[:shots]:
        items += [world.render_image(obj, rng), naming_chunk(getattr(obj, naming)) + END_OF_CHUNK]
    return items + [world.render_image(query, rng)], naming, getattr(query, naming)


def naming_answer(model, tokenizer, items) -> str:
    """The reply to a few-shot prompt, up to its first full stop (the frozen lm_head cannot end it)."""
    reply = model.chat(tokenizer, items, max_new_tokens=6, stop_token_ids=stop_ids(model, tokenizer), progress=False)
    return reply.split(".")[0] + "." if "." in reply else reply


def fewshot_accuracy(model, tokenizer, n=FEWSHOT_EPISODES, shots=SHOTS, seed=4321) -> float:
    """The share of `n` held-out episodes whose answer names the query's value of the asked attribute
    and no other value of it."""
    rng = np.random.default_rng([seed, shots])
    right = []
    for _ in range(n):
        items, naming, word = naming_episode(rng, shots)
        reply = naming_answer(model, tokenizer, items)
        right.append(checkers.check_text(reply, want={naming: word}).ok)
    return float(np.mean(right))


def family_row(cases):
    """The toy Flamingo's row of the family table (minignext.toy.family): image and video -> text
    through chat; the few-shot result goes in the notes."""
    from minignext.toy import family

    model, tokenizer = load()
    accuracy = {}
    for direction in ("image->text", "video->text"):
        turns = cases[direction]
        replies = [describe(model, tokenizer, x, t.user) for t, x in zip(turns, family.inputs(direction, turns))]
        accuracy[direction] = (float(np.mean([family.text_ok(t, r) for t, r in zip(turns, replies)])), len(turns))
    fewshot = fewshot_accuracy(model, tokenizer)
    record = family.training_record(OUT_DIR)
    notes = (f"few-shot: {100 * fewshot:.1f}% of {FEWSHOT_EPISODES} held-out {SHOTS}-shot episodes (which attribute "
             f"of an image to name is given only by the prompt's examples; chance {100 * CHANCE:.0f}%)")
    tokens = f"{model.config.perceiver_num_latents} latents, cross-attended (none in the token stream)"
    return family.Row("Flamingo", CONNECTOR, tokens, record.get("trainable", 0), record.get("minutes"),
                      record.get("examples"), accuracy, notes)


@torch.no_grad()
def evaluate(quick=False, seed=1234) -> list:
    """The toy Flamingo's quality table: describing (held-out phrasings), the first image recalled
    after a second one, and the few-shot task against its chance levels."""
    from minignext.toy.eval import Metric

    model, tokenizer = load()
    rng = np.random.default_rng(seed)
    n = 8 if quick else 48
    metrics = []
    for kind, threshold in (("describe_image", 0.9), ("describe_video", 0.9)):
        turns = [world.turn(kind, rng, "test", "train") for _ in range(n)]
        right = [checkers.check_text(describe(model, tokenizer, t.user_media.render(rng), t.user), want=t.user_media).ok
                 for t in turns]
        metrics.append(Metric(f"{kind.split('_')[1]} -> text", float(np.mean(right)), threshold, n,
                              "held-out phrasings"))
    episodes = 16 if quick else FEWSHOT_EPISODES
    for shots in (2, 1, 0):
        metrics.append(Metric(f"few-shot naming, {shots} examples", fewshot_accuracy(model, tokenizer, episodes, shots),
                              0.8 if shots == SHOTS and not quick else None, episodes, f"chance {100 * CHANCE:.0f}%"))
    return metrics
