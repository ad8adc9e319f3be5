"""The toy AnyGPT's recipe on random stand-ins (each stage trains its own part; the folder loads through
AnyGPT.from_pretrained), its supervised tokens per turn, and the shipped toy AnyGPT when present."""

import numpy as np
import pytest
import torch

from minignext.systems.anygpt import AnyGPT
from minignext.tokenizer import VICUNA_V0, Tokenizer
from minignext.toy import eval_anygpt, family, train_anygpt, world
from minignext.toy.trainer import RunArgs, read_loss_log

SHIPPED = train_anygpt.OUT_DIR / family.TRAINING_RECORD


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anygpt")
    root = train_anygpt.random_foundations(tmp / "foundations")
    args = RunArgs(scale=0.002, resume=False, progress=False, runs_dir=tmp / "runs")
    summary = train_anygpt.train(args, out_dir=tmp / "out", root=root, bank_per_key=1)
    return tmp, root, summary


def test_each_stage_trains_its_part_and_the_folder_loads(trained):
    tmp, root, summary = trained
    torch.manual_seed(RunArgs().seed_of("anygpt_image_tokenizer/init"))
    start_vq = train_anygpt.VQModel(train_anygpt.image_tokenizer_config())
    torch.manual_seed(RunArgs().seed_of("anygpt_audio_tokenizer/init"))
    start_codec = train_anygpt.new_audio_tokenizer()
    start = train_anygpt.build(root, start_vq, start_codec, RunArgs().seed_of("anygpt_llm/new-rows"))
    model, generation = train_anygpt.load(tmp / "out")
    assert isinstance(model, AnyGPT) and set(generation) == {"text", "image", "music"}
    for before, after in ((start.llm, model.llm), (start_vq, model.image_tokenizer),
                          (start_codec.codec, model.music_tokenizer.codec)):
        a, b = before.state_dict(), after.state_dict()
        assert a.keys() == b.keys()
        moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k].half(), b[k].half())]
        assert len(moved) > len(a) / 2, (type(before).__name__, sorted(set(a) - set(moved)))
    new = start.tokenizer.vocab_size - Tokenizer.from_pretrained(root / "llm").vocab_size
    embed = model.llm.model.embed_tokens.weight
    assert embed.shape[0] == model.tokenizer.vocab_size == start.llm.config.vocab_size
    assert not torch.equal(embed[-new:].half(), start.llm.model.embed_tokens.weight[-new:].half())
    assert model.vocab.first == start.vocab.first and model.vocab.config == start.vocab.config
    for part, stage in summary["stages"].items():
        log = read_loss_log(f"anygpt_{part}-seed0-scale0.002", runs_dir=tmp / "runs")
        assert len(log) == stage["steps"] and all(np.isfinite(r["loss"]) for r in log)
    record = family.training_record(tmp / "out")
    assert record["examples"] == summary["stages"]["llm"]["steps"] * train_anygpt.SCHEDULE["llm"]["batch"]
    assert summary["megabytes"] < 8


def test_supervised_tokens_per_turn_are_the_answer_only(trained):
    _, root, _ = trained
    model = train_anygpt.build(root)
    tok, rng = model.tokenizer, np.random.default_rng(0)
    spans = {"image": model.vocab.to_ids("image", torch.zeros(16, dtype=torch.long)),
             "audio": model.vocab.to_ids("music", torch.zeros(2, 16, dtype=torch.long))}
    for kind in train_anygpt.KINDS:
        t = world.turn(kind, rng, "train", "train")
        user = spans[t.user_media.modality] if t.user_media else None
        answer = spans[t.assistant_media.modality] if t.assistant_media else None
        ids, labels = train_anygpt.encode_turn(tok, t, user, answer)
        prompt = train_anygpt.prompt_ids(tok, t.user, user)
        assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [-100] * len(prompt)
        supervised = labels[len(prompt):]
        assert -100 not in supervised and supervised == ids[len(prompt):]
        words = tok.encode(f" {t.assistant}", add_bos=False)
        assert len(supervised) == len(words) + len(answer or []) + len(tok.encode(VICUNA_V0.sep, add_bos=False)) + 1
        assert supervised[-1] == train_anygpt.stop_id(tok)
        assert model.vocab.split(ids)                   # every span in the example is well formed


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the toy AnyGPT is not trained yet")
def test_shipped_toy_anygpt_answers_in_words_and_well_formed_pictures():
    """What the shipped toy does reliably: it names what it was asked to draw and writes one whole picture
    span, and it describes a picture in words alone. How often the picture and the description are right
    is the family table's business (tests/test_toy_eval.py)."""
    model, generation = train_anygpt.load()
    named = 0
    for i, t in enumerate(family.shared_cases("text->image", quick=True)[:4]):
        reply = eval_anygpt.ask(model, generation, t.user, seed=i)
        images = [s for s in reply.segments if s.modality == "image"]
        assert reply.unfinished is None and len(images) == 1 and len(images[0].codes) == model.image_grid ** 2
        assert eval_anygpt.reply_media(reply, "image").shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        named += family.text_ok(t, eval_anygpt.reply_text(model, reply))
    assert named >= 3
    cases = family.shared_cases("image->text", quick=True)[:2]
    for t, x in zip(cases, family.inputs("image->text", cases)):
        reply = eval_anygpt.ask(model, generation, t.user, x, "image")
        assert [s.modality for s in reply.segments] == ["text"] and eval_anygpt.reply_text(model, reply)
    with pytest.raises(ValueError, match="together with its modality"):
        eval_anygpt.ask(model, generation, "what is this?", media=np.zeros((32, 32, 3), np.uint8))
