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
def test_shipped_toy_anygpt_draws_and_describes():
    model, generation = train_anygpt.load()
    cases = {d: family.shared_cases(d, quick=True)[:4] for d in ("text->image", "image->text")}
    right = 0
    for t in cases["text->image"]:
        reply = eval_anygpt.ask(model, generation, t.user, seed=0)
        right += family.media_ok(t, eval_anygpt.reply_media(reply, "image"))
    for t, x in zip(cases["image->text"], family.inputs("image->text", cases["image->text"])):
        reply = eval_anygpt.ask(model, generation, t.user, x, "image")
        right += family.text_ok(t, eval_anygpt.reply_text(model, reply))
    assert right >= 6
    with pytest.raises(ValueError, match="together with its modality"):
        eval_anygpt.ask(model, generation, "what is this?", media=np.zeros((32, 32, 3), np.uint8))
