"""The toy decoders' text encoder: a small CLIP text tower and a word-level tokenizer over the
toy world's vocabulary, shared by the image, audio and video decoders.

Stable Diffusion (Rombach et al. 2022, arXiv 2112.10752, sec. 3.3) conditions its UNet on the
last hidden state of CLIP's text tower; NExT-GPT's output projections learn to imitate exactly
that state. The toy version is the same `minignext.clip.CLIPText`, only small: captions become
CONTEXT_LENGTH word tokens, and the conditioning is (CONTEXT_LENGTH, WIDTH) = (16, 64).
It trains jointly with each decoder's UNet (and is frozen afterwards); 10% of the captions are
dropped to "" so that the UNet also learns the unconditional branch of classifier-free guidance.

On disk it is the Stable Diffusion layout that `CLIPText.from_pretrained` and
`CLIPTokenizer.from_pretrained` read:

    text_encoder/config.json, model.safetensors
    tokenizer/tokenizer.json (a `tokenizers` WordLevel model), tokenizer_config.json

    tok = build_tokenizer();  enc = new_text_encoder(tok)
    states = encode(enc, tok, ["a red circle"])          # (1, 16, 64)
    pooled = embed(enc, tok, ["a red circle"])           # (1, projection_dim), with_projection=True only
    save(folder, enc, tok)                                # folder/text_encoder, folder/tokenizer
"""

import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from minignext import weights
from minignext.clip import CLIP_SPLIT, CLIPText, CLIPTextConfig, CLIPTokenizer
from minignext.toy import world

CONTEXT_LENGTH = 16     # start token + up to 14 words + end token; the longest caption has 11 words
WIDTH = 64
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


def vocabulary() -> list[str]:
    """Every word and punctuation mark the world's text can contain (both phrasing splits), sorted."""
    texts = [w for group in (world.COLOURS, world.PITCHES, world.CONTOURS, world.DIRECTIONS) for w in group]
    for table in (world.SHAPE_WORDS, world.DIRECTION_WORDS):
        texts += [w for words in table.values() for w in words]
    texts += list(world.CONTOUR_VERBS.values())
    for table in (world.CAPTIONS, world.INSTRUCTIONS, world.ANSWERS):
        texts += [t for options in table.values() for t in options]
    texts += [t for pair in world.CHAT for t in pair if t]
    words = set()
    for text in texts:
        text = re.sub(r"\{\w+\}", " ", text)            # template slots are filled by the words above
        words.update(w for w in re.findall(r"[a-z]+|[^\sa-z]", text.lower()) if w not in "|{}")
    return sorted(words)


def build_tokenizer() -> CLIPTokenizer:
    """One id per word: 0 start, 1 end (also the padding, as in CLIP), 2 unknown, then the words."""
    vocab = {t: i for i, t in enumerate([BOS, EOS, UNK] + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")])
    return CLIPTokenizer(tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=CONTEXT_LENGTH)


def text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    """Two layers of width 64 over CONTEXT_LENGTH positions: about 0.11M parameters."""
    fields = dict(vocab_size=tokenizer.tokenizer.get_vocab_size(), hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH,
                  projection_dim=WIDTH, hidden_act="quick_gelu", eos_token_id=tokenizer.eos_token_id)
    return CLIPTextConfig(**{**fields, **overrides})


def new_text_encoder(tokenizer: CLIPTokenizer, seed=0, **overrides) -> CLIPText:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPText(text_config(tokenizer, **overrides))


def encode(text_encoder: CLIPText, tokenizer: CLIPTokenizer, captions) -> torch.Tensor:
    """Captions -> the conditioning the decoders cross-attend to: (B, CONTEXT_LENGTH, WIDTH)."""
    ids = tokenizer(list(captions), max_length=tokenizer.model_max_length)
    return text_encoder(ids.to(text_encoder.text_model.embeddings.token_embedding.weight.device)).last_hidden_state


def embed(text_encoder: CLIPText, tokenizer: CLIPTokenizer, captions) -> torch.Tensor:
    """Captions -> the pooled conditioning AudioLDM's UNet takes as class_labels: the projected end-token
    state, L2-normalised, (B, projection_dim)."""
    ids = tokenizer(list(captions), max_length=tokenizer.model_max_length)
    return F.normalize(text_encoder(ids.to(text_encoder.text_projection.weight.device)).embeds, dim=-1)


def drop_captions(captions, p, rng) -> list[str]:
    """Classifier-free guidance training (Ho & Salimans 2022, sec. 3.2): each caption becomes "" with
    probability p. `rng` is a numpy Generator."""
    keep = world.make_rng(rng).random(len(captions)) >= p
    return [c if k else "" for c, k in zip(captions, keep)]


def save(folder, text_encoder: CLIPText, tokenizer: CLIPTokenizer, dtype=torch.float16, overwrite=False):
    """Write folder/text_encoder (config.json, model.safetensors) and folder/tokenizer."""
    folder = Path(folder)
    enc_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    for path in (enc_dir / "config.json", tok_dir / "tokenizer.json"):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    enc_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
              **dataclasses.asdict(text_encoder.config)}
    (enc_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.to(dtype) for k, v in text_encoder.state_dict().items()}
    weights.save_safetensors(state, enc_dir / "model.safetensors", overwrite=overwrite)
    tokenizer.tokenizer.save(str(tok_dir / "tokenizer.json"))
    settings = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": UNK,
                "model_max_length": tokenizer.model_max_length, "tokenizer_class": "CLIPTokenizer"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return enc_dir, tok_dir


def load(folder) -> tuple[CLIPText, CLIPTokenizer]:
    """The frozen text encoder and tokenizer of a saved decoder folder, upcast to fp32."""
    folder = Path(folder)
    return (CLIPText.from_pretrained(folder / "text_encoder", dtype=torch.float32).requires_grad_(False),
            CLIPTokenizer.from_pretrained(folder / "tokenizer"))
