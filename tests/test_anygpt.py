"""AnyGPT: the vocabulary layout against AnyGPT's own string form, media -> codes -> tokens -> codes
round trips, clear errors for broken spans, constrained generation that decodes every modality, and
from_pretrained on reference-library folders (transformers LLaMA and Encodec, diffusers VQModel)."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minignext.systems.anygpt import AnyGPT, MediaVocab, MediaVocabConfig, tiny_random
from minignext.tiny import tiny_tokenizer

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PREFIX = {"image": "👀", "speech": "🗣️", "music": "🎶"}
SPAN = {"image": ("<soim>", "<eoim>"), "speech": ("<sosp>", "<eosp>"), "music": ("<somu>", "<eomu>")}


def anygpt_string(codes, modality, music_codebook_size=2048):
    """AnyGPT's text form of a span (anything2token.modality_tokens_to_string), written out again:
    music codes are lists per codebook, emitted frame by frame with codebook k offset by k * size."""
    if modality == "music":
        body = [f"<{PREFIX[modality]}{codes[k][t] + music_codebook_size * k}>"
                for t in range(len(codes[0])) for k in range(len(codes))]
    else:
        body = [f"<{PREFIX[modality]}{c}>" for c in codes]
    return SPAN[modality][0] + "".join(body) + SPAN[modality][1]


@pytest.fixture(scope="module")
def full():
    tokenizer = tiny_tokenizer()
    return tokenizer, MediaVocab.add_to(tokenizer)


@pytest.fixture(scope="module")
def tiny():
    return tiny_random()


def test_full_layout_is_anygpts(full):
    tokenizer, vocab = full
    base = 400
    assert tokenizer.vocab_size == base + 8194 + 1026 + 8194 == vocab.end
    expected = [("<👀0>", base), ("<👀8191>", base + 8191), ("<soim>", base + 8192), ("<eoim>", base + 8193),
                ("<🗣️0>", base + 8194), ("<🗣️1023>", base + 9217), ("<sosp>", base + 9218), ("<eosp>", base + 9219),
                ("<🎶0>", base + 9220), ("<🎶8191>", base + 17411), ("<somu>", base + 17412), ("<eomu>", base + 17413)]
    assert [(t, tokenizer.token_to_id(t)) for t, _ in expected] == expected
    assert "\ufe0f" in tokenizer.id_to_token(base + 8194)                  # the speech prefix keeps its selector
    assert MediaVocab.from_tokenizer(tokenizer).first == vocab.first

    g = torch.Generator().manual_seed(0)
    spans = {"image": torch.randint(0, 8192, (32,), generator=g), "speech": torch.randint(0, 1024, (20,), generator=g),
             "music": torch.randint(0, 2048, (4, 6), generator=g)}
    for modality, codes in spans.items():
        ids = vocab.to_ids(modality, codes)
        text = "a " + anygpt_string(codes.tolist(), modality) + " b"
        assert tokenizer.encode(text, add_bos=False) == tokenizer.encode("a ", add_bos=False) + ids + \
            tokenizer.encode(" b", add_bos=False)
        [segment] = vocab.split(ids)
        assert segment.modality == modality and torch.equal(segment.codes, codes)
        assert tokenizer.decode(ids, skip_special=True) == anygpt_string(codes.tolist(), modality)
    music = vocab.to_ids("music", spans["music"])
    assert music[1:5] == [vocab.first["music"] + int(spans["music"][k, 0]) + 2048 * k for k in range(4)]


def test_media_to_codes_to_tokens_to_codes_is_the_identity(tiny):
    torch.manual_seed(0)
    media = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "speech": torch.randn(2, 1, 400),
             "music": torch.randn(2, 1, 400)}
    shapes = {"image": (64,), "speech": (25,), "music": (2, 25)}
    for modality, x in media.items():
        codes = tiny.encode_media(modality, x)
        spans = tiny.media_ids(modality, x)
        for item, ids in zip(codes, spans):
            [segment] = tiny.vocab.split(ids)
            assert segment.codes.shape == shapes[modality] and torch.equal(segment.codes, item)
        if modality == "music":      # the first codebook of the music span is the codec's own first codebook
            assert torch.equal(codes[:, 0], tiny.music_tokenizer.encode(x, num_quantizers=1)[:, 0])
    prompt = tiny.tokenizer.encode("look: ") + tiny.media_ids("image", media["image"][:1])[0] + \
        tiny.tokenizer.encode(" and listen: ", add_bos=False) + tiny.media_ids("music", media["music"][:1])[0]
    segments = tiny.decode_ids(prompt)
    assert [s.modality for s in segments] == ["text", "image", "text", "music"]
    assert segments[2].text == " and listen: "
    assert segments[1].media.shape == (3, 32, 32) and segments[3].media.shape == (1, 400)
    with torch.no_grad():
        assert_close(segments[1].media, tiny.image_tokenizer.decode_codes(segments[1].codes.view(1, 8, 8))[0])
        assert_close(segments[3].media, tiny.music_tokenizer.decode(segments[3].codes[None])[0])


def test_broken_spans_get_clear_errors(tiny):
    v = tiny.vocab
    soim, eoim, somu, eomu = v.start_id["image"], v.end_id["image"], v.start_id["music"], v.end_id["music"]
    img = [v.first["image"] + c for c in (1, 2, 3)]
    mus = v.first["music"]
    cases = [
        ([5, soim] + img, r"position 1: <soim> is never closed by <eoim> \(3 tokens follow it\)"),
        ([5] + img + [eoim], r"position 1: <👀1> \(a image code\) outside a <soim> ... <eoim> span"),
        ([5, eoim], r"position 1: <eoim> closes no span"),
        ([soim] + img[:1] + [soim] + img + [eoim], r"position 2: <soim> inside the image span opened by <soim> at "
                                                   r"position 0; close it with <eoim> first"),
        ([soim, eoim], r"empty image span"),
        ([soim, img[0], v.first["speech"] + 4, eoim], r"image span at positions 0..3: image span, code 1: <🗣️4> "
                                                      r"\(a speech code\) is not one of its codes"),
        ([soim, img[0], eomu], r"<eomu> inside the image span"),
        ([somu, mus + 1, mus + 64 + 2, mus + 3, eomu], r"3 codes, not whole frames of 2 codebooks"),
        ([somu, mus + 64 + 1, mus + 2, eomu], r"code 0: <🎶65> belongs to codebook 1, but frame-major order puts "
                                              r"codebook 0 there"),
    ]
    for ids, message in cases:
        with pytest.raises(ValueError, match=message):
            v.split(ids)
        with pytest.raises(ValueError):
            tiny.decode_ids(torch.tensor(ids))
    with pytest.raises(ValueError, match="the tokenizer has no <👀0>, <soim>, <eoim>: it is not an AnyGPT vocabulary"):
        MediaVocab.from_tokenizer(tiny_tokenizer())
    with pytest.raises(ValueError, match=r"must be \(2 codebooks, frames\)"):
        v.to_ids("music", torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="values in 0..63"):
        v.to_ids("image", [64])
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        v.to_ids("video", [1])
    assert [s.modality for s in v.split([5, soim] + img + [eoim, 7])] == ["text", "image", "text"]


def test_generate_writes_and_decodes_each_modality(tiny):
    prompt = tiny.tokenizer.encode("draw: ")
    image = tiny.generate(prompt + [tiny.vocab.start_id["image"]], max_new_tokens=80, temperature=1.0, seed=0,
                          stop_token_ids=[])
    assert image.ids[64] == tiny.vocab.end_id["image"]          # exactly one 8x8 grid, then the end is forced
    assert image.segments[0].modality == "image" and image.segments[0].media.shape == (3, 32, 32)
    assert image.unfinished is None

    music = tiny.generate(prompt + [tiny.vocab.start_id["music"]], max_new_tokens=30, temperature=1.0, seed=0,
                          stop_token_ids=[])
    local = torch.tensor(music.ids) - tiny.vocab.first["music"]
    assert torch.equal(local // 64, torch.arange(30) % 2)        # codebooks 0, 1, 0, 1, ...: frame-major
    assert music.segments == [] and "music span was cut off by max_new_tokens after 30 codes" in music.unfinished

    # a model that wants to close every span at once: speech ends after one code, music after one frame
    v = tiny.vocab
    eager = tiny_random()
    head = torch.nn.Linear(eager.llm.config.hidden_size, eager.llm.config.vocab_size)
    with torch.no_grad():
        head.weight.copy_(eager.llm.lm_head.weight)
        head.bias.zero_()[[v.end_id["speech"], v.end_id["music"]]] = 100.0
    eager.llm.lm_head = head
    for modality, codes_shape, media_shape in (("speech", (1,), (1, 16)), ("music", (2, 1), (1, 16))):
        reply = eager.generate(prompt + [v.start_id[modality]], max_new_tokens=4, seed=0, stop_token_ids=[])
        span = reply.segments[0]
        assert span.modality == modality and span.codes.shape == codes_shape and span.media.shape == media_shape
        assert reply.ids[len(span.ids) - 2] == v.end_id[modality]
        assert all(s.modality == "text" for s in reply.segments[1:])   # end tokens are not allowed outside a span

    for seed in range(3):               # free sampling: whatever it writes parses and decodes
        reply = tiny.generate(prompt, max_new_tokens=120, temperature=1.0, seed=seed)
        assert all(s.media is not None for s in reply.segments if s.modality != "text")
    with pytest.raises(ValueError, match="closes no span"):
        tiny.generate(prompt + [v.end_id["music"]], max_new_tokens=2)
    music_open = prompt + [v.start_id["music"], v.first["music"] + 3]
    with pytest.raises(ValueError, match=r"<🎶5> \(a music code\) cannot continue the music span opened at"):
        tiny.generate(music_open + [v.first["music"] + 5], max_new_tokens=2)    # codebook 0 twice
    reply = tiny.generate(music_open + [v.first["music"] + 64 + 5], max_new_tokens=2, stop_token_ids=[])
    assert reply.unfinished.endswith("after 4 codes; raise max_new_tokens to get it")
    with pytest.raises(ValueError, match="unknown modality 'text'"):
        tiny.encode_media("text", torch.zeros(1))


def test_loss_and_vocabulary_checks(tiny):
    ids = torch.tensor([tiny.tokenizer.encode("hi ") + tiny.vocab.to_ids("speech", [3, 4, 5])])
    logits = tiny.llm(ids)
    assert_close(tiny.loss(ids), F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    labels = ids.clone()
    labels[0, :4] = -100
    assert_close(tiny.loss(ids, labels), F.cross_entropy(logits[0, 3:-1], ids[0, 4:]))

    tokenizer = tiny_tokenizer()
    vocab = MediaVocab.add_to(tokenizer, MediaVocabConfig.tiny())
    with pytest.raises(ValueError, match="already holds image tokens; read its layout with MediaVocab.from_tokenizer"):
        MediaVocab.add_to(tokenizer, MediaVocabConfig.tiny())
    llm = type(tiny.llm)(type(tiny.llm.config)(vocab_size=400, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"400 token embeddings but the media tokens reach id 661"):
        AnyGPT(llm, vocab)
    old = llm.model.embed_tokens.weight.detach().clone()
    assert llm.resize_token_embeddings(tokenizer.vocab_size) == range(400, 662)
    assert_close(llm.model.embed_tokens.weight[400], old.mean(0))
    with pytest.raises(ValueError, match="image tokenizer has codebooks of 64, the vocabulary makes room for 32"):
        AnyGPT(llm, MediaVocab(MediaVocabConfig(32, 64, 64, 2), vocab.first), image_tokenizer=tiny.image_tokenizer)


def test_from_pretrained_on_reference_folders(tmp_path, tiny):
    torch.manual_seed(0)
    tokenizer = tiny.tokenizer
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    hf.save_pretrained(tmp_path / "llm")
    tokenizer.save(tmp_path / "llm")
    vq = diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                           num_vq_embeddings=64, sample_size=8).eval()
    vq.save_pretrained(tmp_path / "vq")
    codec = transformers.EncodecModel(transformers.EncodecConfig(
        target_bandwidths=[3.0, 6.0], sampling_rate=8000, hidden_size=16, num_filters=4, upsampling_ratios=[4, 4],
        codebook_size=64, num_lstm_layers=1)).eval()
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            layer.codebook.embed.normal_()
    codec.save_pretrained(tmp_path / "codec")

    model = AnyGPT.from_pretrained(tmp_path / "llm", image_tokenizer=tmp_path / "vq",
                                   speech_tokenizer=tmp_path / "codec", music_tokenizer=tmp_path / "codec")
    assert model.vocab.config == MediaVocabConfig.tiny() and model.vocab.first == tiny.vocab.first
    assert model.image_grid == 4
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    wave = torch.randn(1, 1, 160)
    ids = tokenizer.encode("x ") + model.media_ids("image", image)[0] + model.media_ids("music", wave)[0]
    with torch.no_grad():
        assert_close(model.llm(torch.tensor([ids])), hf(torch.tensor([ids])).logits, atol=1e-5, rtol=1e-5)
        image_codes = vq.quantize(vq.encode(image).latents)[2][2]
        music_codes = codec.encode(wave, bandwidth=6.0).audio_codes[0, 0]
        _, image_span, music_span = model.decode_ids(ids)
        assert torch.equal(image_span.codes, image_codes) and torch.equal(music_span.codes, music_codes)
        rows = vq.quantize.get_codebook_entry(image_codes, (1, 4, 4, 4))
        assert_close(image_span.media, vq.decode(rows, force_not_quantize=True).sample[0], atol=1e-5, rtol=1e-5)
        assert_close(music_span.media, codec.decode(music_codes[None, None], [None])[0][0], atol=1e-5, rtol=1e-5)
        speech = model.decode_codes("speech", music_codes[0])
        assert_close(speech, codec.decode(music_codes[None, None, :1], [None])[0][0], atol=1e-5, rtol=1e-5)
