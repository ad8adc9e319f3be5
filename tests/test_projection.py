"""OutputProjection against a reference TextFcLayer built on torch.nn.Transformer with the
official hyper-parameters and key names; InputProjection against a plain Linear."""

import warnings

import pytest
import torch
from torch import nn

from minignext import weights
from minignext.projection import InputProjection, OutputProjection, OutputProjectionConfig


class ReferenceTextFcLayer(nn.Module):
    """NExT-GPT's TextFcLayer, mode 'transformer', on nn.Transformer (test oracle)."""

    def __init__(self, in_dim, out_dim, num_output_tokens, hidden=512, layers=4, ff=2048):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        with warnings.catch_warnings():           # nested tensors are off with norm_first; fine
            warnings.simplefilter("ignore")
            self.tfm = nn.Transformer(batch_first=True, norm_first=True, d_model=hidden, nhead=4,
                                      num_encoder_layers=layers, num_decoder_layers=layers,
                                      dim_feedforward=ff, dropout=0.0)
        self.model = nn.Linear(hidden, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden))

    def forward(self, x, input_embs):
        x = self.fc(x + input_embs)
        return self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_output_projection_matches_nn_transformer(modality, tmp_path):
    torch.manual_seed(0)
    official = OutputProjectionConfig.official(modality, in_dim=64)
    ref = ReferenceTextFcLayer(64, official.out_dim, official.num_queries).eval()
    path = weights.save_safetensors(ref.state_dict(), tmp_path / "proj.safetensors")

    ours = weights.build_on_meta(OutputProjection, official)
    assert set(ours.state_dict()) == set(ref.state_dict())
    weights.load_into(ours, weights.load_safetensors(path), device="cpu")

    n = official.num_signal_tokens
    hidden, embs = torch.randn(2, n, 64), torch.randn(2, n, 64)
    with torch.no_grad():
        # stage by stage: fc, encoder memory, decoder output, final linear
        x = ref.fc(hidden + embs)
        torch.testing.assert_close(ours.fc(hidden + embs), x, atol=1e-5, rtol=0)
        mem_ref = ref.tfm.encoder(x)
        torch.testing.assert_close(ours.tfm.encoder(x), mem_ref, atol=1e-5, rtol=0)
        q = ref.query_embs.repeat(2, 1, 1)
        torch.testing.assert_close(ours.tfm.decoder(q, mem_ref), ref.tfm.decoder(q, mem_ref), atol=1e-5, rtol=0)
        out = ours(hidden, embs)
        expected = ref(hidden, embs)
    assert out.shape == (2, official.num_queries, official.out_dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_tiny_default_matches_reference_layout():
    c = OutputProjectionConfig.tiny()
    ref = ReferenceTextFcLayer(c.in_dim, c.out_dim, c.num_queries, hidden=c.d_model,
                               layers=c.num_encoder_layers, ff=c.dim_feedforward).eval()
    ours = OutputProjection(c)
    ours.load_state_dict(ref.state_dict())
    h, e = torch.randn(3, c.num_signal_tokens, c.in_dim), torch.randn(3, c.num_signal_tokens, c.in_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(h, e), ref(h, e), atol=1e-5, rtol=0)


def test_input_projection_is_one_soft_token_per_input():
    proj = InputProjection(16, 24)
    lin = nn.Linear(16, 24)
    proj.load_state_dict(lin.state_dict())
    x = torch.randn(3, 16)
    out = proj(x)
    assert out.shape == (3, 1, 24)
    torch.testing.assert_close(out[:, 0], x @ lin.weight.T + lin.bias)
    assert set(proj.state_dict()) == {"weight", "bias"}
