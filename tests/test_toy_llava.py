"""LLaVA's two stages on the toy foundations: ImageBind's vision trunk as a CLIP tower, a tiny run on
random stand-ins (what each stage trains; the release in the hub layout, read by minignext and by
transformers alike), the supervised tokens of its training data, and the shipped toy LLaVA."""

import dataclasses

import numpy as np
import pytest
import torch

from minignext import weights
from minignext.clip import CLIPVision
from minignext.imagebind import ImageBind
from minignext.systems.llava import IGNORE_INDEX, Llava
from minignext.systems.nextgpt import Conversation
from minignext.toy import checkers, family, train_llava, train_nextgpt, world
from minignext.toy.mllm import image_dialogue
from minignext.toy.train_imagebind import image_input
from minignext.toy.trainer import RunArgs

SHIPPED = train_llava.OUT_DIR / "config.json"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return train_nextgpt.random_foundations(tmp_path_factory.mktemp("foundations"))


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([world.render_image(world.sample_object(rng), rng) for _ in range(n)])


def runs_of(labels):
    """The contiguous supervised runs [a, b) of a label list."""
    out, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def test_the_tower_is_imagebinds_vision_trunk(root):
    """Rewritten into CLIP's names, ImageBind's trunk gives its own embedding back (with the head's
    projection), and LLaVA's features are its patch tokens one block before the last."""
    ib = ImageBind.from_pretrained(root / "imagebind", dtype=torch.float32)
    with torch.no_grad():
        for p in ib.parameters():
            p.add_(torch.randn_like(p) * 0.1)            # no LayerNorm at its identity, no bias at 0
    state = {k.removeprefix("vision_tower."): t for key, v in ib.state_dict().items()
             for k, t in train_llava.tower_key(key, v)}
    config = dataclasses.replace(train_llava.tower_config(ib.config), with_projection=True)
    tower = weights.load_into(weights.build_on_meta(CLIPVision, config),      # strict: every key, every shape
                              {**state, "visual_projection.weight": ib.modality_heads["vision"][2].weight})
    x = image_input(images(3))
    with torch.no_grad():
        out = tower(x, output_hidden_states=True)
        torch.testing.assert_close(torch.nn.functional.normalize(out.embeds, dim=-1), ib.embed("vision", x),
                                   rtol=0, atol=1e-5)
        trunk = ib.modality_trunks["vision"]
        h = trunk.pre_transformer_layer(ib.modality_preprocessors["vision"](x))
        for block in trunk.blocks[:-1]:
            h = block(h)
    torch.testing.assert_close(out.hidden_states[-2], h, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no square Conv2d"):
        train_llava.tower_config(dataclasses.replace(ib.config, kernel_size=(1, 4, 4)))


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava")
    args = RunArgs(scale=0.004, resume=False, progress=False, runs_dir=tmp / "runs")
    model = train_llava.build(root, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_llava.run_stage(model, 1, args)
    after_1 = {k: v.clone() for k, v in model.state_dict().items()}
    train_llava.run_stage(model, 2, args)
    out = train_llava.save(model, tmp / "out")
    return model, before, after_1, out


def test_stage_1_trains_the_projector_and_stage_2_the_llm_too(trained):
    model, before, after_1, _ = trained
    after_2 = model.state_dict()
    def changed(a, b):
        return {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}

    assert changed(before, after_1) == {"multi_modal_projector"}
    assert changed(after_1, after_2) == {"multi_modal_projector", "language_model"}
    llm = [k for k in after_2 if k.startswith("language_model.") and not torch.equal(after_1[k], after_2[k])]
    assert len(llm) == len([k for k in after_2 if k.startswith("language_model.")])     # every LLM tensor


def test_the_release_is_the_hub_layout(trained):
    """The saved folder loads through Llava.from_pretrained and, key for key, into transformers'
    LlavaForConditionalGeneration, with the same logits."""
    transformers = pytest.importorskip("transformers")
    model, _, _, out = trained
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    back = Llava.from_pretrained(out, dtype=torch.float32)
    ref, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                            output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, pixels = back.prompt(Conversation().user("what is in this picture?", image=images(1)[0]))
    with torch.no_grad():
        got = back(ids, pixels)
        torch.testing.assert_close(got, ref.eval()(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(got, model(ids, pixels), rtol=0, atol=0.05)       # the fp16 copy


def test_supervised_tokens_per_turn_are_the_answers(root):
    """Stage 1 supervises the caption and its newline; stage 2 each answer and its </s>, nothing else:
    counted per turn on the training data, in the ids chat() sends before each answer."""
    model = train_llava.build(root)
    tok, c = model.tokenizer, model.config
    rng = np.random.default_rng(0)
    for _ in range(6):
        ex = train_llava.example(model, 1, rng)
        (a, b), = runs_of(ex["labels"])
        assert ex["ids"][:a] == [tok.bos_id] + [c.image_token_index] * c.image_tokens and b == len(ex["ids"])
        assert tok.decode(ex["ids"][a:b]).endswith("\n") and ex["labels"][a:b] == ex["ids"][a:b]
    seen = set()
    for _ in range(12):
        turns = image_dialogue(rng)
        ex = train_llava.dialogue_example(model, turns, turns[0].user_media.render(rng))
        runs = runs_of(ex["labels"])
        assert [b - a for a, b in runs] == [len(tok.encode(f" {t.assistant}", add_bos=False)) + 1 for t in turns]
        assert [tok.decode(ex["ids"][a:b]) for a, b in runs] == [f" {t.assistant}</s>" for t in turns]
        conv = Conversation()
        for k, (t, (a, _)) in enumerate(zip(turns, runs)):
            conv.user(t.user, image=ex["image"] if k == 0 else None)
            assert model.prompt(conv)[0][0].tolist() == ex["ids"][:a]        # what chat() sends
            conv.assistant(t.assistant)
        seen.add(len(turns))
    assert seen == {1, 2, 3}


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the toy LLaVA is not trained yet")
def test_shipped_toy_llava_describes_images():
    model = train_llava.load()
    rng = np.random.default_rng(11)
    turns = [world.turn("describe_image", rng, "test", "train") for _ in range(6)]
    said = train_llava.answers(model, turns, [t.user_media.render(rng) for t in turns])
    assert sum(checkers.check_text(a, want=t.user_media).ok for t, a in zip(turns, said)) >= 5, said
    record = family.training_record(train_llava.OUT_DIR)
    assert record["examples"] <= family.DATA_BUDGET
    assert sum(p.stat().st_size for p in train_llava.OUT_DIR.iterdir()) < 5 * 2**20
