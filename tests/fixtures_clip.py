"""A tiny CLIP BPE tokenizer on disk, in the SD-1.5 repo layout (vocab.json + merges.txt +
tokenizer_config.json + special_tokens_map.json), loadable by minignext and by transformers."""

import json
from pathlib import Path

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "circle", "square", "sound",
         "high", "low", "moving", "left", "right", "painting", "astronaut", "riding", "horse"]


def byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def merges_for(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that turn `word` into one token ending in </w>."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    while len(symbols) > 1:
        merges.append((symbols[0], symbols[1]))
        symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def write_tiny_clip_tokenizer(folder, pad_token="<|endoftext|>", model_max_length=77) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in WORDS:
        for pair in merges_for(word):
            if pair not in merges:
                merges.append(pair)
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length,
                  do_lower_case=True, errors="replace", add_prefix_space=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
