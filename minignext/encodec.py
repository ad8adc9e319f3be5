"""EnCodec, a neural audio codec (Défossez et al. 2022, "High Fidelity Neural Audio Compression",
arXiv 2210.13438), in transformers' `EncodecModel` layout.

    wave (B, C, L) -> SEANet encoder: conv, then per ratio a residual block, ELU and a strided conv;
                      an LSTM over time; ELU, conv                      -> frames (B, hidden, L / hop)
                   -> residual vector quantisation (sec. 3.2): codebook k quantises what
                      codebooks 0..k-1 left over                         -> codes (B, n_q, frames)
    codes          -> sum of the chosen codebook rows -> the mirrored decoder (transposed convs) -> wave

The bitrate sets how many codebooks are used: each adds log2(codebook_size) bits per frame, so
n_q = bandwidth / (frame_rate * log2(codebook_size)); decoding any prefix of the codebooks works.

Reference code: transformers `models/encodec/modeling_encodec.py` (inference) and
facebookresearch/encodec `quantization/core_vq.py` (the k-means start, the exponential moving
average update of the codebooks and the commitment loss; the training functions at the end).

Weight normalisation (Salimans & Kingma 2016): each convolution stores a gain g and a direction v
and uses w = g * v / ||v||, the norm taken over all axes but the first. `WeightNorm` computes w in
every forward, under the checkpoint's own names (`conv.parametrizations.weight.original0` is g,
`original1` is v), instead of through torch's parametrize hooks: the formula stays in sight, a
checkpoint loads into two plain parameters with no registration step, and training updates g and v
as the original did. Files written by older torch versions name them `weight_g` / `weight_v`;
`encodec_key` renames those.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minignext import weights
from minignext.utils import config_from_dict


@dataclass
class EncodecConfig:
    target_bandwidths: tuple = (1.5, 3.0, 6.0, 12.0, 24.0)   # kbps; each picks a number of codebooks
    sampling_rate: int = 24_000
    audio_channels: int = 1
    normalize: bool = False                  # encodec_48khz rescales chunks; not implemented
    chunk_length_s: float | None = None      # encodec_48khz encodes 1 s chunks; not implemented
    overlap: float | None = None
    hidden_size: int = 128                   # width of a frame, the input of the quantiser
    num_filters: int = 32                    # channels after the first conv, doubled at every ratio
    num_residual_layers: int = 1
    upsampling_ratios: tuple = (8, 5, 4, 2)  # decoder order; the encoder downsamples in reverse
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True             # pad on the left only (streaming), else on both sides
    pad_mode: str = "reflect"
    compress: int = 2                        # residual blocks narrow to dim // compress
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0            # where a causal transposed conv trims its overhang
    codebook_size: int = 1024
    codebook_dim: int | None = None          # hidden_size if None
    use_conv_shortcut: bool = True           # 1x1 conv on the residual path, else the identity

    def __post_init__(self):
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        if self.norm_type != "weight_norm" or self.normalize or self.chunk_length_s is not None:
            raise ValueError(f"only the streaming EnCodec (norm_type 'weight_norm', no chunks, no normalize; "
                             f"encodec_24khz, encodec_32khz) is implemented, got norm_type={self.norm_type!r}, "
                             f"normalize={self.normalize}, chunk_length_s={self.chunk_length_s}")
        if self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {self.codebook_size}")
        if not self.use_causal_conv and self.trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1.0 only makes sense for causal convolutions")
        if self.num_quantizers < 1:
            raise ValueError(f"the largest target bandwidth ({self.target_bandwidths[-1]} kbps) is below one "
                             f"codebook's rate ({self.frame_rate * math.log2(self.codebook_size) / 1000} kbps)")
        if self.codebook_dim != self.hidden_size:
            raise ValueError(f"codebook_dim ({self.codebook_dim}) must equal hidden_size ({self.hidden_size})")

    @property
    def hop_length(self) -> int:
        """Samples per frame."""
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def num_quantizers(self) -> int:
        """Codebooks for the largest target bandwidth."""
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * math.log2(self.codebook_size)))

    @classmethod
    def from_hf(cls, d: dict) -> "EncodecConfig":
        return config_from_dict(cls, d)

    @classmethod
    def tiny(cls) -> "EncodecConfig":
        """8 kHz, 16 samples per frame, codebooks of 64; 3 kbps = 1 codebook, 6 kbps = 2."""
        return cls(target_bandwidths=(3.0, 6.0), sampling_rate=8000, hidden_size=16, num_filters=4,
                   upsampling_ratios=(4, 4), codebook_size=64, num_lstm_layers=1)


# ---------------------------------------------------------------- convolutions

class WeightNorm(nn.Module):
    """w = g * v / ||v||: original0 is g (one gain per slice along axis 0), original1 is v."""

    def __init__(self, shape):
        super().__init__()
        self.original1 = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_uniform_(self.original1, a=math.sqrt(5))      # nn.Conv1d's default
        self.original0 = nn.Parameter(self._norm(self.original1).detach())   # starts at w = v

    @staticmethod
    def _norm(v):
        return v.norm(dim=tuple(range(1, v.dim())), keepdim=True)

    def forward(self):
        v = self.original1
        return v * (self.original0 / self._norm(v))


class WeightNormConv1d(nn.Module):
    """Conv1d or ConvTranspose1d whose weight comes from WeightNorm."""

    def __init__(self, cin, cout, kernel_size, stride=1, dilation=1, transposed=False):
        super().__init__()
        self.stride, self.dilation, self.transposed = stride, dilation, transposed
        self.kernel_size = kernel_size
        shape = (cin, cout, kernel_size) if transposed else (cout, cin, kernel_size)
        self.parametrizations = nn.ModuleDict({"weight": WeightNorm(shape)})
        bound = 1.0 / math.sqrt(shape[1] * kernel_size)
        self.bias = nn.Parameter(torch.empty(cout))
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self):
        return self.parametrizations["weight"]()

    def forward(self, x):
        if self.transposed:
            return F.conv_transpose1d(x, self.weight, self.bias, self.stride)
        return F.conv1d(x, self.weight, self.bias, self.stride, dilation=self.dilation)


def pad1d(x, left, right, mode):
    """F.pad, except that reflect padding wider than a short input first zero-pads it on the right."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    padded = F.pad(F.pad(x, (0, extra)), (left, right), mode)
    return padded[..., :padded.shape[-1] - extra]


