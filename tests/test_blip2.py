"""BLIP-2's vision model, Q-Former and retrieval heads against transformers (test-only oracle),
fp32; the LAVIS renames; the stage-1 losses."""

import dataclasses

import pytest
import torch

from fixtures_blip2 import hf_blip2_config, hf_kwargs, randomize, save, to_lavis
from minignext import blip2, weights

transformers = pytest.importorskip("transformers")
TOL = dict(rtol=0, atol=1e-5)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """transformers' Blip2ForImageTextRetrieval (tiny, random) and minignext's, loaded from its folder."""
    config = blip2.Blip2Config.tiny()
    ref = randomize(transformers.Blip2ForImageTextRetrieval(hf_blip2_config(transformers, config)))
    ours = blip2.Blip2ForImageTextRetrieval.from_pretrained(save(ref, tmp_path_factory.mktemp("itr")))
    return ref, ours


def batch(seed=1, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0                                  # a padded text
    return torch.randn(b, 3, 28, 28, generator=g), ids, mask


def test_configs_default_to_the_reference():
    for ours, ref in ((blip2.Blip2VisionConfig(), transformers.Blip2VisionConfig()),
                      (blip2.Blip2QFormerConfig(), transformers.Blip2QFormerConfig())):
        for f in dataclasses.fields(ours):
            if f.name != "pre_layernorm":           # ours alone (CLIP-style ViTs); off, as transformers has none
                assert getattr(ours, f.name) == getattr(ref, f.name), f.name
    c = blip2.Blip2Config.from_hf({"vision_config": {"hidden_size": 48, "num_attention_heads": 4}})
    assert c.qformer_config.encoder_hidden_size == 48 and c.num_query_tokens == 32 and c.text_config is None


def test_vision_model_matches_transformers_at_every_layer(tmp_path):
    torch.manual_seed(0)
    config = blip2.Blip2VisionConfig.tiny()
    ref = randomize(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**hf_kwargs(config))))
    with torch.no_grad():                            # a key bias changes nothing: we drop it on load
        for layer in ref.encoder.layers:
            layer.self_attn.qkv.bias[32:64].normal_()
    ours = blip2.Blip2VisionModel.from_pretrained(save(ref, tmp_path))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want, got = ref(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)
    print(f"vision max diff {max(max_diff(a, b) for a, b in zip(got.hidden_states, want.hidden_states)):.2e}")
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\)"):
        ours(torch.randn(1, 3, 32, 32))


def test_qformer_matches_transformers(tmp_path):
    config = blip2.Blip2QFormerConfig.tiny(use_qformer_text_input=True)
    ref = randomize(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**hf_kwargs(config))))
    ours = blip2.Blip2QFormerModel.from_pretrained(save(ref, tmp_path))
    assert [layer.has_cross_attention for layer in ours.encoder.layer] == [True, False, True]
    g = torch.Generator().manual_seed(2)
    queries, text = torch.randn(2, 4, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    image = torch.randn(2, 9, 32, generator=g)
    image_mask = torch.ones(2, 9, dtype=torch.long)
    image_mask[0, 6:] = 0
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    # queries alone (some image tokens masked); queries then text (one padded); text alone. transformers
    # 5.23 cannot mask image tokens while text rides along (it sizes that mask for queries + text).
    cases = [
        dict(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask),
        dict(query_embeds=torch.cat([queries, text], 1), query_length=4, attention_mask=mask,
             encoder_hidden_states=image),
        dict(query_embeds=text, query_length=0, attention_mask=mask[:, 4:]),
    ]
    with torch.no_grad():
        for kwargs in cases:
            want = ref(**kwargs).last_hidden_state
            got = ours(**kwargs)
            torch.testing.assert_close(got, want, **TOL)
            print(f"Q-Former max diff {max_diff(got, want):.2e}")
        with pytest.raises(ValueError, match="encoder_hidden_states"):
            ours(queries)
    plain = blip2.Blip2QFormerModel(blip2.Blip2QFormerConfig.tiny())
    with pytest.raises(ValueError, match="no text feed-forward"):
        plain(torch.cat([queries, text], 1), query_length=4, encoder_hidden_states=image)


def test_query_attention_is_transformers_cross_attention(tmp_path):
    config = blip2.Blip2QFormerConfig.tiny()
    ref = randomize(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**hf_kwargs(config),
                                                                                   attn_implementation="eager")))
    ours = blip2.Blip2QFormerModel.from_pretrained(save(ref, tmp_path))
    g = torch.Generator().manual_seed(5)
    queries, image = torch.randn(2, 4, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    with torch.no_grad():
        want = torch.stack(ref(query_embeds=queries, encoder_hidden_states=image, output_attentions=True)
                           .cross_attentions, dim=1)
    got = blip2.query_attention(ours, queries, image)
    assert got.shape == want.shape == (2, 2, 4, 4, 9)        # (B, cross-attending blocks, heads, queries, tokens)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, 4, 4))
    assert not any(layer.crossattention.attention._forward_hooks for layer in ours.encoder.layer[::2])


def test_a_pre_layernorm_vit_reads_its_lavis_name():
    config = dataclasses.replace(blip2.Blip2VisionConfig.tiny(), pre_layernorm=True)
    model = blip2.Blip2VisionModel(config).eval()
    plain = blip2.Blip2VisionModel(blip2.Blip2VisionConfig.tiny()).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pre_layernorm.")})
    with torch.no_grad():
        model.pre_layernorm.weight.normal_()
        x = torch.randn(1, 3, 28, 28)
        tokens = model.embeddings(x)
        want = model.post_layernorm(plain.encoder(model.pre_layernorm(tokens))[-1])
        torch.testing.assert_close(model(x).last_hidden_state, want, **TOL)
    assert blip2.lavis_key("visual_encoder.ln_pre.weight", None) == [("vision_model.pre_layernorm.weight", None)]


@pytest.mark.parametrize("itm", [False, True], ids=["itc", "itm"])
def test_retrieval_heads_match_transformers(retrieval, itm):
    ref, ours = retrieval
    x, ids, mask = batch()
    with torch.no_grad():
        want = ref(x, ids, mask, use_image_text_matching_head=itm)
        got = ours(x, ids, mask, use_image_text_matching_head=itm)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, **TOL)
    torch.testing.assert_close(got.logits_per_text, want.logits_per_text, **TOL)
    if not itm:
        torch.testing.assert_close(got.image_embeds, want.image_embeds, **TOL)
        torch.testing.assert_close(got.text_embeds, want.text_embeds, **TOL)
    print(f"{'ITM' if itm else 'ITC'} max diff {max_diff(got.logits_per_image, want.logits_per_image):.2e}")
    unpadded = ours(x, ids, None, use_image_text_matching_head=itm).logits_per_image
    assert max_diff(unpadded[1], got.logits_per_image[1]) > 1e-4    # the padding mask is honoured


