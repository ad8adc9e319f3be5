import pytest
import torch

from conftest import check
from minignext.tiny import tiny_tokenizer

LESSON = "lesson09_family"
CLS_KEPT = "the CLS token was kept: strategy 'default' drops token 0 of every selected layer"
LAST_LAYER = ("off by one layer: hidden_states[0] is the tower's input, so index -2 is already the output of "
              "the second-to-last layer (index the tuple directly)")
IN_PLACE = "the features were written into the given embeddings in place: build a new tensor"


def test_select_features_takes_layer_minus_2_without_cls(ex):
    g = torch.Generator().manual_seed(0)
    states = tuple(torch.randn(2, 1 + 9, 4, generator=g) for _ in range(5))      # input + 4 layers
    check(ex.select_features(states, (-2,)), states[3][:, 1:], "select_features at layer -2, 'default'",
          wrong=[(CLS_KEPT, states[3]), (LAST_LAYER, states[4][:, 1:]), (LAST_LAYER, states[2][:, 1:])],
          rtol=0, atol=0)
    torch.testing.assert_close(ex.select_features(states, (-2,), "full"), states[3], rtol=0, atol=0)
    both = ex.select_features(states, (-3, -1))
    torch.testing.assert_close(both, torch.cat([states[2][:, 1:], states[4][:, 1:]], -1), rtol=0, atol=0)


def test_splice_fills_the_placeholders_in_reading_order_and_keeps_the_graph(ex):
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 7, 3, generator=g)
    slots = torch.zeros(2, 7, dtype=torch.bool)
    slots[0, 1:3] = slots[0, 5:7] = slots[1, 2:4] = True                # 3 images of 2 patches
    features = torch.randn(3, 2, 3, generator=g, requires_grad=True)
    original = embeds.clone()
    got = ex.splice_image_features(embeds, slots, features)
    if not torch.equal(embeds, original):
        pytest.fail(IN_PLACE, pytrace=False)
    want, k = embeds.clone(), 0
    flat = features.detach().reshape(-1, 3)
    for b in range(2):
        for t in range(7):
            if slots[b, t]:
                want[b, t], k = flat[k], k + 1
    check(got, want, "splice_image_features vs a loop over the placeholders", rtol=0, atol=0)
    assert not torch.equal(got, embeds) and torch.equal(embeds[~slots], got[~slots].detach())
    got.sum().backward()
    torch.testing.assert_close(features.grad, torch.ones_like(features))


def test_tokens_with_labels_supervises_exactly_the_answers(ex):
    tok = tiny_tokenizer()
    text = "### Human: what is it?\n### Assistant: a red circle.\n### Human: and now?\n### Assistant: a box.\n###"
    answers = [" a red circle.\n###", " a box.\n###"]
    spans = [(text.index(a), text.index(a) + len(a)) for a in answers]
    ids, labels = ex.tokens_with_labels(tok, text, spans)
    assert ids == tok.encode(text, add_bos=False) and len(labels) == len(ids)
    runs, current = [], []
    for i, label in zip(ids + [None], labels + [-100]):
        if label != -100:
            assert label == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert [tok.decode(r) for r in runs] == answers
    assert ex.tokens_with_labels(tok, text, [])[1] == [-100] * len(ids)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_select_features_is_what_llava_reads(ex, strategy):
    from minignext.systems.llava import Llava, LlavaConfig

    model = Llava(LlavaConfig.tiny(vision_feature_select_strategy=strategy)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = model.vision_tower(pixels, output_hidden_states=True).hidden_states
        got = model.multi_modal_projector(ex.select_features(states, model.config.feature_layers, strategy))
        torch.testing.assert_close(got, model.image_features(pixels), rtol=0, atol=0)
