"""MelCodec: an EncodecModel over log-mel frames. Its folder loads into transformers' EncodecModel and
gives the same codes and mels; a round trip makes sound of the input's length; bad input is refused."""

from dataclasses import asdict

import pytest
import torch
from torch.testing import assert_close

from minignext.encodec import Encodec, EncodecConfig
from minignext.melcodec import MelCodec, load_audio_tokenizer
from minignext.vocoder import GriffinLimConfig

transformers = pytest.importorskip("transformers")

MEL = GriffinLimConfig(model_in_dim=8, sampling_rate=4000, n_fft=128, hop_length=50, f_max=1500.0, n_iter=2)


def tiny_codec(seed=0) -> MelCodec:
    torch.manual_seed(seed)
    config = EncodecConfig(target_bandwidths=(0.16, 0.32), sampling_rate=80, audio_channels=8, hidden_size=8,
                           num_filters=4, upsampling_ratios=(2,), codebook_size=16, num_lstm_layers=1,
                           use_causal_conv=False)
    codec = MelCodec(Encodec(config), MEL, mel_floor=1e-3).eval()
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            layer.codebook.embed.normal_(0.0, 0.5)
    return codec


def test_folder_is_an_encodec_model_with_mel_settings(tmp_path):
    codec = tiny_codec()
    codec.save_pretrained(tmp_path, dtype=torch.float32)
    mine = load_audio_tokenizer(tmp_path)
    assert isinstance(mine, MelCodec) and mine.mel == MEL and mine.mel_floor == 1e-3
    assert type(Encodec.from_pretrained(tmp_path)) is Encodec          # the codec alone, as transformers sees it
    ref = transformers.EncodecModel.from_pretrained(tmp_path).eval()
    wave = torch.randn(2, 1, 4000)
    mel = mine.log_mel(wave[:, 0])
    assert mel.shape == (2, 8, 80)
    with torch.no_grad():
        ref_codes = ref.quantizer.encode(ref.encoder(mel), 0.32)          # EncodecModel.encode takes 1 or 2 channels
        codes = mine.encode(wave, bandwidth=0.32)
        assert torch.equal(codes, ref_codes.transpose(0, 1)) and codes.shape == (2, 2, 40)
        assert_close(mine.decode_mel(codes), ref.decoder(ref.quantizer.decode(ref_codes)), atol=1e-5, rtol=1e-5)
        again, audio = mine(wave, bandwidth=0.32)
    assert torch.equal(again, codes) and audio.shape == wave.shape
    with pytest.raises(FileExistsError):
        codec.save_pretrained(tmp_path)


def test_griffin_lim_brings_a_tone_back_from_its_mels():
    codec = tiny_codec()
    t = torch.arange(4000) / 4000
    tone = torch.sin(2 * torch.pi * 440 * t)[None]
    wave = codec.vocoder(codec.log_mel(tone).transpose(1, 2))
    spectrum = torch.fft.rfft(wave[0]).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 10                # 1 Hz per bin over one second


def test_bad_configs_and_inputs(tmp_path):
    codec = tiny_codec()
    with pytest.raises(ValueError, match="mel bins"):
        MelCodec(Encodec(EncodecConfig.tiny()), MEL)
    with pytest.raises(ValueError, match="batch, 1 channel, samples"):
        codec.encode(torch.randn(1, 2, 4000))
    with pytest.raises(ValueError, match="at least"):
        codec.encode(torch.randn(1, 1, 10))
    plain = tmp_path / "plain"
    transformers.EncodecModel(transformers.EncodecConfig(**asdict(EncodecConfig.tiny()))).save_pretrained(plain)
    assert type(load_audio_tokenizer(plain)) is Encodec
    with pytest.raises(ValueError, match="no 'mel' settings"):
        MelCodec.from_pretrained(plain)