def test_lavis_checkpoint_converts_to_the_transformers_model(retrieval):
    ref, _ = retrieval
    lavis = to_lavis(ref.state_dict())
    assert "visual_encoder.blocks.0.attn.q_bias" in lavis and "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis
    lavis.update({"Qformer.bert.embeddings.position_ids": torch.arange(64)[None], "temp": torch.tensor(0.07),
                  "Qformer.cls.predictions.bias": torch.zeros(99)})    # LAVIS-only tensors, dropped
    model = weights.build_on_meta(blip2.Blip2ForImageTextRetrieval, blip2.Blip2Config.tiny())
    weights.load_into(model, blip2.from_lavis(lavis)).eval()
    x, ids, mask = batch(seed=3)
    with torch.no_grad():
        for itm in (False, True):
            want = ref(x, ids, mask, use_image_text_matching_head=itm).logits_per_image
            torch.testing.assert_close(model(x, ids, mask, use_image_text_matching_head=itm).logits_per_image, want, **TOL)
    with pytest.raises(weights.WeightsError, match="Qformer.bert.pooler.dense.weight"):
        blip2.from_lavis({"Qformer.bert.pooler.dense.weight": torch.zeros(2, 2)})


def test_itc_loss_against_a_direct_computation():
    g = torch.Generator().manual_seed(4)
    image = torch.nn.functional.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    sim = torch.tensor([[max(float(image[i, q] @ text[t]) for q in range(4)) for t in range(3)] for i in range(3)])
    torch.testing.assert_close(blip2.itc_similarity(image, text), sim)

    def smoothed_ce(row, target, eps=0.1):        # cross-entropy against (1 - eps) one-hot + eps uniform
        logp = torch.log_softmax(row, -1)
        return -((1 - eps) * logp[target] + eps * logp.mean())

    want = sum(smoothed_ce(sim[i] / 0.07, i) + smoothed_ce(sim[:, i] / 0.07, i) for i in range(3)) / 6
    torch.testing.assert_close(blip2.itc_loss(image, text, 0.07), want)


def test_hard_negatives_are_never_the_pair_itself():
    sim = torch.tensor([[0.9, 0.8, -5.0], [0.1, 0.9, 0.85], [-5.0, 0.88, 0.9]]) * 50
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg_image, neg_text = blip2.sample_hard_negatives(sim, generator=g)
        assert (neg_image != torch.arange(3)).all() and (neg_text != torch.arange(3)).all()
    assert neg_text.tolist() == [1, 2, 1] and neg_image.tolist() == [1, 2, 1]    # the most similar other
    with pytest.raises(ValueError, match="at least 2 pairs"):
        blip2.sample_hard_negatives(torch.zeros(1, 1))


def test_a_tiny_qformer_trains_on_itc_and_itm():
    torch.manual_seed(0)
    model = blip2.Blip2ForImageTextRetrieval(blip2.Blip2Config.tiny())
    model.vision_model.requires_grad_(False)          # BLIP-2 freezes the image encoder
    temp = torch.nn.Parameter(torch.tensor(0.07))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + [temp], lr=3e-3)
    x, ids, mask = batch(seed=5, b=4)
    losses = []
    for _ in range(12):
        image = model.vision_model(x).last_hidden_state
        image_feats, text_feat = model.image_features(image), model.text_features(ids, mask)
        neg_image, neg_text = blip2.sample_hard_negatives(blip2.itc_similarity(image_feats, text_feat))
        pairs_image = torch.cat([image, image[neg_image], image])
        pairs_text, pairs_mask = torch.cat([ids, ids, ids[neg_text]]), torch.cat([mask, mask, mask[neg_text]])
        logits, _ = model.itm_logits(pairs_image, pairs_text, pairs_mask)
        is_match = torch.cat([torch.ones(4), torch.zeros(8)])
        loss = blip2.itc_loss(image_feats, text_feat, temp) + blip2.itm_loss(logits, is_match)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.query_tokens.grad is not None and model.vision_model.post_layernorm.weight.grad is None
    assert losses[-1] < 0.7 * losses[0], losses
