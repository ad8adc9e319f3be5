"""PandaGPT's one stage on the toy foundations: a tiny run on random stand-ins (what it trains, the
release's delta and its reload), the supervised tokens of its training data against the prompt
chat() builds, and the shipped toy PandaGPT."""

import numpy as np
import pytest
import torch

from minignext import weights
from minignext.lora import lora_parameters
from minignext.systems.nextgpt import Conversation
from minignext.systems.pandagpt import LORA_ALPHA, LORA_R, expected_delta, read_delta
from minignext.toy import checkers, family, train_nextgpt, train_pandagpt, world
from minignext.toy.mllm import image_dialogue
from minignext.toy.trainer import RunArgs

SHIPPED = train_pandagpt.OUT_DIR / "delta.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pandagpt")
    root = train_nextgpt.random_foundations(tmp / "foundations")
    summary = train_pandagpt.train(RunArgs(scale=0.004, resume=False, progress=False, runs_dir=tmp / "runs"),
                                   out_dir=tmp / "out", root=root, bank_per_key=1)
    return tmp, root, summary


def test_it_trains_llama_proj_and_lora_only_and_ships_the_release_delta(trained):
    tmp, root, summary = trained
    fresh = train_pandagpt.build(root)
    assert summary["trainable"] == sum(p.numel() for p in fresh.llama_proj.parameters()) + \
        sum(p.numel() for p in lora_parameters(fresh.llama_model).values())
    delta = weights.load_safetensors(tmp / "out" / "delta.safetensors")
    assert set(read_delta(tmp / "out" / "delta.safetensors")) == set(expected_delta(fresh, LORA_R))
    key = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    assert key in delta and delta[key].abs().sum() > 0                    # B starts at 0: it trained
    assert not torch.equal(delta["llama_proj.weight"], fresh.llama_proj.weight)
    record = family.training_record(tmp / "out")
    assert record["examples"] == summary["steps"] * train_pandagpt.STAGE["batch"] <= family.DATA_BUDGET

    model = train_pandagpt.load(tmp / "out", root)      # the base LLM + the merged LoRA + llama_proj
    base = weights.load_safetensors(root / "llm")
    a, b = delta[key.replace("lora_B", "lora_A")].float(), delta[key].float()
    torch.testing.assert_close(model.llama_model.model.layers[1].self_attn.v_proj.weight,
                               base["model.layers.1.self_attn.v_proj.weight"].float() + LORA_ALPHA / LORA_R * b @ a)
    untouched = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(model.llama_model.state_dict()[untouched], base[untouched].float())
    sound = (torch.from_numpy(world.render_audio(world.Obj("red", "circle"), 0)), world.SAMPLE_RATE)
    reply = model.chat(Conversation().user("what is this sound?", audio=sound), max_new_tokens=4, decode=False,
                       progress=False)
    assert isinstance(reply.text, str) and reply.prompt.soft_modalities == ["audio"]


def test_training_tokens_are_the_chat_prompt_and_supervise_each_answer(trained):
    """Per turn, exactly the answer and the "\\n###" after it are supervised, and the ids before each
    answer are those PandaGPT.build_prompt makes for the same conversation."""
    _, root, _ = trained
    model = train_pandagpt.build(root)
    tok, rng, seen = model.tokenizer, np.random.default_rng(1), set()
    for _ in range(12):
        turns = image_dialogue(rng)
        bank = {("image", turns[0].user_media.obj, None): torch.randn(2, model.llama_proj.in_features)}
        ex = train_pandagpt.encode_dialogue(tok, turns, bank, rng)
        labels = np.array(ex["labels"] + [-100])
        edges = np.flatnonzero(np.diff((labels != -100).astype(int)))
        runs = list(zip(edges[::2] + 1, edges[1::2] + 1))
        assert [tok.decode(ex["ids"][a:b]) for a, b in runs] == [f" {t.assistant}\n###" for t in turns]
        assert [b - a for a, b in runs] == [len(tok.encode(f" {t.assistant}\n###", add_bos=False)) for t in turns]
        (position, _), = ex["soft"]
        conv = Conversation()
        for t, (a, _) in zip(turns, runs):
            conv.user(t.user, image=np.zeros((32, 32, 3), np.uint8) if t.user_media is not None else None)
            conv.turns[0].soft[:] = [torch.zeros(1, model.llama_model.config.hidden_size)]   # no encoder pass
            prompt = model.build_prompt(conv)
            assert [0 if i == -1 else i for i in prompt.ids] == ex["ids"][:a]
            assert prompt.soft_positions == [position]
            conv.assistant(t.assistant)
        seen.add(len(turns))
    assert seen == {1, 2, 3}


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the toy PandaGPT is not trained yet")
def test_shipped_toy_pandagpt_describes_images_and_hears_zero_shot():
    model = train_pandagpt.load()
    rng = np.random.default_rng(5)
    turns = [world.turn("describe_image", rng, "test", "train") for _ in range(4)]
    said = train_pandagpt.answers(model, "image->text", turns)
    assert sum(checkers.check_text(a, want=t.user_media).ok for t, a in zip(turns, said)) >= 3, said
    heard = train_pandagpt.answers(model, "audio->text", [world.turn("describe_audio", rng, "test", "train")])
    assert heard[0]                                  # an answer, right or not: it never heard a sound
    record = family.training_record(train_pandagpt.OUT_DIR)
    assert record["examples"] <= family.DATA_BUDGET
    assert SHIPPED.stat().st_size < 5 * 2**20
