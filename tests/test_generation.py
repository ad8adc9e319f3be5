"""Generation: sampling filters against transformers' logits warpers, seeds, stopping,
streaming, and soft-token prompts."""

import pytest
import torch

from minignext.generation import decode_one_token, filter_logits, generate, prefill, sample
from minignext.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (TemperatureLogitsWarper,  # noqa: E402
                                                    TopKLogitsWarper, TopPLogitsWarper)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Llama(LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)   # sharp enough distributions that greedy has clear winners
    return m


def prompt(n=5, b=1, seed=0):
    return torch.randint(3, 64, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, 1.0), (1.0, 5, 1.0), (1.0, None, 0.8),
                                                     (1.3, 10, 0.6)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, temperature, top_p, top_k)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)], atol=1e-6, rtol=0)


def test_samples_stay_inside_the_filter_and_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 1.0, 3, g) for _ in range(3000)])
    assert set(draws.unique().tolist()) <= {0, 1, 2}
    freq = torch.bincount(draws.flatten(), minlength=6)[:3].float() / draws.numel()
    expected = logits[0, :3].softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
    assert sample(logits, 0.0).tolist() == [0]


def test_seed_makes_sampling_reproducible(model):
    a = generate(model, prompt(), 12, temperature=1.0, top_k=20, seed=7, stop_token_ids=[], progress=False)
    b = generate(model, prompt(), 12, temperature=1.0, top_k=20, seed=7, stop_token_ids=[], progress=False)
    c = generate(model, prompt(), 12, temperature=1.0, top_k=20, seed=8, stop_token_ids=[], progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_greedy_is_argmax_of_full_forward(model):
    out = generate(model, prompt(b=2), 10, stop_token_ids=[], progress=False)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(out[:, 5:], logits[:, 4:].argmax(-1))


def test_prefill_and_decode_one_token_write_the_cache(model):
    ids = prompt(6)
    model.setup_cache(1, 8)
    try:
        first = prefill(model, ids)
        cache = model.model.layers[0].self_attn.kv_cache
        filled = (cache.k_cache[0, 0].abs().sum(-1) != 0).tolist()
        assert filled == [True] * 6 + [False] * 2
        nxt = decode_one_token(model, first.argmax(-1, keepdim=True), 6)
        assert (cache.k_cache[0, 0, 6].abs().sum() != 0) and (cache.k_cache[0, 0, 7].abs().sum() == 0)
    finally:
        model.clear_cache()
    with torch.no_grad():
        full = model(torch.cat([ids, first.argmax(-1, keepdim=True)], dim=1))
    torch.testing.assert_close(first, full[:, 5], atol=1e-5, rtol=0)
    torch.testing.assert_close(nxt, full[:, 6], atol=1e-5, rtol=0)


def test_stop_token_ends_and_pads(model):
    free = generate(model, prompt(b=2), 12, stop_token_ids=[], progress=False)[:, 5:]
    stop = int(free[0, 3])                             # a token row 0 produces at step 3
    out = generate(model, prompt(b=2), 12, stop_token_ids=[stop], progress=False)[:, 5:]
    first_hit = [int((row == stop).nonzero()[0]) if (row == stop).any() else None for row in free]
    for row, hit in zip(range(2), first_hit):
        if hit is not None:
            assert torch.equal(out[row, :hit + 1], free[row, :hit + 1])
            assert (out[row, hit + 1:] == stop).all()  # no pad id configured: padded with the stop token
    if all(h is not None for h in first_hit):
        assert out.shape[1] == max(first_hit) + 1
    default = generate(model, prompt(), 12, progress=False)    # stops at config eos (2) if it appears
    assert 2 not in default[0, 5:-1].tolist()


class CharTokenizer:
    """Decodes id i to chr(ord('a') + i % 26): enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings(model):
    tok = CharTokenizer()
    free = generate(model, prompt(), 16, stop_token_ids=[], progress=False)[0, 5:].tolist()
    target = tok.decode(free[4:6])                     # the text of new tokens 4 and 5
    out = generate(model, prompt(), 16, stop_token_ids=[], stop_strings=[target], tokenizer=tok,
                   progress=False)[0, 5:].tolist()
    text = tok.decode(free)
    assert out == free[:len(out)] and target in tok.decode(out) and target not in tok.decode(out[:-1])
    assert len(out) == text.index(target) + len(target)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt(), 4, stop_strings=["x"])


def test_stream_yields_the_same_tokens(model):
    it = generate(model, prompt(), 9, stream=True, stop_token_ids=[], progress=False)
    first = next(it)
    assert isinstance(first, int)
    assert not torch.is_inference_mode_enabled()      # a paused stream does not leak its mode
    streamed = [first] + list(it)
    assert streamed == generate(model, prompt(), 9, stop_token_ids=[], progress=False)[0, 5:].tolist()
    with pytest.raises(ValueError, match="batch of 1"):
        generate(model, prompt(b=2), 3, stream=True)


def test_inputs_embeds_returns_only_new_tokens(model):
    ids = prompt()
    with torch.no_grad():
        embeds = model.embed(ids)
    out = generate(model, inputs_embeds=embeds, max_new_tokens=7, stop_token_ids=[], progress=False)
    assert torch.equal(out, generate(model, ids, 7, stop_token_ids=[], progress=False)[:, 5:])
    assert model.generate(ids, 7, stop_token_ids=[], progress=False).shape == (1, 12)


def test_generation_respects_max_positions(model):
    out = generate(model, prompt(60), 20, stop_token_ids=[], progress=False)
    assert out.shape == (1, 64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, prompt(65), 2)
    assert model.cache_size is None
