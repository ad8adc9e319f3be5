"""NExT-GPT's conversation and reply: the messages a user and the model exchange (text and the
inputs attached to them), the prompt they become in a chat template, with a <Img>[soft]</Img> slot
for every input, and what one answer gives back. The model that reads them is NextGPT in
nextgpt.py.
"""

from dataclasses import dataclass, field

import torch

from minignext.tokenizer import VICUNA_V0, ChatTemplate

SPLICE_OPEN, SPLICE_CLOSE = "<Img>", "</Img>"    # wraps a soft token, whatever its modality
# Inputs and the ImageBind branch that reads each; depth, thermal and IMU need ImageBind-huge's
# branches (the toy ImageBind has vision, text and audio only).
INPUTS = {"image": "vision", "audio": "audio", "video": "vision", "depth": "depth", "thermal": "thermal",
          "imu": "imu"}


@dataclass
class Message:
    role: str                                       # "user" or "assistant"
    text: str
    media: list = field(default_factory=list)       # [(modality, path / PIL / array)]
    soft: list = field(default_factory=list)        # encoded soft tokens, cached across turns


class UserText(str):
    """Text a user wrote: special tokens typed in it are read as plain text."""


class Conversation:
    """A multi-turn chat. Media attached to earlier turns stay in the prompt of later ones.
    `system`: a system message of this conversation's own ("" for none), in place of the model's
    (model.system) when not None."""

    def __init__(self, system: str | None = None):
        if system is not None and not isinstance(system, str):
            raise ValueError(f"a system message is a string; got {type(system).__name__}")
        self.turns: list[Message] = []
        self.system = system

    def user(self, text, image=None, audio=None, video=None, depth=None, thermal=None, imu=None) -> "Conversation":
        if not isinstance(text, str):
            raise ValueError(f"a message's text must be a string; got {type(text).__name__}")
        media = []
        given = {"image": image, "audio": audio, "video": video, "depth": depth, "thermal": thermal, "imu": imu}
        for modality, items in given.items():
            # a list holds several inputs; anything else (a path, an image, a (waveform, rate) pair) is one
            items = [] if items is None else items if isinstance(items, list) else [items]
            media += [(modality, x) for x in items]
        if not text.strip() and not media:
            raise ValueError("the message is empty; write something or attach an input")
        self.turns.append(Message("user", text, media))
        return self

    def assistant(self, text) -> "Conversation":
        self.turns.append(Message("assistant", text))
        return self

    @classmethod
    def from_messages(cls, messages) -> "Conversation":
        """A string, or dicts {"role": "user"|"assistant", "content": str, "image"/"audio"/"video"/...: ...};
        the first may be {"role": "system", "content": str}, the conversation's system message."""
        conv = cls()
        if isinstance(messages, str):
            return conv.user(messages)
        for i, m in enumerate(messages):
            unknown = sorted(set(m) - {"role", "content", *INPUTS}) if isinstance(m, dict) else None
            if unknown is None or unknown:
                raise ValueError(f"a message is a dict of role, content and inputs ({', '.join(INPUTS)}: one, or a "
                                 f"list); got {unknown or type(m).__name__}")
            role, text = m.get("role", "user"), m.get("content", "")
            if role == "system":
                if i or set(m) - {"role", "content"} or not isinstance(text, str):
                    raise ValueError("a system message comes first, and holds only its text (role and content)")
                conv.system = text
            elif role == "user":
                conv.user(text, **{modality: m.get(modality) for modality in INPUTS})
            elif role == "assistant":
                conv.assistant(text)
            else:
                raise ValueError(f"message role must be 'system', 'user' or 'assistant', got {role!r}")
        return conv

    def system_or(self, default: str) -> str:
        """This conversation's own system message, or `default` (a model's) when it has none."""
        return default if self.system is None else self.system

    def segments(self, template: ChatTemplate = VICUNA_V0, system: str = ""):
        """The prompt as text pieces and soft-token slots (turn index, media index). In NExT-GPT's
        Vicuna-v0 template: ### Human: <Img>[soft]</Img> instruction\\n### Assistant: answer\\n### Human: ...
        Every input gets its own <Img>[soft]</Img>, in order; the reference instead sums the
        embeddings of several inputs of one modality into a single soft token. A `system` message,
        when given, opens the prompt as one piece (template.system_block)."""
        if not self.turns or self.turns[-1].role != "user":
            raise ValueError("the conversation must end with a user turn for the model to answer")
        ask = template.assistant.rstrip(" ")              # the generation prompt
        lead = template.assistant[len(ask):]              # what stands before an answer's text
        out = [template.system_block(system)] if system else []
        for t, turn in enumerate(self.turns):
            if turn.role == "assistant":
                out.append(f"{lead}{turn.text}{template.sep}")
                continue
            out.append(template.user)
            for k in range(len(turn.media)):
                out += [SPLICE_OPEN, (t, k), SPLICE_CLOSE]
            text = f" {turn.text}" if turn.media else turn.text
            out += [UserText(text), template.sep + ask]     # the template's own tokens stay special
        return out


@dataclass
class Prompt:
    embeds: torch.Tensor            # (1, T, H) the spliced input sequence
    ids: list                       # T token ids, -1 at soft-token positions
    soft_positions: list            # where the soft tokens sit
    soft_modalities: list           # their modality, in order
    notices: list = field(default_factory=list)     # how inputs were read (a one-frame video as an image)


@dataclass
class Reply:
    text: str                                       # the answer without signal tokens
    images: list = field(default_factory=list)      # PIL images
    audios: list = field(default_factory=list)      # (waveform numpy (N,), sample_rate)
    videos: list = field(default_factory=list)      # uint8 frames (T, H, W, 3)
    notices: list = field(default_factory=list)     # what was fixed, skipped or is missing
    raw_text: str = ""                              # with signal tokens, as kept in the history
    generated_ids: list = field(default_factory=list)  # the ids as the LLM generated them
    token_ids: list = field(default_factory=list)   # the same after fixing signal runs
    signals: list = field(default_factory=list)     # [(modality, absolute position of [X0])]
    conditioning: list = field(default_factory=list)  # [(modality, projected tensor)]
    prompt: Prompt | None = None
