"""The toy MiniGPT-4's recipe (minignext/toy/train_minigpt4.py) on random stand-ins of the foundations:
the ViT converted from ImageBind gives ImageBind's tokens, each stage trains what BLIP-2 and MiniGPT-4
train and nothing else, the files read back through MiniGPT4.from_official, the supervised tokens are
the answers'; and the shipped model answers held-out cases through its chat."""

import numpy as np
import pytest
import torch

from minignext import blip2 as b2
from minignext import weights
from minignext.systems import minigpt4 as mg
from minignext.toy import family, world
from minignext.toy import train_minigpt4 as T
from minignext.toy.train_nextgpt import random_foundations
from minignext.toy.trainer import RunArgs

TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return random_foundations(tmp_path_factory.mktemp("foundations"))


@pytest.fixture(scope="module")
def parts(root):
    ib_config, ib_state, llm_dir, text_tok = T.foundations(root)
    return ib_config, ib_state, llm_dir, text_tok


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([world.render_image(world.sample_object(rng), rng) for _ in range(n)])


def test_the_converted_vit_gives_imagebinds_tokens(parts):
    from minignext.imagebind import ImageBind

    ib_config, ib_state, _, _ = parts
    imagebind = weights.load_into(weights.build_on_meta(ImageBind, ib_config), ib_state, dtype=torch.float32).eval()
    x = T.pixels(images(3))
    torch.testing.assert_close(x, mg.preprocess_image(list(images(3)), ib_config.image_size))
    vit = {"visual_encoder." + k: t for k, t in T.eva_vit_state(ib_state).items()}
    trunk = imagebind.modality_trunks["vision"]
    with torch.no_grad():
        tokens = trunk.pre_transformer_layer(imagebind.modality_preprocessors["vision"](x))
        for blocks in (ib_config.vision_num_blocks, T.vision_config(ib_config).num_hidden_layers):
            model = b2.Blip2VisionModel(T.vision_config(ib_config, blocks)).eval()
            sd = {k[len("vision_model."):]: t for k, t in b2.from_lavis(vit).items()
                  if not k.startswith("vision_model.encoder.layers.") or int(k.split(".")[3]) < blocks}
            model.load_state_dict({**sd, "post_layernorm.weight": torch.ones(64), "post_layernorm.bias": torch.zeros(64)})
            got = model(x, output_hidden_states=True).hidden_states[-1]
            want = trunk.blocks[:blocks](tokens)
            torch.testing.assert_close(got, want, **TOL)
    assert T.vision_config(ib_config).num_hidden_layers == ib_config.vision_num_blocks - 1   # BLIP-2 drops EVA's last


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_each_stage_trains_what_blip2_and_minigpt4_train(parts, tmp_path):
    ib_config, ib_state, llm_dir, text_tok = parts
    args = RunArgs(scale=0.002, resume=False, progress=False, runs_dir=tmp_path / "runs")
    config = T.blip2_config(T.vision_config(ib_config), text_tok.tokenizer.get_vocab_size(), text_tok.model_max_length, 4)
    vit = T.eva_vit_state(ib_state)
    blip2 = T.build_qformer(config, vit, args.generator("init"))
    assert not torch.equal(blip2.query_tokens[0, 0], blip2.query_tokens[0, 1])     # queries start apart
    before = snapshot(blip2)
    run, temp = T.pretrain_qformer(blip2, text_tok, args, "qformer")
    assert run.total == args.steps(T.STAGES["qformer"]["steps"]) and {"itc", "itm"} <= set(run.history[-1])
    moved = changed(before, blip2)
    assert not any(k.startswith("vision_model.") and "post_layernorm" not in k for k in moved)   # the ViT is frozen
    assert {"vision_model.post_layernorm.weight", "query_tokens", "embeddings.word_embeddings.weight",
            "itm_head.weight", "vision_projection.weight", "text_projection.weight"} <= moved
    assert any(k.startswith("qformer.encoder.layer.") for k in moved)

    saved = T.blip2_state(blip2, temp)
    assert {k.split(".")[0] for k in saved} == {"ln_vision", "Qformer", "query_tokens", "vision_proj", "text_proj",
                                                "itm_head", "temp"}
    meta = {"vision_config": T.dataclasses.asdict(config.vision_config),
            "qformer_config": T.dataclasses.asdict(config.qformer_config), "num_query_token": 4}
    proj = torch.nn.Linear(64, weights.read_config(llm_dir)["hidden_size"])
    model = T.assemble(meta, vit, saved, {f"llama_proj.{k}": v for k, v in proj.state_dict().items()}, llm_dir)
    with torch.no_grad():
        x = T.pixels(images(2))
        torch.testing.assert_close(model.encode_image(x), proj(b2.query_features(blip2.vision_model, blip2.query_tokens,
                                                                                 blip2.qformer, x)[1]), **TOL)
    folder = T.save(tmp_path / "minigpt4", model, saved, meta, root=llm_dir.parent)       # and back, as shipped
    shipped, tok = T.load(folder)
    retrieval, temp_back, _ = T.load_retrieval(folder)
    with torch.no_grad():
        torch.testing.assert_close(shipped.encode_image(x), model.encode_image(x), atol=0.02, rtol=0.02)    # float16 files
        image = retrieval.vision_model(x).last_hidden_state
        torch.testing.assert_close(retrieval.image_features(image), blip2.image_features(image), atol=0.02, rtol=0.02)
    torch.testing.assert_close(temp_back, temp.reshape(()), atol=1e-3, rtol=0)
    for stage in (1, 2):
        before = snapshot(model)
        T.train_projection(model, tok, stage, args, f"stage{stage}", T.curated_set(args))
        assert changed(before, model) == {"llama_proj.weight", "llama_proj.bias"}


