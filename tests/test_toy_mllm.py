"""The language side of the toy training kit: padded batches, the answer-only loss, spliced soft
tokens and banks of ImageBind embeddings."""

import numpy as np
import torch
import torch.nn.functional as F

from minignext.imagebind import ImageBind
from minignext.toy import mllm, world
from minignext.toy import train_imagebind as tib


def test_batches_are_right_padded_and_padding_is_never_a_label():
    ids, labels = mllm.pad_batch([[1, 5, 6, 2], [1, 7, 2]])
    assert ids.tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert labels.tolist() == [[1, 5, 6, 2], [1, 7, 2, -100]]
    ids, labels = mllm.pad_batch([[1, 5, 6], [1, 7]], labels=[[-100, 5, 6], [-100, -100]], pad_id=9)
    assert ids.tolist() == [[1, 5, 6], [1, 7, 9]] and labels.tolist() == [[-100, 5, 6], [-100, -100, -100]]


def test_answer_ce_is_the_next_token_loss_over_labelled_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 10, generator=g)
    _, labels = mllm.pad_batch([[1, 5, 6, 2], [1, 7, 2]])
    pairs = [(0, 0, 5), (0, 1, 6), (0, 2, 2), (1, 0, 7), (1, 1, 2)]          # (row, position, next token)
    want = torch.stack([F.cross_entropy(logits[b, t], torch.tensor(y)) for b, t, y in pairs]).mean()
    torch.testing.assert_close(mllm.answer_ce(logits, labels), want)


def test_spliced_soft_tokens_replace_their_slots_and_pass_gradients_back():
    proj = torch.nn.Linear(3, 4)
    embeds = torch.zeros(2, 5, 4)
    vectors = proj(torch.ones(2, 3))
    out = mllm.splice(embeds, (0, 1), (2, 4), vectors)
    assert torch.equal(out[0, 2], vectors[0]) and torch.equal(out[1, 4], vectors[1])
    assert out[0, [0, 1, 3, 4]].abs().sum() == 0 and out[1, :4].abs().sum() == 0
    out.sum().backward()
    assert proj.weight.grad.abs().sum() > 0


def test_media_bank_holds_every_training_object_as_the_encoder_sees_it():
    torch.manual_seed(0)
    encoder = ImageBind(tib.model_config(tib.build_tokenizer())).eval()
    bank = mllm.media_bank(encoder, ("image", "audio", "video"), np.random.default_rng(1), per_key=2)
    n = len(world.train_combinations())
    assert len(bank) == n * (1 + 1 + len(world.DIRECTIONS))
    assert all(v.shape == (2, encoder.config.out_embed_dim) for v in bank.values())
    key = ("video", world.train_combinations()[0], "left")
    rng = np.random.default_rng(5)
    clips = world.render_batch([world.Media(*key)] * 2, rng)
    with torch.inference_mode():
        torch.testing.assert_close(mllm.embed_media(encoder, "video", clips),
                                   encoder.embed("vision", tib.video_input(clips)))
    again = mllm.media_bank(encoder, ("image",), np.random.default_rng(1), per_key=2)
    assert all(torch.equal(again[k], bank[k]) for k in again)
