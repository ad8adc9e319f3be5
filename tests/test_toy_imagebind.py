"""The toy ImageBind: inputs prepared like NExT-GPT's encoder_input, a tiny training run, and the
shipped weights through ImageBind.from_pretrained."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minignext import media
from minignext.clip import CLIPTokenizer
from minignext.imagebind import ImageBind
from minignext.systems.nextgpt import encoder_input
from minignext.toy import train_imagebind as tib
from minignext.toy import world
from minignext.toy.trainer import RunArgs, read_loss_log

SHIPPED = tib.OUT_DIR


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return tib.ImageBind(tib.model_config(tib.build_tokenizer())).eval()


def test_training_inputs_match_encoder_input(tiny_model):
    """The shortcuts used in training give what encoder_input gives NExT-GPT."""
    rng = world.make_rng(0)
    obj = world.Obj("cyan", "triangle")
    img = world.render_image(obj, rng)
    torch.testing.assert_close(tib.image_input(img[None]), encoder_input(tiny_model, "image", Image.fromarray(img)))
    vid = world.render_video(obj, "up", rng)
    clips = encoder_input(tiny_model, "video", vid)
    assert clips.shape == (1, 15, 3, 2, 32, 32)
    torch.testing.assert_close(tib.video_input(vid[None])[0, 0], clips[0, 0])
    with torch.inference_mode():
        torch.testing.assert_close(tiny_model.embed("vision", tib.video_input(vid[None])),
                                   tiny_model.embed("vision", clips), atol=1e-5, rtol=1e-5)
    sound = world.render_audio(obj, rng)
    full = encoder_input(tiny_model, "audio", (torch.from_numpy(sound)[None], world.SAMPLE_RATE))
    assert full.shape == (1, 3, 1, 128, 100)
    for clip in full[0]:
        torch.testing.assert_close(tib.audio_input(sound)[0], clip)


def test_tokenizer_ends_on_the_largest_id(tiny_model):
    tok = tib.build_tokenizer()
    ids = tok(["a red circle", "a green plus sign moving to the left"])
    assert ids.shape == (2, tib.CONTEXT_LENGTH)
    ends = [row.index(tok.eos_token_id) for row in ids.tolist()]
    assert ids.argmax(-1).tolist() == ends == [4, 9]
    assert tok.tokenizer.get_vocab_size() == tiny_model.config.vocab_size
    assert tok.tokenizer.token_to_id(tib.UNK) not in ids.tolist()[1]     # every word is known
    for captions in (tib.class_captions("video")[0], tib.class_captions("audio", "train")[0]):
        assert (tok(captions) != tok.tokenizer.token_to_id(tib.UNK)).all()


def test_info_nce_counts_same_class_pairs_as_positives():
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 2])
    loss = tib.info_nce(emb, emb, labels, torch.tensor(10.0))
    logits = 10 * emb @ emb.T
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    by_hand = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, by_hand)


def test_tiny_training_run_saves_a_loadable_model(tmp_path):
    args = RunArgs(scale=0.003, resume=False, progress=False, runs_dir=tmp_path / "runs")
    summary = tib.train(args, out_dir=tmp_path / "ib")
    assert summary["model"]["steps"] == args.steps(tib.SCHEDULE["steps"]) == 4
    log = read_loss_log("imagebind-seed0-scale0.003", runs_dir=tmp_path / "runs")
    assert len(log) == 4 and all(np.isfinite(row["loss"]) for row in log)
    config = json.loads((tmp_path / "ib" / "config.json").read_text())
    assert (config["image_size"], config["audio_num_mel_bins"], config["audio_target_len"]) == (32, 128, 100)
    model = ImageBind.from_pretrained(tmp_path / "ib", dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "ib")
    assert tok.model_max_length == model.config.context_length
    with torch.inference_mode():
        out = model.embed("text", tok(["a red circle"]))
    assert out.shape == (1, tib.MODEL["out_embed_dim"])
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))


needs_shipped = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(),
                                   reason="shipped toy ImageBind weights are not in weights/toy/imagebind")


@needs_shipped
@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_shipped_imagebind_retrieves_captions(modality):
    model, tok = tib.load()
    assert model.config.image_size == 32 and model.config.out_embed_dim == tib.MODEL["out_embed_dim"]
    acc = tib.retrieval_accuracy(model, tok, modality, n=12, seed=5, split="train")
    assert acc >= 0.9, f"{modality}: {acc:.2f}"


def test_media_check_of_a_wrong_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="32x32"):
        tiny_model.embed("vision", media.preprocess_image(np.zeros((64, 64, 3), np.uint8), size=64)[None])
