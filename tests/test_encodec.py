"""Encodec against transformers' EncodecModel on tiny random configs (codes equal, audio <= 1e-5),
the published encodec_24khz / encodec_32khz configs against the reference's key layout on the meta
device, and the training pieces of the residual quantiser by hand."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minignext import weights
from minignext.encodec import (Encodec, EncodecConfig, EuclideanCodebook, lstm_by_hand,
                               quantize_for_training, replace_dead_codes, update_codebook)
from conftest import perturb

transformers = pytest.importorskip("transformers")

CONFIG_DIR = Path(__file__).parent / "data" / "configs"

CONFIGS = {   # (config, input length, bandwidth)
    "causal_six_codebooks": (dict(target_bandwidths=[10.0, 20.0], sampling_rate=8000, hidden_size=16, num_filters=4,
                                  num_residual_layers=1, upsampling_ratios=[4, 4], codebook_size=64,
                                  num_lstm_layers=1), 301, 20.0),
    "non_causal_stereo_no_shortcut": (dict(target_bandwidths=[7.0, 14.0], sampling_rate=8000, hidden_size=16,
                                           num_filters=4, num_residual_layers=2, upsampling_ratios=[3, 4],
                                           codebook_size=32, num_lstm_layers=2, use_causal_conv=False,
                                           use_conv_shortcut=False, audio_channels=2), 121, 7.0),
}


def build_pair(tmp_path, name):
    torch.manual_seed(0)
    ref = transformers.EncodecModel(transformers.EncodecConfig(**CONFIGS[name][0])).eval()
    perturb(ref)
    with torch.no_grad():          # transformers starts the codebooks at zero
        for layer in ref.quantizer.layers:
            layer.codebook.embed.normal_(0.0, 0.2)
    ref.save_pretrained(tmp_path)
    return ref, Encodec.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_codes_and_audio_match_transformers(tmp_path, name):
    ref, mine = build_pair(tmp_path, name)
    _, length, bandwidth = CONFIGS[name]
    x = torch.randn(2, ref.config.audio_channels, length)
    with torch.no_grad():
        assert_close(mine.encoder(x), ref.encoder(x), atol=1e-5, rtol=1e-5)
        out = ref.encode(x, bandwidth=bandwidth)
        codes = mine.encode(x, bandwidth)
        assert torch.equal(codes, out.audio_codes[0])
        assert codes.shape[1] == ref.quantizer.get_num_quantizers_for_bandwidth(bandwidth) > 1
        assert codes.unique().numel() > 4                      # not one code everywhere
        assert_close(mine.decode(codes), ref.decode(out.audio_codes, out.audio_scales)[0], atol=1e-5, rtol=1e-5)
        assert_close(mine.decode(codes[:, :1]), ref.decoder(ref.quantizer.decode(codes[:, :1].transpose(0, 1))),
                     atol=1e-5, rtol=1e-5)              # any prefix of the codebooks decodes
        got_codes, audio = mine(x, bandwidth)
        assert_close(audio, ref(x, bandwidth=bandwidth).audio_values, atol=1e-5, rtol=1e-5)
        assert torch.equal(mine.encode(x[..., :7], bandwidth), ref.encode(x[..., :7], bandwidth=bandwidth).audio_codes[0])
    assert audio.shape == x.shape


@pytest.mark.parametrize("name", ["encodec_24khz", "encodec_32khz"])
def test_published_config_builds_with_the_reference_key_layout(name):
    d = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    frozen = json.dumps(d)
    config = EncodecConfig.from_hf(d)
    assert json.dumps(d) == frozen
    with torch.device("meta"):
        ref = transformers.EncodecModel(transformers.EncodecConfig(**{k: v for k, v in d.items()
                                                                        if not k.startswith("_")}))
    mine = weights.build_on_meta(Encodec, config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mine.state_dict().items()} == want
    assert config.num_quantizers == ref.config.num_quantizers
    assert mine.num_quantizers_for() == ref.quantizer.get_num_quantizers_for_bandwidth(d["target_bandwidths"][0])
    expected = {"encodec_24khz": (1024, 32, 2, True), "encodec_32khz": (2048, 4, 4, False)}[name]
    assert (config.codebook_size, config.num_quantizers, mine.num_quantizers_for(), config.use_conv_shortcut) == expected


def test_legacy_weight_norm_names_load(tmp_path):
    ref, mine = build_pair(tmp_path / "new", "causal_six_codebooks")
    sd = {k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1",
                                                                                 ".weight_v"): v
          for k, v in ref.state_dict().items()}
    assert any(k.endswith(".weight_g") for k in sd)
    (tmp_path / "old").mkdir()
    weights.save_safetensors(sd, tmp_path / "old" / "model.safetensors")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    old = Encodec.from_pretrained(tmp_path / "old")
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert torch.equal(old.encode(x, 20.0), mine.encode(x, 20.0))


def test_weight_norm_and_lstm_by_hand():
    torch.manual_seed(0)
    model = Encodec(EncodecConfig.tiny())
    conv = model.encoder.layers[0].conv
    g, v = conv.parametrizations["weight"].original0, conv.parametrizations["weight"].original1
    assert_close(conv.weight, torch._weight_norm(v, g, 0))
    assert_close(conv.weight, v)                                  # g starts at ||v||
    lstm = model.encoder.layers[-3].lstm
    x = torch.randn(7, 2, lstm.input_size)
    assert_close(lstm_by_hand(lstm, x), lstm(x)[0], atol=1e-6, rtol=1e-5)


def test_codebook_moving_average_update_by_hand():
    torch.manual_seed(0)
    book = EuclideanCodebook(EncodecConfig(codebook_size=4, hidden_size=2, target_bandwidths=(24.0,)))
    x, codes = torch.randn(6, 2), torch.tensor([0, 0, 1, 3, 3, 3])
    count0, avg0 = book.cluster_size.clone(), book.embed_avg.clone()
    update_codebook(book, x, codes, decay=0.9, eps=1e-5)
    counts = torch.tensor([2.0, 1.0, 0.0, 3.0])
    sums = torch.stack([x[codes == k].sum(0) for k in range(4)])
    n = 0.9 * count0 + 0.1 * counts
    assert_close(book.cluster_size, n)
    assert_close(book.embed_avg, 0.9 * avg0 + 0.1 * sums)
    assert_close(book.embed, book.embed_avg / ((n + 1e-5) / (n.sum() + 4e-5) * n.sum())[:, None])


def test_quantize_for_training_fits_the_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 3
    config = EncodecConfig(hidden_size=4, codebook_size=8, target_bandwidths=(0.3, 0.6), sampling_rate=200,
                           upsampling_ratios=(2,))
    torch.manual_seed(0)
    model = Encodec(config)
    frames = lambda: (centres[torch.randint(0, 8, (64,), generator=g)]
                      + 0.05 * torch.randn(64, 4, generator=g)).T.reshape(1, 4, 64)
    assert config.num_quantizers == 2 and not bool(model.quantizer.layers[0].codebook.inited)
    untrained = quantize_for_training(model.quantizer, frames(), 2, update=False)[2]
    assert not bool(model.quantizer.layers[0].codebook.inited)
    for _ in range(20):
        quantize_for_training(model.quantizer, frames(), 2, generator=g)
    assert bool(model.quantizer.layers[0].codebook.inited)       # k-means on the first batch
    x = frames().requires_grad_(True)
    q, codes, loss = quantize_for_training(model.quantizer, x, 2, update=False)
    assert loss < 0.15 * untrained                               # measured: 0.34 against 4.8
    assert torch.equal(codes, model.quantizer.encode(x.detach(), 2))
    assert_close(q, model.quantizer.decode(codes))
    first = model.quantizer.decode(codes[:, :1])
    manual = (F.mse_loss(x, first) + F.mse_loss(x - first, model.quantizer.layers[1].decode(codes[:, 1]))) / 2
    assert_close(loss, manual)
    upstream = torch.randn_like(x)
    (q * upstream).sum().backward()
    assert_close(x.grad, upstream)                               # straight through the whole sum

    book = model.quantizer.layers[0].codebook
    book.embed[0], book.cluster_size[0] = 100.0, 0.0             # a row no frame chooses
    data = frames().transpose(1, 2).reshape(-1, 4)
    replace_dead_codes(book, data, generator=g)
    assert (book.embed[0] == data).all(dim=1).any() and book.cluster_size[0] == 2.0
    update_codebook(book, data, book.encode(data))
    assert (book.embed[0] - data).norm(dim=1).min() < 1.0       # the restart survives the next average


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="time_group_norm"):
        EncodecConfig.from_hf({"norm_type": "time_group_norm", "chunk_length_s": 1.0, "normalize": True})
    with pytest.raises(ValueError, match="power of 2"):
        EncodecConfig(codebook_size=1000)
    with pytest.raises(ValueError, match="below one codebook"):
        EncodecConfig(target_bandwidths=(0.5,))
    model = Encodec(EncodecConfig.tiny())
    with pytest.raises(ValueError, match=r"bandwidth 5.0 kbps is not one of .*\[3.0, 6.0\]"):
        model.encode(torch.randn(1, 1, 64), 5.0)
    with pytest.raises(ValueError, match="1 channels"):
        model.encode(torch.randn(1, 64))
    with pytest.raises(ValueError, match="0..63"):
        model.decode(torch.full((1, 1, 4), 64))
    with pytest.raises(ValueError, match="1..2 codebooks"):
        model.decode(torch.zeros(1, 3, 4, dtype=torch.long))
