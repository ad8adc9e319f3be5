"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", arXiv 2103.00020): the byte-level BPE tokenizer, the vision transformer and the
causal text transformer, in the on-disk layout of Hugging Face transformers' CLIP models
(transformers/models/clip/modeling_clip.py), so their checkpoints load without a key remap.

LLaVA sees images through the ViT-L/14 tower; Stable Diffusion 1.5 conditions on the text
tower's last hidden state (after `final_layer_norm`).
"""

import html
import json
import re
import unicodedata
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from minignext import weights


# ---------------------------------------------------------------- tokenizer

# CLIP's word splitter: the special tokens, English contractions, runs of letters,
# single digits, runs of anything else that is not a space.
CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def clean_text(text: str) -> str:
    """CLIP's text cleaning: undo HTML escapes, NFC, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def _special(value, default):
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...} in some tokenizer configs
        value = value.get("content")
    return value or default


class CLIPTokenizer:
    """Text -> (B, max_length) ids: <|startoftext|> words... <|endoftext|> pad..., truncated
    so that the end token always survives."""

    def __init__(self, tokenizer: Tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", model_max_length=77):
        self.tokenizer = tokenizer
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        self.model_max_length = model_max_length

    def _id(self, token):
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise weights.WeightsError(f"tokenizer vocabulary has no {token!r} token")
        return i

    @classmethod
    def from_pretrained(cls, path):
        folder = weights.resolve(path)
        if (folder / "tokenizer").is_dir() and not (folder / "vocab.json").is_file():
            folder = folder / "tokenizer"        # a whole pipeline repo (SD 1.5 layout)
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text()))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = cls.build(folder / "vocab.json", folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tok.no_padding()
            tok.no_truncation()
        else:
            raise weights.WeightsError(f"{folder}: found neither vocab.json + merges.txt nor tokenizer.json")
        max_len = settings.get("model_max_length", 77)
        return cls(tok, bos_token=_special(settings.get("bos_token"), "<|startoftext|>"),
                   eos_token=_special(settings.get("eos_token"), "<|endoftext|>"),
                   pad_token=_special(settings.get("pad_token"), "<|endoftext|>"),
                   model_max_length=max_len if isinstance(max_len, int) and max_len < 10**6 else 77)

    @staticmethod
    def build(vocab_file, merges_file) -> Tokenizer:
        """CLIP BPE from its two files: words end in '</w>', bytes map to printable characters."""
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        tok = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of one text, without start/end tokens."""
        return self.tokenizer.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts, max_length=None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"CLIPTokenizer wants a string or a list of strings, got {type(texts).__name__}")
        max_length = max_length or self.model_max_length
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        out = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id] + self.encode(text)[: max_length - 2] + [self.eos_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.bos_token_id, self.eos_token_id, self.pad_token_id)]
        return self.tokenizer.decode(ids).replace("</w>", " ").strip()