class EncodecConv1d(nn.Module):
    """A conv padded so that frames = ceil(length / stride): `padding_total` = effective kernel - stride
    on the left (causal) or split (right half smaller), plus what completes the last window."""

    def __init__(self, config: EncodecConfig, cin, cout, kernel_size, stride=1, dilation=1):
        super().__init__()
        self.causal, self.pad_mode = config.use_causal_conv, config.pad_mode
        self.conv = WeightNormConv1d(cin, cout, kernel_size, stride, dilation)
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.stride = stride
        self.padding_total = self.effective_kernel - stride

    def forward(self, x):
        length, k, s, total = x.shape[-1], self.effective_kernel, self.stride, self.padding_total
        frames = math.ceil((length - k + total) / s + 1) - 1
        extra = frames * s + k - total - length
        left = total if self.causal else total - total // 2
        return self.conv(pad1d(x, left, total - left + extra, self.pad_mode))


class EncodecConvTranspose1d(nn.Module):
    """A transposed conv that trims its kernel - stride overhang: all of it on the right when
    causal (times trim_right_ratio), else split with the larger half on the left."""

    def __init__(self, config: EncodecConfig, cin, cout, kernel_size, stride):
        super().__init__()
        self.conv = WeightNormConv1d(cin, cout, kernel_size, stride, transposed=True)
        total = kernel_size - stride
        self.trim_right = math.ceil(total * config.trim_right_ratio) if config.use_causal_conv else total // 2
        self.trim_left = total - self.trim_right

    def forward(self, x):
        y = self.conv(x)
        return y[..., self.trim_left:y.shape[-1] - self.trim_right]


