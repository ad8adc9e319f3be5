"""Text <-> token ids, and the chat templates NExT-GPT prompts with.

A thin wrapper over the `tokenizers` library reading a `tokenizer.json` (the file
every Hugging Face LLaMA/Vicuna repo ships). The BOS token is added here, not by
the file's post-processor, so `encode(text, add_bos=False)` means what it says.

The Vicuna v0 template is the one NExT-GPT's legacy code builds by hand
(NExT-GPT-Lagacy/code/inference.py and model/anyToImageVideoAudio.py; FastChat's
"###" separator style): turns are `### Human: ...` and `### Assistant: ...`, one
per line, and generation stops at the string "###" (token 835 in Vicuna's vocabulary).
ChatML (`<|im_start|>role\n ... <|im_end|>`) is the template of SmolLM2-Instruct.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, bos_token=None, eos_token=None, adds_bos=True):
        self.tok = tokenizer
        self.bos_id = self._find(bos_token, _BOS_GUESSES)
        self.eos_id = self._find(eos_token, _EOS_GUESSES)
        self.adds_bos = adds_bos and self.bos_id is not None   # does a prompt start with BOS? (add_bos_token)

    @classmethod
    def from_pretrained(cls, folder_or_file) -> "Tokenizer":
        """A folder holding tokenizer.json (and optionally tokenizer_config.json), or the file itself."""
        path = Path(folder_or_file).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json; pass a model folder that has one, "
                                    f"or the path of the file")
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        special = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the latter wins
            extra = file.parent / name
            if extra.is_file():
                special.update(json.loads(extra.read_text()))
        return cls(tok, _content(special.get("bos_token")), _content(special.get("eos_token")),
                   adds_bos=special.get("add_bos_token", True))

    def _find(self, token, guesses):
        for t in ([token] if token else []) + list(guesses):
            i = self.tok.token_to_id(t)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos=True, special=True) -> list[int]:
        """special=False reads special tokens written in `text` ("</s>", NExT-GPT's "<Img>") as
        plain text, so what a user types never becomes a control token."""
        before, self.tok.encode_special_tokens = self.tok.encode_special_tokens, not special
        try:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = before
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special=False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens that are never split (e.g. NExT-GPT's `<Img>`, `[IMG0]`); returns their ids.
        Tokens already present keep their id."""
        self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self.tok.token_to_id(t) for t in tokens]

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add ordinary tokens that are never split (AnyGPT's media codes); returns their ids.
        Unlike special tokens they stay in the text that decode(skip_special=True) returns."""
        self.tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens])
        return [self.tok.token_to_id(t) for t in tokens]

    def save(self, path, overwrite=False):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        self.tok.save(str(path))
        return path


def _content(token):
    """tokenizer_config.json stores a token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


# ---------------------------------------------------------------- chat templates

@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes one prompt string.

    Each message is `prefix[role] + content + sep`; a generation prompt is the
    assistant prefix without a trailing space. `stop` are the strings at which
    generated text ends.
    """
    name: str
    user: str
    assistant: str
    system: str = ""
    sep: str = "\n"
    stop: tuple = ()

    def render(self, messages, add_generation_prompt=True) -> str:
        prefixes = {"user": self.user, "assistant": self.assistant, "system": self.system}
        parts = []
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            if role not in prefixes or not isinstance(m.get("content"), str):
                raise ValueError(f"a message must be {{'role': 'user'|'assistant'|'system', 'content': str}}, "
                                 f"got {m!r}")
            parts.append(prefixes[role] + m["content"] + self.sep)
        if add_generation_prompt:
            parts.append(self.assistant.rstrip(" "))
        return "".join(parts)

    def system_block(self, system: str) -> str:
        """A system message as the prompt's first piece, in this template's layout."""
        return self.render([{"role": "system", "content": system}], add_generation_prompt=False)

    def cut(self, text: str) -> str:
        """The generated text up to the first stop string, stripped."""
        for s in self.stop:
            text = text.split(s, 1)[0]
        return text.strip()


VICUNA_V0 = ChatTemplate(name="vicuna_v0", user="### Human: ", assistant="### Assistant: ", stop=("###",))
# ChatML, as SmolLM2-Instruct and many others are tuned on; <|im_end|> is one special token.
CHATML = ChatTemplate(name="chatml", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n",
                      system="<|im_start|>system\n", sep="<|im_end|>\n", stop=("<|im_end|>",))
PLAIN = ChatTemplate(name="plain", user="", assistant="")
TEMPLATES = {t.name: t for t in (VICUNA_V0, CHATML, PLAIN)}
