"""AnyGPT (Zhan et al. 2024, "AnyGPT: Unified Multimodal LLM with Discrete Sequence Modeling",
arXiv 2402.12226): every modality becomes discrete tokens of the LLM's own vocabulary.

    image  -> image tokenizer  -> codes c -> <soim> <👀c> ... <eoim>
    speech -> speech tokenizer -> codes c -> <sosp> <🗣️c> ... <eosp>
    music  -> Encodec 32 kHz, 4 codebooks x 2048 -> frame by frame, codebook k's code c becomes
              <🎶{c + 2048 k}>                    -> <somu> ... <eomu>

There is no projection and no signal token: the LLM reads and writes these tokens like words, one
next-token loss trains everything, and media come out by decoding a generated span's codes with
the tokenizer's decoder. Reference code: OpenMOSS/AnyGPT `anygpt/src/m_utils/anything2token.py`
(the layout), `anygpt/src/train/stage1_pretrain.py` (add_tokens, then resize_token_embeddings) and
`anygpt/src/infer/cli_infer_base_model.py` (decoding spans).

The tokenizers here: a VQModel (minignext.vq) for images, where AnyGPT uses SEED, a Q-Former
tokenizer decoded through unCLIP that exists only in its own code; the first codebook of an
Encodec (minignext.encodec) for speech, where AnyGPT uses the first, semantic, layer of
SpeechTokenizer and lets SoundStorm add the acoustic layers; Encodec 32 kHz for music, as AnyGPT.

Two changes from the reference, both for robustness: generation is constrained so that media
spans are always well formed (inside a span only that modality's codes, in frame-major codebook
order for music, an image span exactly one grid long), and parsing a span that is not well formed
raises a ValueError that says where and why, where the reference's regex silently drops or
misreads codes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minignext import weights
from minignext.encodec import Encodec, EncodecConfig
from minignext.generation import decode_one_token, prefill, sample
from minignext.llama import Llama, LlamaConfig
from minignext.melcodec import load_audio_tokenizer
from minignext.tokenizer import Tokenizer
from minignext.vq import VQModel, VQModelConfig


# ---------------------------------------------------------------- the vocabulary layout

@dataclass(frozen=True)
class MediaVocabConfig:
    """How many code tokens each modality adds (names from anything2token.py)."""
    image_vocab_size: int = 8192
    speech_vocab_size: int = 1024
    music_codebook_size: int = 2048
    music_codebook_num: int = 4

    @classmethod
    def tiny(cls) -> "MediaVocabConfig":
        return cls(image_vocab_size=64, speech_vocab_size=64, music_codebook_size=64, music_codebook_num=2)


@dataclass(frozen=True)
class Modality:
    name: str
    prefix: str              # code c is the token f"<{prefix}{c}>"
    start: str
    end: str
    codebook_size: int
    num_codebooks: int = 1   # > 1: frame-major, codebook k's codes offset by k * codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size * self.num_codebooks

    def tokens(self) -> list[str]:
        """In AnyGPT's order: every code, then the start and end tokens."""
        return [f"<{self.prefix}{i}>" for i in range(self.vocab_size)] + [self.start, self.end]


def modalities(config: MediaVocabConfig) -> tuple:
    """Image, speech, music: the order in which AnyGPT adds them."""
    return (Modality("image", "\N{EYES}", "<soim>", "<eoim>", config.image_vocab_size),
            Modality("speech", "\N{SPEAKING HEAD IN SILHOUETTE}\ufe0f", "<sosp>", "<eosp>", config.speech_vocab_size),
            Modality("music", "\N{MULTIPLE MUSICAL NOTES}", "<somu>", "<eomu>", config.music_codebook_size,
                     config.music_codebook_num))


@dataclass
class Segment:
    """A run of text tokens or one media span of a token sequence."""
    modality: str                       # "text", "image", "speech" or "music"
    position: int                       # index of its first token
    ids: list                           # its tokens; a media span's include its start and end tokens
    codes: torch.Tensor | None = None   # image (n,), speech (T,), music (codebooks, T)
    text: str | None = None             # decoded text, when a tokenizer is at hand
    media: torch.Tensor | None = None   # decoded: image (C, H, W), speech and music (channels, samples)