class EncodecLSTM(nn.Module):
    """An LSTM over the frames with a residual connection; (B, C, T) in and out."""

    def __init__(self, config: EncodecConfig, dim):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, config.num_lstm_layers)

    def forward(self, x):
        x = x.permute(2, 0, 1)                  # (T, B, C), the LSTM's time-major layout
        return (self.lstm(x)[0] + x).permute(1, 2, 0)


def lstm_by_hand(lstm: nn.LSTM, x):
    """What nn.LSTM computes, for x (T, B, C): per layer and step, the gates
    i, f, o = sigmoid(.), g = tanh(.) of W_ih x_t + b_ih + W_hh h_{t-1} + b_hh (in that order),
    c_t = f * c_{t-1} + i * g, h_t = o * tanh(c_t). Returns the last layer's h for every step."""
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        h = c = x.new_zeros(x.shape[1], lstm.hidden_size)
        outputs = []
        for x_t in x:
            i, f, g, o = (x_t @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        x = torch.stack(outputs)
    return x


class EncodecResnetBlock(nn.Module):
    """SEANet residual block: ELU, conv k (dilated), ELU, conv 1, added to a 1x1 conv (or identity) of the input."""

    def __init__(self, config: EncodecConfig, dim, dilation):
        super().__init__()
        hidden = dim // config.compress
        self.block = nn.ModuleList([
            nn.ELU(), EncodecConv1d(config, dim, hidden, config.residual_kernel_size, dilation=dilation),
            nn.ELU(), EncodecConv1d(config, hidden, dim, 1)])
        self.shortcut = EncodecConv1d(config, dim, dim, 1) if config.use_conv_shortcut else nn.Identity()

    def forward(self, x):
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


class EncodecEncoder(nn.Module):
    def __init__(self, c: EncodecConfig):
        super().__init__()
        layers = [EncodecConv1d(c, c.audio_channels, c.num_filters, c.kernel_size)]
        width = c.num_filters
        for ratio in reversed(c.upsampling_ratios):
            layers += [EncodecResnetBlock(c, width, c.dilation_growth_rate ** j) for j in range(c.num_residual_layers)]
            layers += [nn.ELU(), EncodecConv1d(c, width, 2 * width, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [EncodecLSTM(c, width), nn.ELU(), EncodecConv1d(c, width, c.hidden_size, c.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class EncodecDecoder(nn.Module):
    def __init__(self, c: EncodecConfig):
        super().__init__()
        width = c.num_filters * 2 ** len(c.upsampling_ratios)
        layers = [EncodecConv1d(c, c.hidden_size, width, c.kernel_size), EncodecLSTM(c, width)]
        for ratio in c.upsampling_ratios:
            layers += [nn.ELU(), EncodecConvTranspose1d(c, width, width // 2, 2 * ratio, ratio)]
            width //= 2
            layers += [EncodecResnetBlock(c, width, c.dilation_growth_rate ** j) for j in range(c.num_residual_layers)]
        layers += [nn.ELU(), EncodecConv1d(c, c.num_filters, c.audio_channels, c.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------- residual vector quantisation

class EuclideanCodebook(nn.Module):
    """One codebook. Its rows are buffers, not parameters: training moves them by a moving average
    of the frames assigned to them (update_codebook), not by gradients. `inited` says whether
    k-means has placed them on data yet; cluster_size and embed_avg are the running averages."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.register_buffer("inited", torch.zeros(1))
        self.register_buffer("cluster_size", torch.zeros(config.codebook_size))
        self.register_buffer("embed", torch.randn(config.codebook_size, config.codebook_dim))
        self.register_buffer("embed_avg", self.embed.clone())

    def encode(self, x):
        """x (N, D) -> index of the nearest row (N,), by ||x||^2 - 2 x.e + ||e||^2."""
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return dist.argmin(dim=-1)

    def decode(self, codes):
        return F.embedding(codes, self.embed)


class EncodecVectorQuantization(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.codebook = EuclideanCodebook(config)

    def encode(self, x):
        """(B, D, T) -> (B, T)"""
        b, d, t = x.shape
        return self.codebook.encode(x.transpose(1, 2).reshape(-1, d)).view(b, t)

    def decode(self, codes):
        """(B, T) -> (B, D, T)"""
        return self.codebook.decode(codes).transpose(1, 2)


class EncodecResidualVectorQuantizer(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncodecVectorQuantization(config) for _ in range(config.num_quantizers))

    def encode(self, x, n_q):
        """frames (B, D, T) -> codes (B, n_q, T): each codebook takes what the previous ones left."""
        residual, codes = x, []
        for layer in self.layers[:n_q]:
            c = layer.encode(residual)
            residual = residual - layer.decode(c)
            codes.append(c)
        return torch.stack(codes, dim=1)

    def decode(self, codes):
        """codes (B, n, T) -> the sum of the n codebooks' rows (B, D, T)."""
        return sum(self.layers[k].decode(codes[:, k]) for k in range(codes.shape[1]))


class Encodec(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.config = config
        self.encoder = EncodecEncoder(config)
        self.decoder = EncodecDecoder(config)
        self.quantizer = EncodecResidualVectorQuantizer(config)

    @property
    def codebook_size(self):
        return self.config.codebook_size

    def num_quantizers_for(self, bandwidth=None) -> int:
        """Codebooks used at `bandwidth` kbps (one of target_bandwidths; the first if None)."""
        c = self.config
        bandwidth = c.target_bandwidths[0] if bandwidth is None else bandwidth
        if bandwidth not in c.target_bandwidths:
            raise ValueError(f"bandwidth {bandwidth} kbps is not one of this model's target_bandwidths "
                             f"{list(c.target_bandwidths)}")
        return max(1, math.floor(bandwidth * 1000 / (math.log2(c.codebook_size) * c.frame_rate)))

    def _check_audio(self, audio):
        if audio.dim() != 3 or audio.shape[1] != self.config.audio_channels:
            raise ValueError(f"audio must be (batch, {self.config.audio_channels} channels, samples), "
                             f"got shape {tuple(audio.shape)}")

    def encode(self, audio, bandwidth=None, num_quantizers=None):
        """audio (B, C, L) -> codes (B, n_q, ceil(L / hop_length)). n_q follows `bandwidth`
        (see num_quantizers_for) unless num_quantizers is given."""
        self._check_audio(audio)
        if num_quantizers is None:
            num_quantizers = self.num_quantizers_for(bandwidth)
        elif not 1 <= num_quantizers <= len(self.quantizer.layers):
            raise ValueError(f"num_quantizers must be 1..{len(self.quantizer.layers)}, got {num_quantizers}")
        return self.quantizer.encode(self.encoder(audio), num_quantizers)

    def decode(self, codes):
        """codes (B, n_q, T), any n_q up to the model's -> audio (B, C, T * hop_length)."""
        n = len(self.quantizer.layers)
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= n:
            raise ValueError(f"codes must be (batch, 1..{n} codebooks, frames), got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in 0..{self.codebook_size - 1}, "
                             f"got {int(codes.min())}..{int(codes.max())}")
        return self.decoder(self.quantizer.decode(codes))

    def forward(self, audio, bandwidth=None):
        """-> (codes, audio decoded from them, trimmed to the input length)."""
        codes = self.encode(audio, bandwidth)
        return codes, self.decode(codes)[..., :audio.shape[-1]]

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Encodec":
        """A transformers EncodecModel folder: config.json + model.safetensors."""
        folder = weights.resolve(path)
        model = weights.build_on_meta(cls, EncodecConfig.from_hf(weights.read_config(folder)))
        sd = {}
        for key, t in weights.load_safetensors(folder, stem="model").items():
            sd.update(encodec_key(key, t))
        return weights.load_into(model, sd, dtype=dtype, device=device).eval()


LEGACY_WEIGHT_NORM = ((".weight_g", ".parametrizations.weight.original0"),
                      (".weight_v", ".parametrizations.weight.original1"))


def encodec_key(key, tensor):
    """Old torch.nn.utils.weight_norm names -> parametrizations names; other keys unchanged."""
    for old, new in LEGACY_WEIGHT_NORM:
        if key.endswith(old):
            key = key[:-len(old)] + new
    return [(key, tensor)]


# ---------------------------------------------------------------- training the quantiser

@torch.no_grad()
def init_codebook(codebook: EuclideanCodebook, x, iters=10, generator=None):
    """k-means on the frames x (N, D) places the rows on data (encodec's kmeans_init). The running
    sums start at row * count, so that embed = embed_avg / cluster_size holds from the first step
    (encodec's code starts embed_avg at the rows themselves, which shrinks them until it decays)."""
    k = codebook.embed.shape[0]
    picks = torch.randint(0, x.shape[0], (k,), generator=generator) if x.shape[0] < k \
        else torch.randperm(x.shape[0], generator=generator)[:k]
    means = x[picks.to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, means).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
    codebook.embed.copy_(means)
    codebook.embed_avg.copy_(means * counts[:, None])
    codebook.cluster_size.copy_(counts.float())
    codebook.inited.fill_(1.0)


@torch.no_grad()
def update_codebook(codebook: EuclideanCodebook, x, codes, decay=0.99, eps=1e-5):
    """One exponential-moving-average step (van den Oord et al. 2017, appendix A.1):
    N_k <- decay N_k + (1 - decay) n_k,   m_k <- decay m_k + (1 - decay) sum of the frames coded k,
    e_k = m_k / N_k with N_k Laplace-smoothed so that unused rows do not divide by zero."""
    k = codebook.embed.shape[0]
    onehot = F.one_hot(codes, k).type(x.dtype)                     # (N, K)
    codebook.cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
    codebook.embed_avg.mul_(decay).add_(onehot.t() @ x, alpha=1 - decay)
    n = codebook.cluster_size.sum()
    smoothed = (codebook.cluster_size + eps) / (n + k * eps) * n
    codebook.embed.copy_(codebook.embed_avg / smoothed[:, None])


@torch.no_grad()
def replace_dead_codes(codebook: EuclideanCodebook, x, threshold=2.0, generator=None):
    """Rows whose running count fell below `threshold` restart at random frames of the batch.
    Their running averages restart too (count = threshold), so that the next moving-average step
    keeps the new rows; encodec's code resets only `embed`, which that step then overwrites."""
    dead = codebook.cluster_size < threshold
    if dead.any():
        picks = torch.randint(0, x.shape[0], (int(dead.sum()),), generator=generator).to(x.device)
        codebook.embed[dead] = x[picks]
        codebook.embed_avg[dead] = x[picks] * threshold
        codebook.cluster_size[dead] = threshold


def quantize_for_training(quantizer: EncodecResidualVectorQuantizer, x, n_q, update=True, decay=0.99,
                          eps=1e-5, dead_threshold=2.0, generator=None):
    """Residual quantisation of frames x (B, D, T) with what training needs.

    Returns (quantized, codes (B, n_q, T), commitment loss). `quantized` is the sum of the chosen rows
    in the forward pass and x in the backward pass (straight-through, applied once to the sum).
    The commitment loss is the mean over codebooks of mse(residual_k, sg[row chosen for it]).
    With update=True each codebook is first k-means initialised (once), then its dead rows restart
    and it takes one moving-average step towards the residuals it coded.
    """
    residual, out, codes, losses = x, torch.zeros_like(x), [], []
    for layer in quantizer.layers[:n_q]:
        frames = residual.detach().transpose(1, 2).reshape(-1, x.shape[1])
        if update and not bool(layer.codebook.inited):
            init_codebook(layer.codebook, frames, generator=generator)
        c = layer.encode(residual.detach())
        q = layer.decode(c)
        losses.append(F.mse_loss(residual, q.detach()))
        if update:
            replace_dead_codes(layer.codebook, frames, dead_threshold, generator)
            update_codebook(layer.codebook, frames, c.reshape(-1), decay, eps)
        residual = residual - q.detach()
        out = out + q.detach()
        codes.append(c)
    return x + (out - x).detach(), torch.stack(codes, dim=1), torch.stack(losses).mean()