def test_supervised_tokens_are_each_answers_tokens(parts):
    from minignext.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(parts[2])
    args = RunArgs(scale=0.002)
    for stage, (template, end) in ((1, ("{}", "\n")), (2, (T.PROMPT_TEMPLATE, "###"))):
        batch = T.stage_batch(args, stage, 0, 6, T.curated_set(args))
        for _, human, answer in batch:
            ex = mg.build_example(tok, [(human, answer)], 4, template, end)
            supervised = ex.labels != -100
            assert supervised.sum() == len(tok.encode(answer + end, add_bos=False))
            assert tok.decode(ex.input_ids[supervised]) == answer + end
            assert supervised.nonzero().min() > ex.image_mask.nonzero().max()      # only after the image
        if stage == 2:          # the tokens before the answer are those MiniGPT4.chat builds for the question
            assert human.startswith("<Img><ImageHere></Img> ") and answer.endswith(".")
            before, after = mg.chat_prompt(human.split("</Img> ", 1)[1], style=T.CHAT_STYLE).split(mg.IMAGE_PLACEHOLDER)
            prompt = tok.encode(before, add_bos=True) + [0] * 4 + tok.encode(after, add_bos=False)
            assert ex.input_ids[:supervised.nonzero().min()].tolist() == prompt


def test_a_qformer_batch_holds_distinct_objects():
    args = RunArgs()
    batch = T.qformer_batch(args, 3, 20)
    captions = [c for _, c in batch]
    objs = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    named = [next(o for o in objs if o[0] in cap and any(w in cap for w in world.SHAPE_WORDS[o[1]])) for cap in captions]
    assert len(set(named)) == 20
    assert T.qformer_batch(args, 3, 20)[0][1] == captions[0]                 # the step's stream: resumable
    with pytest.raises(ValueError, match="at most 21"):
        T.qformer_batch(args, 0, 22)


@pytest.mark.skipif(not (T.OUT_DIR / T.META_FILE).is_file(), reason="the toy MiniGPT-4 is not trained yet")
def test_the_shipped_toy_minigpt4_describes_held_out_cases():
    model, tok = T.load(T.OUT_DIR)
    trained = weights.load_safetensors(T.OUT_DIR / T.CHECKPOINT_FILE)
    assert set(trained) == {"llama_proj.weight", "llama_proj.bias"}
    assert sum(f.stat().st_size for f in T.OUT_DIR.glob("*.safetensors")) < 5 * 2**20
    assert family.training_record(T.OUT_DIR)["examples"] <= family.DATA_BUDGET
    cases = family.shared_cases("image->text", quick=True)[:6]
    said = [model.chat(tok, x, t.user, max_new_tokens=24, progress=False)
            for t, x in zip(cases, family.inputs("image->text", cases))]
    assert sum(family.text_ok(t, a) for t, a in zip(cases, said)) >= 5, said