class MediaVocab:
    """Where the media tokens sit: per modality the codes, then its start and end token, contiguous."""

    def __init__(self, config: MediaVocabConfig, first_ids: dict):
        self.config = config
        self.modalities = {m.name: m for m in modalities(config)}
        self.first = {name: first_ids[name] for name in self.modalities}       # id of code 0
        self.start_id = {n: self.first[n] + m.vocab_size for n, m in self.modalities.items()}
        self.end_id = {n: self.start_id[n] + 1 for n in self.modalities}
        self._starts = {i: n for n, i in self.start_id.items()}
        self._ends = {i: n for n, i in self.end_id.items()}

    @classmethod
    def add_to(cls, tokenizer: Tokenizer, config: MediaVocabConfig = MediaVocabConfig()) -> "MediaVocab":
        """Append AnyGPT's media tokens to `tokenizer`, modality after modality (stage1_pretrain.py).
        Resize the LLM to tokenizer.vocab_size afterwards (Llama.resize_token_embeddings)."""
        first = {}
        for m in modalities(config):
            if tokenizer.token_to_id(m.start) is not None or tokenizer.token_to_id(f"<{m.prefix}0>") is not None:
                raise ValueError(f"the tokenizer already holds {m.name} tokens; read its layout with "
                                 f"MediaVocab.from_tokenizer instead of adding them again")
            first[m.name] = tokenizer.add_tokens(m.tokens())[0]
        return cls(config, first)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, music_codebook_num=4) -> "MediaVocab":
        """Read the layout of a tokenizer that already holds AnyGPT's media tokens."""
        sizes, first = {}, {}
        for m in modalities(MediaVocabConfig()):
            ids = {t: tokenizer.token_to_id(t) for t in (f"<{m.prefix}0>", m.start, m.end)}
            missing = [t for t, i in ids.items() if i is None]
            if missing:
                raise ValueError(f"the tokenizer has no {', '.join(missing)}: it is not an AnyGPT vocabulary; "
                                 f"MediaVocab.add_to(tokenizer) adds the media tokens")
            code0, start, end = ids.values()
            size = start - code0
            if size <= 0 or end != start + 1 or tokenizer.token_to_id(f"<{m.prefix}{size - 1}>") != start - 1:
                raise ValueError(f"the {m.name} tokens are not laid out as codes 0..n-1, {m.start}, {m.end} "
                                 f"in consecutive ids ({m.start} is id {start}, {m.end} id {end}, code 0 id {code0})")
            sizes[m.name], first[m.name] = size, code0
        if sizes["music"] % music_codebook_num:
            raise ValueError(f"{sizes['music']} music tokens do not split into {music_codebook_num} codebooks")
        config = MediaVocabConfig(sizes["image"], sizes["speech"], sizes["music"] // music_codebook_num,
                                  music_codebook_num)
        return cls(config, first)

    @property
    def end(self) -> int:
        """One past the largest media id: the LLM's vocabulary must reach it."""
        return max(self.end_id.values()) + 1

    def code_modality(self, i: int) -> str | None:
        for name, m in self.modalities.items():
            if self.first[name] <= i < self.first[name] + m.vocab_size:
                return name
        return None

    def _describe(self, i: int) -> str:
        name = self.code_modality(i)
        if name is not None:
            m = self.modalities[name]
            return f"<{m.prefix}{i - self.first[name]}> (a {name} code)"
        special = self._starts.get(i) or self._ends.get(i)
        if special is not None:
            m = self.modalities[special]
            return m.start if i in self._starts else m.end
        return f"id {i}"

    # ------------------------------------------------------------ codes <-> ids

    def to_ids(self, modality: str, codes) -> list[int]:
        """Codes -> [start, code tokens..., end]. Image codes (any shape) are read row by row;
        music codes (num_codebooks, T) frame by frame, codebook k offset by k * codebook_size."""
        m = self._modality(modality)
        codes = torch.as_tensor(codes, dtype=torch.long).cpu()
        if codes.numel() == 0 or int(codes.min()) < 0 or int(codes.max()) >= m.codebook_size:
            raise ValueError(f"{modality} codes must be a non-empty set of values in 0..{m.codebook_size - 1}")
        if m.num_codebooks == 1:
            local = codes.reshape(-1)
        elif codes.dim() != 2 or codes.shape[0] != m.num_codebooks:
            raise ValueError(f"{modality} codes must be ({m.num_codebooks} codebooks, frames), "
                             f"got shape {tuple(codes.shape)}")
        else:
            offsets = torch.arange(m.num_codebooks)[:, None] * m.codebook_size
            local = (codes + offsets).t().reshape(-1)
        return [self.start_id[modality]] + (local + self.first[modality]).tolist() + [self.end_id[modality]]

    def to_codes(self, modality: str, ids) -> torch.Tensor:
        """The code tokens of one span (without start and end) -> codes; the inverse of to_ids."""
        m = self._modality(modality)
        local = torch.as_tensor(list(ids), dtype=torch.long) - self.first[modality]
        if local.numel() == 0:
            raise ValueError(f"an empty {modality} span: {m.start} is followed directly by {m.end}")
        outside = ((local < 0) | (local >= m.vocab_size)).nonzero()
        if len(outside):
            k = int(outside[0])
            raise ValueError(f"{modality} span, code {k}: {self._describe(int(local[k]) + self.first[modality])} "
                             "is not one of its codes")
        if m.num_codebooks == 1:
            return local
        k, size = m.num_codebooks, m.codebook_size
        if local.numel() % k:
            raise ValueError(f"a music span holds {local.numel()} codes, not whole frames of {k} codebooks")
        frames = local.view(-1, k)                                   # (T, codebooks)
        layer, expected = frames // size, torch.arange(k).expand_as(frames)
        wrong = (layer != expected).flatten().nonzero()
        if len(wrong):
            p = int(wrong[0])
            raise ValueError(f"music span, code {p}: <{m.prefix}{int(local[p])}> belongs to codebook "
                             f"{int(local[p]) // size}, but frame-major order puts codebook {p % k} there")
        return (frames - expected * size).t().contiguous()

    def split(self, ids) -> list[Segment]:
        """A token sequence -> text runs and media spans (codes decoded from the ids).

        Raises ValueError, naming the position, for a start token never closed, an end token with no
        start, a start inside an open span, a code token outside its span, or a span whose codes do
        not fit its modality (see to_codes)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        segments, text_from, i = [], 0, 0
        while i < len(ids):
            t = ids[i]
            if t in self._ends:
                raise ValueError(f"position {i}: {self._describe(t)} closes no span (no "
                                 f"{self.modalities[self._ends[t]].start} before it)")
            if t not in self._starts:
                name = self.code_modality(t)
                if name is not None:
                    raise ValueError(f"position {i}: {self._describe(t)} outside a "
                                     f"{self.modalities[name].start} ... {self.modalities[name].end} span")
                i += 1
                continue
            name, m = self._starts[t], self.modalities[self._starts[t]]
            j = i + 1
            while j < len(ids) and ids[j] != self.end_id[name]:
                if ids[j] in self._starts or ids[j] in self._ends:
                    raise ValueError(f"position {j}: {self._describe(ids[j])} inside the {name} span opened by "
                                     f"{m.start} at position {i}; close it with {m.end} first")
                j += 1
            if j == len(ids):
                raise ValueError(f"position {i}: {m.start} is never closed by {m.end} "
                                 f"({j - i - 1} tokens follow it)")
            try:
                codes = self.to_codes(name, ids[i + 1:j])
            except ValueError as e:
                raise ValueError(f"the {name} span at positions {i}..{j}: {e}") from None
            if text_from < i:
                segments.append(Segment("text", text_from, ids[text_from:i]))
            segments.append(Segment(name, i, ids[i:j + 1], codes))
            text_from = i = j + 1
        if text_from < len(ids):
            segments.append(Segment("text", text_from, ids[text_from:]))
        return segments

    def _modality(self, name) -> Modality:
        if name not in self.modalities:
            raise ValueError(f"unknown modality {name!r}; expected one of {sorted(self.modalities)}")
        return self.modalities[name]


# ---------------------------------------------------------------- the system

@dataclass
class AnyGPTReply:
    ids: list                    # the new tokens
    segments: list               # text and decoded media, in order (Segment)
    unfinished: str | None = None   # a media span cut off by max_new_tokens, left out of segments


class AnyGPT(nn.Module):
    def __init__(self, llm: Llama, vocab: MediaVocab, tokenizer: Tokenizer | None = None,
                 image_tokenizer: VQModel | None = None, speech_tokenizer: Encodec | None = None,
                 music_tokenizer: Encodec | None = None):
        super().__init__()
        if llm.config.vocab_size < vocab.end:
            raise ValueError(f"the LLM has {llm.config.vocab_size} token embeddings but the media tokens reach "
                             f"id {vocab.end - 1}; call llm.resize_token_embeddings(tokenizer.vocab_size)")
        c = vocab.config
        for name, part, want in (("image", image_tokenizer, c.image_vocab_size),
                                 ("speech", speech_tokenizer, c.speech_vocab_size),
                                 ("music", music_tokenizer, c.music_codebook_size)):
            if part is not None and part.codebook_size != want:
                raise ValueError(f"the {name} tokenizer has codebooks of {part.codebook_size}, the vocabulary "
                                 f"makes room for {want}")
        if music_tokenizer is not None and len(music_tokenizer.quantizer.layers) < c.music_codebook_num:
            raise ValueError(f"the music tokenizer has {len(music_tokenizer.quantizer.layers)} codebooks, "
                             f"the vocabulary lays out {c.music_codebook_num}")
        self.llm, self.vocab, self.tokenizer = llm, vocab, tokenizer
        self.image_tokenizer, self.speech_tokenizer, self.music_tokenizer = \
            image_tokenizer, speech_tokenizer, music_tokenizer
        self._masks = {}

    @property
    def image_grid(self) -> int:
        """Codes per side of the images the image tokenizer was trained on."""
        image = self._tokenizer_for("image")
        return image.config.sample_size // image.scale_factor

    def _tokenizer_for(self, modality):
        self.vocab._modality(modality)
        part = {"image": self.image_tokenizer, "speech": self.speech_tokenizer,
                "music": self.music_tokenizer}.get(modality)
        if part is None:
            raise ValueError(f"no {modality} tokenizer was given to this AnyGPT")
        return part

    # ------------------------------------------------------------ media <-> codes <-> ids

    @torch.no_grad()
    def encode_media(self, modality, media) -> torch.Tensor:
        """A batch of media -> codes: images (B, C, H, W) in [-1, 1] -> (B, h * w);
        speech (B, channels, samples) -> (B, T); music -> (B, codebooks, T)."""
        part = self._tokenizer_for(modality)
        if modality == "image":
            return part.encode_codes(media).flatten(1)
        if modality == "speech":
            return part.encode(media, num_quantizers=1)[:, 0]
        return part.encode(media, num_quantizers=self.vocab.config.music_codebook_num)

    @torch.no_grad()
    def decode_codes(self, modality, codes) -> torch.Tensor:
        """The codes of one span -> image (C, H, W), or speech / music (channels, samples)."""
        part = self._tokenizer_for(modality)
        if modality == "image":
            side = int(codes.numel() ** 0.5)
            if side * side != codes.numel():
                raise ValueError(f"an image span of {codes.numel()} codes is not a square grid")
            return part.decode_codes(codes.view(1, side, side).to(self._device))[0]
        if modality == "speech":
            return part.decode(codes.view(1, 1, -1).to(self._device))[0]
        return part.decode(codes[None].to(self._device))[0]

    def media_ids(self, modality, media) -> list[list[int]]:
        """A batch of media -> for each item its token span [start, codes..., end]."""
        return [self.vocab.to_ids(modality, codes) for codes in self.encode_media(modality, media)]

    def decode_ids(self, ids) -> list[Segment]:
        """A token sequence -> its segments, text decoded (with a tokenizer) and media decoded
        (with their tokenizers; media of a modality without one keep only their codes)."""
        segments = self.vocab.split(ids)
        parts = {"image": self.image_tokenizer, "speech": self.speech_tokenizer, "music": self.music_tokenizer}
        for s in segments:
            if s.modality == "text":
                s.text = self.tokenizer.decode(s.ids) if self.tokenizer is not None else None
            elif parts[s.modality] is not None:
                s.media = self.decode_codes(s.modality, s.codes)
        return segments

    @property
    def _device(self):
        return self.llm.lm_head.weight.device

    # ------------------------------------------------------------ training and generation

    def loss(self, input_ids, labels=None):
        """Next-token cross-entropy over text and media tokens alike: the one loss AnyGPT trains
        with. labels default to input_ids; -100 marks positions left out."""
        labels = input_ids if labels is None else labels
        logits = self.llm(input_ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    def _open_span(self, ids):
        """(modality, codes written so far) if `ids` ends inside a media span, else None."""
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] in self.vocab._ends:
                return None
            if ids[i] in self.vocab._starts:
                return self.vocab._starts[ids[i]], len(ids) - i - 1
        return None

    def _logit_mask(self, span):
        """0 where a token may come next, -inf elsewhere: outside spans no code and no end token;
        inside one, its modality's codes (music: the codebook whose turn it is), and its end
        token once the span is whole (an image: exactly image_grid^2 codes)."""
        v = self.vocab
        key = None
        if span is not None:
            name, n = span
            k = v.config.music_codebook_num if name == "music" else 1
            limit = self.image_grid ** 2 if name == "image" and self.image_tokenizer is not None else None
            codes_allowed = limit is None or n < limit
            may_end = n > 0 and n % k == 0 and (limit is None or n == limit)
            key = (name, n % k if codes_allowed else None, may_end)
        if key not in self._masks:
            mask = torch.zeros(self.llm.config.vocab_size)
            if key is None:
                for name in v.modalities:
                    mask[v.first[name]:v.end_id[name] + 1] = float("-inf")
                    mask[v.start_id[name]] = 0.0
            else:
                name, layer, may_end = key
                size = v.modalities[name].codebook_size
                mask.fill_(float("-inf"))
                if layer is not None:
                    mask[v.first[name] + layer * size:v.first[name] + (layer + 1) * size] = 0.0
                if may_end:
                    mask[v.end_id[name]] = 0.0
            self._masks[key] = mask
        return self._masks[key]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=None, seed=None,
                 stop_token_ids=None) -> AnyGPTReply:
        """Continue one token sequence (a list of ids, or (1, T)) and decode what it writes.

        End a prompt with a start token (e.g. <soim>) to ask for that modality. Sampling is
        constrained so that media spans come out well formed (see _logit_mask); a span still open
        after max_new_tokens is left out of the segments and reported in `unfinished`.
        `temperature` is one value, or one per modality being written ({"text": 0.0, "image": 1.0},
        as AnyGPT's per-modality generation configs; a modality left out samples at 1.0)."""
        temperatures = temperature if isinstance(temperature, dict) else None
        if temperatures is not None and set(temperatures) - {"text", *self.vocab.modalities}:
            raise ValueError(f"temperatures are per modality, one of {['text', *self.vocab.modalities]}; "
                             f"got {sorted(temperatures)}")
        ids = torch.as_tensor(input_ids, dtype=torch.long).view(-1).tolist()
        if stop_token_ids is None:
            eos = self.llm.config.eos_token_id
            stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        span = self._check_prompt(ids)
        max_new_tokens = min(max_new_tokens, self.llm.config.max_position_embeddings - len(ids))
        generator = torch.Generator(self._device).manual_seed(seed) if seed is not None else None
        new = []
        self.llm.setup_cache(1, len(ids) + max_new_tokens)
        try:
            logits = prefill(self.llm, torch.tensor([ids], device=self._device))
            for step in range(max_new_tokens):
                mask = self._logit_mask(span).to(logits.device)
                if temperatures is not None:
                    temperature = temperatures.get("text" if span is None else span[0], 1.0)
                token = int(sample(logits + mask, temperature, top_p, top_k, generator)[0])
                new.append(token)
                if span is None and token in stop_token_ids:
                    break
                span = self._next_span(span, token)
                if step + 1 < max_new_tokens:
                    logits = decode_one_token(self.llm, torch.tensor([[token]], device=self._device),
                                              len(ids) + step)
        finally:
            self.llm.clear_cache()
        return self._reply(ids, new, span)

    def _check_prompt(self, ids):
        """Raise ValueError unless the prompt is well formed up to a span it may leave open;
        return that open span, as (modality, codes so far), or None."""
        span = self._open_span(ids)
        opened_at = len(ids) - span[1] - 1 if span else len(ids)
        self.vocab.split(ids[:opened_at])
        state = (span[0], 0) if span else None
        for p in range(opened_at + 1, len(ids)):
            if self._logit_mask(state)[ids[p]] != 0:
                raise ValueError(f"position {p}: {self.vocab._describe(ids[p])} cannot continue the {span[0]} span "
                                 f"opened at position {opened_at}")
            state = self._next_span(state, ids[p])
        return span

    def _next_span(self, span, token):
        if span is None:
            return (self.vocab._starts[token], 0) if token in self.vocab._starts else None
        return None if token in self.vocab._ends else (span[0], span[1] + 1)

    def _reply(self, prompt, new, span):
        """Decode the new tokens, with the span the prompt left open if any; a span still open
        at the end is cut off."""
        opened = self._open_span(prompt)
        whole = (prompt[len(prompt) - opened[1] - 1:] if opened else []) + new
        unfinished = None
        if span is not None:
            whole = whole[:len(whole) - span[1] - 1]
            unfinished = (f"the {span[0]} span was cut off by max_new_tokens after {span[1]} codes; "
                          f"raise max_new_tokens to get it")
        return AnyGPTReply(ids=new, segments=self.decode_ids(whole), unfinished=unfinished)

    # ------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, llm, image_tokenizer=None, speech_tokenizer=None, music_tokenizer=None,
                        dtype=None, device=None) -> "AnyGPT":
        """`llm`: an HF LLaMA folder (config.json, model.safetensors, tokenizer.json holding the
        media tokens); the tokenizers: a diffusers VQModel folder and transformers Encodec folders
        (a MelCodec, minignext.melcodec, where the config.json has mel settings)."""
        folder = weights.resolve(llm)
        model = Llama.from_pretrained(folder, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_pretrained(folder)
        image = VQModel.from_pretrained(image_tokenizer, dtype, device) if image_tokenizer else None
        speech = load_audio_tokenizer(speech_tokenizer, dtype, device) if speech_tokenizer else None
        music = load_audio_tokenizer(music_tokenizer, dtype, device) if music_tokenizer else None
        num = 4
        if music is not None:
            music_tokens = MediaVocab.from_tokenizer(tokenizer, 1).config.music_codebook_size
            num = max(1, music_tokens // music.codebook_size)
        return cls(model, MediaVocab.from_tokenizer(tokenizer, num), tokenizer, image, speech, music).eval()


def tiny_random(seed=0) -> AnyGPT:
    """A tiny random AnyGPT: byte-level BPE + media tokens, a 2-layer LLaMA, a VQModel of 64 codes
    for 32x32 images (8x8 codes), Encodec tokenizers with codebooks of 64 (music: 2 of them)."""
    from minignext.tiny import tiny_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        vocab = MediaVocab.add_to(tokenizer, MediaVocabConfig.tiny())
        llm = Llama(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=176,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512))
        return AnyGPT(llm, vocab, tokenizer, VQModel(VQModelConfig.tiny()), Encodec(EncodecConfig.tiny()),
                      Encodec(EncodecConfig.tiny())).eval()
