"""The toy MiniGPT-4's rows of the family table (minignext.toy.family): the shipped model answers the
shared held-out image cases through `MiniGPT4.chat`, the public chat of the official demo (its
Vicuna-v0 conversation, without its system sentence for the toy; "###" as the stop string), and the
analytic checker judges the answers.

`family_row` is the shipped 8-query model's row; `row(cases, queries, name)` gives the row of any query
count trained (the lesson's ablation: `python -m minignext.toy.train minigpt4-1q`, `minigpt4-4q`).

    python -m minignext.toy.eval family
"""

import numpy as np

from minignext import weights
from minignext.toy import family
from minignext.toy.train_minigpt4 import BLIP2_FILE, CHECKPOINT_FILE, QUERIES, folder_for, load

MAX_NEW_TOKENS = 24


def answers(model, tokenizer, turns, images) -> list[str]:
    return [model.chat(tokenizer, image, t.user, max_new_tokens=MAX_NEW_TOKENS, progress=False)
            for t, image in zip(turns, images)]


def trainable(folder) -> int:
    """What the toy recipe trained, all of it in its two files: the Q-Former's pretraining (ln_vision, the
    query tokens, the Q-Former with its text side, the ITC/ITM heads and the temperature) and llama_proj.
    The ViT and the LLM stay frozen."""
    return sum(t.numel() for name in (BLIP2_FILE, CHECKPOINT_FILE)
               for t in weights.load_safetensors(folder / name).values())


def row(cases, queries, name) -> family.Row:
    """The row of the model with `queries` queries; it sees images only, so of `cases` it answers image->text."""
    folder = folder_for(queries)
    model, tokenizer = load(folder)
    accuracy = {}
    if turns := cases.get("image->text"):
        said = answers(model, tokenizer, turns, family.inputs("image->text", turns))
        accuracy["image->text"] = (float(np.mean([family.text_ok(t, a) for t, a in zip(turns, said)])), len(turns))
    record = family.training_record(folder)
    return family.Row(name, f"frozen ViT -> Q-Former ({queries} learned {'query' if queries == 1 else 'queries'}) "
                            f"-> Linear", str(queries), trainable(folder), record.get("minutes"),
                      record.get("examples"), accuracy)


def family_row(cases):
    return row(cases, QUERIES, "MiniGPT-4")
