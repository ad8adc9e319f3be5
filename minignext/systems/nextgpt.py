"""NExT-GPT (Wu et al. 2023, "NExT-GPT: Any-to-Any Multimodal LLM", arXiv 2309.05519),
the loop that joins the parts; reference: NExT-GPT-Lagacy code/model/anyToImageVideoAudio.py.

    encode   ImageBind: each input image / audio / video -> one 1024-d vector
    project  llama_proj: -> ONE soft token, spliced as  <Img> [soft] </Img>
    LLM      Vicuna reads the Vicuna-v0 prompt, writes text and signal tokens
             [IMG0..3], [VID0..23], [AUD0..7]
    project  gen_text_hidden_fcs{,_video,_audio}: hidden states AT the signal tokens
             + their input embeddings -> the decoder's text conditioning
    decode   image / video / audio diffusion pipelines, loaded on demand
"""

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minignext import media, weights
from minignext.generation import decode_one_token, prefill, sample
from minignext.projection import InputProjection, OutputProjection, OutputProjectionConfig
from minignext.tokenizer import VICUNA_V0
from minignext.utils import progress as progress_bar
from minignext.weights import WeightsError


# ---------------------------------------------------------------- the official delta checkpoint

# The NExT-GPT release `pytorch_model.pt` holds only what stage 3 trained: the LoRA
# factors (peft names, under `llama_model.base_model.model.`), the resized embed_tokens
# and lm_head, llama_proj and the three output projections. We keep its names, minus
# peft's wrapper, so that they are this module's own parameter names.
DELTA_RENAMES = (                       # (old substring, new substring), applied in order
    ("llama_model.base_model.model.", "llama_model."),
    (".lora_A.default.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_B.weight"),
)
DELTA_PREFIXES = ("llama_model.", "llama_proj.", "gen_text_hidden_fcs.", "gen_text_hidden_fcs_video.",
                  "gen_text_hidden_fcs_audio.")


def delta_key(key, tensor):
    for old, new in DELTA_RENAMES:
        key = key.replace(old, new)
    if not key.startswith(DELTA_PREFIXES):
        raise WeightsError(f"unexpected key {key} in the NExT-GPT delta; expected keys under "
                           f"{', '.join(DELTA_PREFIXES)}")
    return [(key, tensor)]


def convert_delta(src, dst, overwrite=False):
    """NExT-GPT's `pytorch_model.pt` (a pickle) -> safetensors, read with weights_only=True.
    `dst` is a .safetensors file or a folder (then dst/delta.safetensors)."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst / "delta.safetensors"
    return weights.convert_pickle(src, dst, rename=delta_key, overwrite=overwrite)


def apply_delta(llm, delta: dict, lora_alpha=32.0) -> dict:
    """Merge the delta's LoRA into `llm` (W + alpha/r * B A), take its resized embed_tokens and
    lm_head; return the remaining (projection) tensors, prefixes kept."""
    rest, lora = {}, {}
    for key, t in delta.items():
        if not key.startswith("llama_model."):
            rest[key] = t
        elif ".lora_" in key:
            lora[key] = t
    embed, head = delta.get("llama_model.model.embed_tokens.weight"), delta.get("llama_model.lm_head.weight")
    if embed is not None:
        if embed.shape[1] != llm.config.hidden_size:
            raise WeightsError(f"delta embed_tokens has shape {tuple(embed.shape)}, the LLM's width is "
                               f"{llm.config.hidden_size}")
        if embed.shape[0] > llm.config.vocab_size:
            llm.resize_token_embeddings(embed.shape[0])
        params = dict(llm.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            params["model.embed_tokens.weight"].copy_(embed)
            if head is not None:
                params["lm_head.weight"].copy_(head)
    params = dict(llm.named_parameters())
    for key_a in [k for k in lora if ".lora_A." in k]:
        target = key_a.removeprefix("llama_model.").replace(".lora_A.weight", ".weight")
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if target not in params or key_b not in lora:
            raise WeightsError(f"delta LoRA {key_a} has no {'LLM weight ' + target if target not in params else key_b}")
        w = params[target]
        with torch.no_grad():
            w.copy_(weights.merge_lora(w, lora[key_a].to(w.device), lora[key_b].to(w.device), alpha=lora_alpha))
    known = {"llama_model.model.embed_tokens.weight", "llama_model.lm_head.weight", *lora}
    stray = [k for k in delta if k.startswith("llama_model.") and k not in known]
    if stray:
        raise WeightsError(f"delta has LLM keys that are neither LoRA nor embeddings: {', '.join(stray[:5])}")
    return rest


# ---------------------------------------------------------------- signal tokens and splicing

SPLICE_OPEN, SPLICE_CLOSE = "<Img>", "</Img>"    # wraps a soft token, whatever its modality
SIGNALS = {"image": ("IMG", 4), "video": ("VID", 24), "audio": ("AUD", 8)}
MODALITIES = tuple(SIGNALS)
STOP_STRING = VICUNA_V0.stop[0]                   # "###"


def signal_token_names(modality, n=None):
    tag, default = SIGNALS[modality]
    return [f"[{tag}{i}]" for i in range(default if n is None else n)]


def added_tokens(num_signal=None):
    """The tokens NExT-GPT adds, in the order that gives [IMG0] id 32002 on Vicuna's 32000."""
    num_signal = num_signal or {}
    names = [SPLICE_OPEN, SPLICE_CLOSE]
    for m in MODALITIES:
        names += signal_token_names(m, num_signal.get(m))
    return names


def add_nextgpt_tokens(tokenizer, llm) -> list:
    """Add <Img>, </Img> and the signal tokens to `tokenizer` and grow `llm`'s embedding and
    lm_head to the new vocabulary. Returns the added ids; train only those rows (freeze_old_rows)."""
    ids = tokenizer.add_special_tokens(added_tokens())
    if tokenizer.vocab_size > llm.config.vocab_size:
        llm.resize_token_embeddings(tokenizer.vocab_size)
    return ids


def freeze_old_rows(param: torch.nn.Parameter, first_new_id: int):
    """Train only the rows >= first_new_id of an embedding / lm_head matrix: a gradient hook
    zeroes the others (the reference leaves all 32038 rows trainable). Returns the hook handle."""
    def hook(grad):
        grad = grad.clone()
        grad[:first_new_id] = 0
        return grad
    param.requires_grad_(True)
    return param.register_hook(hook)


def splice_soft_tokens(token_embeds, soft_tokens, insert_at):
    """Insert soft tokens into a sequence of token embeddings.

    token_embeds (T, H); soft_tokens (N, H); insert_at: N non-decreasing indices into the
    token sequence, soft token i goes right before token insert_at[i]. Returns the spliced
    (T + N, H) sequence and the positions of the soft tokens in it.
    """
    if len(insert_at) != soft_tokens.shape[0]:
        raise ValueError(f"{soft_tokens.shape[0]} soft tokens but {len(insert_at)} insert positions")
    pieces, positions, prev = [], [], 0
    for i, at in enumerate(insert_at):
        if not prev <= at <= token_embeds.shape[0]:
            raise ValueError(f"insert positions must be non-decreasing and within 0..{token_embeds.shape[0]}, "
                             f"got {list(insert_at)}")
        pieces += [token_embeds[prev:at], soft_tokens[i:i + 1]]
        positions.append(at + i)
        prev = at
    pieces.append(token_embeds[prev:])
    return torch.cat(pieces), positions


def find_signal_runs(ids, signal_ids: dict):
    """Scan generated ids for runs of signal tokens. Returns (fixed_ids, runs, notices).

    A complete run is [M0] [M1] ... [Mn-1] in order. A run that starts with [M0] but is cut
    short or out of order is completed (replaced by the full run); signal tokens that do not
    start with [M0] are dropped. runs: [(modality, start)] with start indexing fixed_ids.
    """
    owner = {t: (m, i) for m, toks in signal_ids.items() for i, t in enumerate(toks)}
    fixed, runs, notices, i = [], [], [], 0
    while i < len(ids):
        if ids[i] not in owner:
            fixed.append(ids[i])
            i += 1
            continue
        modality = owner[ids[i]][0]
        j = i
        while j < len(ids) and ids[j] in owner and owner[ids[j]][0] == modality:
            j += 1
        run, full = list(ids[i:j]), list(signal_ids[modality])
        if run[0] != full[0]:
            notices.append(f"dropped {len(run)} {modality} signal token(s) that did not start with "
                           f"the first one (ids {run})")
        else:
            if run != full:
                notices.append(f"completed a partial or out-of-order {modality} signal run "
                               f"({len(run)} of {len(full)} tokens, ids {run})")
            runs.append((modality, len(fixed)))
            fixed += full
        i = j
    return fixed, runs, notices


def extract_signal_states(hidden, ids, run):
    """hidden (B, T, H) over the tokens `ids` (T,) -> the states (B, n, H) at the first place
    where the n tokens of `run` appear back to back."""
    ids, run = [int(i) for i in ids], [int(i) for i in run]
    for start in range(len(ids) - len(run) + 1):
        if ids[start:start + len(run)] == run:
            return signal_states(hidden, start, len(run))
    raise ValueError(f"the signal run {run} does not occur in the token ids")


def signal_states(hidden, start: int, n: int):
    """The hidden states AT the n signal tokens from `start`: hidden[:, start:start+n].

    The reference's inference code reads the states one position earlier (the step that
    *predicted* each token); training reads them at the tokens. We read them at the tokens.
    """
    if start < 0 or start + n > hidden.shape[1]:
        raise ValueError(f"signal run {start}..{start + n - 1} is outside the {hidden.shape[1]} positions")
    return hidden[:, start:start + n]


# ---------------------------------------------------------------- conversations and replies

@dataclass
class Turn:
    role: str                                       # "user" or "assistant"
    text: str
    media: list = field(default_factory=list)       # [(modality, path / PIL / array)]
    soft: list = field(default_factory=list)        # encoded soft tokens, cached across turns


class Conversation:
    """A multi-turn chat. Media attached to earlier turns stay in the prompt of later ones."""

    def __init__(self):
        self.turns: list[Turn] = []

    def user(self, text, image=None, audio=None, video=None) -> "Conversation":
        media = []
        for modality, items in (("image", image), ("audio", audio), ("video", video)):
            # a list holds several inputs; anything else (a path, an image, a (waveform, rate) pair) is one
            items = [] if items is None else items if isinstance(items, list) else [items]
            media += [(modality, x) for x in items]
        self.turns.append(Turn("user", text, media))
        return self

    def assistant(self, text) -> "Conversation":
        self.turns.append(Turn("assistant", text))
        return self

    @classmethod
    def from_messages(cls, messages) -> "Conversation":
        """A string, or dicts {"role": "user"|"assistant", "content": str, "image"/"audio"/"video": ...}."""
        conv = cls()
        if isinstance(messages, str):
            return conv.user(messages)
        for m in messages:
            role, text = m.get("role", "user"), m.get("content", "")
            if role == "user":
                conv.user(text, m.get("image"), m.get("audio"), m.get("video"))
            elif role == "assistant":
                conv.assistant(text)
            else:
                raise ValueError(f"message role must be 'user' or 'assistant', got {role!r}")
        return conv

    def segments(self):
        """The Vicuna-v0 prompt as text pieces and soft-token slots (turn index, media index):
        ### Human: <Img>[soft]</Img> instruction\\n### Assistant: answer\\n### Human: ...
        Every input gets its own <Img>[soft]</Img>, in order; the reference instead sums the
        embeddings of several inputs of one modality into a single soft token."""
        if not self.turns or self.turns[-1].role != "user":
            raise ValueError("the conversation must end with a user turn for the model to answer")
        out = []
        for t, turn in enumerate(self.turns):
            if turn.role == "assistant":
                out.append(f" {turn.text}{VICUNA_V0.sep}")
                continue
            out.append(VICUNA_V0.user)
            for k in range(len(turn.media)):
                out += [SPLICE_OPEN, (t, k), SPLICE_CLOSE]
            text = f" {turn.text}" if turn.media else turn.text
            out.append(text + VICUNA_V0.sep + VICUNA_V0.assistant.rstrip())
        return out


@dataclass
class Prompt:
    embeds: torch.Tensor            # (1, T, H) the spliced input sequence
    ids: list                       # T token ids, -1 at soft-token positions
    soft_positions: list            # where the soft tokens sit
    soft_modalities: list           # their modality, in order


@dataclass
class Reply:
    text: str                                       # the answer without signal tokens
    images: list = field(default_factory=list)      # PIL images
    audios: list = field(default_factory=list)      # (waveform numpy (N,), sample_rate)
    videos: list = field(default_factory=list)      # uint8 frames (T, H, W, 3)
    notices: list = field(default_factory=list)     # what was fixed, skipped or is missing
    raw_text: str = ""                              # with signal tokens, as kept in the history
    token_ids: list = field(default_factory=list)   # generated ids (after fixing signal runs)
    signals: list = field(default_factory=list)     # [(modality, absolute position of [X0])]
    conditioning: list = field(default_factory=list)  # [(modality, projected tensor)]
    prompt: Prompt | None = None


# ---------------------------------------------------------------- the model

PROJECTION_NAMES = {"image": "gen_text_hidden_fcs", "video": "gen_text_hidden_fcs_video",
                    "audio": "gen_text_hidden_fcs_audio"}


class NextGPT(nn.Module):
    """Encoder + LLM + projections; decoders are built on first use by `decoder_loaders`.

    Attribute names follow the reference (`visual_encoder`, `llama_model`, `llama_proj`,
    `gen_text_hidden_fcs*`), so the official delta loads into `state_dict()` names.
    """

    def __init__(self, visual_encoder, llama_model, tokenizer, output_projections: dict,
                 decoder_loaders: dict | None = None, enc_dim=1024):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.llama_model = llama_model
        self.tokenizer = tokenizer
        self.llama_proj = InputProjection(enc_dim, llama_model.config.hidden_size)
        for modality, cfg in output_projections.items():
            setattr(self, PROJECTION_NAMES[modality], nn.ModuleList([OutputProjection(cfg)]))
        self.decoder_loaders = dict(decoder_loaders or {})
        self._decoders = {}
        self.max_loaded_decoders = None      # 1 keeps a single decoder in memory (nextgpt-7b)
        self.default_steps = 50
        self.default_guidance = 7.5
        nums = {m: cfg.num_signal_tokens for m, cfg in output_projections.items()}
        self.signal_ids = {m: [self._token_id(t) for t in signal_token_names(m, n)] for m, n in nums.items()}
        self.splice_ids = (self._token_id(SPLICE_OPEN), self._token_id(SPLICE_CLOSE))

    @classmethod
    def from_preset(cls, name, dtype=None, device=None) -> "NextGPT":
        """"nextgpt-7b" (the official weights), "toy" (weights/toy/) or "tiny-random"."""
        return _from_preset(name, dtype=dtype, device=device)

    def _token_id(self, token):
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise WeightsError(f"the tokenizer has no {token!r} token; add NExT-GPT's tokens with "
                               f"add_nextgpt_tokens(tokenizer, llm) first")
        return i

    def output_projection(self, modality) -> OutputProjection:
        return getattr(self, PROJECTION_NAMES[modality])[0]

    @property
    def device(self):
        return self.llama_proj.weight.device

    # ------------------------------------------------------------ decoders, on demand

    def decoder(self, modality):
        """The decoder for `modality`, loaded the first time it is needed (they are big)."""
        if modality not in self._decoders:
            if modality not in self.decoder_loaders:
                raise ValueError(f"no {modality} decoder is available in this model")
            while self.max_loaded_decoders and len(self._decoders) >= self.max_loaded_decoders:
                self._decoders.pop(next(iter(self._decoders)))          # drop the oldest
            self._decoders[modality] = self.decoder_loaders[modality]()
        return self._decoders[modality]

    @property
    def loaded_decoders(self) -> list:
        return list(self._decoders)

    def unload_decoder(self, modality):
        self._decoders.pop(modality, None)

    # ------------------------------------------------------------ encode and splice

    @torch.no_grad()
    def encode(self, modality, source) -> torch.Tensor:
        """One input (path, PIL image, waveform...) -> its soft token (1, H)."""
        if self.visual_encoder is None:
            raise ValueError("this model has no encoder; it cannot read media inputs")
        x = encoder_input(self.visual_encoder, modality, source).to(self.device)
        name = "audio" if modality == "audio" else "vision"
        return self.llama_proj(self.visual_encoder.embed(name, x).to(self.llama_proj.weight.dtype))[:, 0]

    def build_prompt(self, conversation: Conversation) -> Prompt:
        ids, insert_at, soft, modalities = [], [], [], []
        if self.tokenizer.bos_id is not None:
            ids.append(self.tokenizer.bos_id)
        for seg in conversation.segments():
            if seg in (SPLICE_OPEN, SPLICE_CLOSE):
                ids.append(self._token_id(seg))
                continue
            if isinstance(seg, str):
                ids += self.tokenizer.encode(seg, add_bos=False)
                continue
            t, k = seg
            turn = conversation.turns[t]
            while len(turn.soft) <= k:                   # encode once, keep for later turns
                modality, source = turn.media[len(turn.soft)]
                turn.soft.append(self.encode(modality, source))
            insert_at.append(len(ids))
            soft.append(turn.soft[k])
            modalities.append(turn.media[k][0])
        embeds = self.llama_model.embed(torch.tensor(ids, device=self.device))
        soft = torch.cat(soft) if soft else embeds[:0]
        embeds, positions = splice_soft_tokens(embeds, soft.to(embeds.dtype), insert_at)
        full_ids = list(ids)
        for p in positions:
            full_ids.insert(p, -1)
        return Prompt(embeds[None], full_ids, positions, modalities)

    # ------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate_ids(self, prompt: Prompt, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None,
                     force_response=None, progress=True):
        """New token ids after the prompt. Like the reference, [X1..] are never sampled and
        sampling [X0] forces the rest of its run. `force_response` (text) teacher-forces the
        whole answer instead of sampling it: a hook for tests and lessons, since random or
        toy weights do not reliably emit signal tokens by themselves. Write a run back to back,
        "[IMG0][IMG1][IMG2][IMG3]": a space between two signal tokens is a token that splits it."""
        llm = self.llama_model
        forced = None if force_response is None else self.tokenizer.encode(force_response, add_bos=False)
        budget = len(forced) if forced is not None else max_new_tokens
        total = prompt.embeds.shape[1] + budget
        if total > llm.config.max_position_embeddings:
            raise ValueError(f"prompt ({prompt.embeds.shape[1]} tokens) + answer ({budget}) exceed the "
                             f"LLM's {llm.config.max_position_embeddings} positions; shorten the conversation")
        blocked = [t for ids in self.signal_ids.values() for t in ids[1:]]
        firsts = {ids[0]: ids[1:] for ids in self.signal_ids.values()}
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        eos = self.tokenizer.eos_id
        out, queue = [], list(forced or [])
        llm.setup_cache(1, total)
        try:
            logits = prefill(llm, inputs_embeds=prompt.embeds)
            for _ in progress_bar(range(budget), desc="generating", enabled=progress):
                if forced is not None or queue:
                    token = queue.pop(0)
                else:
                    logits[:, blocked] = float("-inf")
                    token = int(sample(logits.float().cpu(), temperature, top_p, generator=gen)[0])
                    queue = list(firsts.get(token, []))
                out.append(token)
                if (forced is None and token == eos) or (forced is not None and not queue):
                    break
                if forced is None and not queue and STOP_STRING in self.tokenizer.decode(out[-4:]):
                    break
                pos = prompt.embeds.shape[1] + len(out) - 1
                logits = decode_one_token(llm, torch.tensor([[token]], device=self.device), pos)
        finally:
            llm.clear_cache()
        return out

    @torch.inference_mode()
    def last_hidden(self, prompt: Prompt, new_ids):
        """One forward over prompt + answer; the last-layer states (1, T + N, H)."""
        new = self.llama_model.embed(torch.tensor(new_ids, device=self.device, dtype=torch.long))[None]
        _, hidden = self.llama_model(inputs_embeds=torch.cat([prompt.embeds, new.to(prompt.embeds.dtype)], 1),
                                     return_hidden=True)
        return hidden

    def project(self, modality, hidden, start):
        """Hidden states at the run from `start`, plus the run's own input embeddings ->
        the decoder conditioning: image (1, Q, D), video (1, Q, D), audio (1, D)."""
        ids = torch.tensor(self.signal_ids[modality], device=self.device)
        states = signal_states(hidden, start, len(ids))
        cond = self.output_projection(modality)(states, self.llama_model.embed(ids)[None].to(states.dtype))
        return cond[:, 0] if modality == "audio" else cond

    # ------------------------------------------------------------ saving (the toy preset's layout)

    def save_pretrained(self, folder, decoder_dirs=None, decoder_kwargs=None, encoder_dir=None, overwrite=False):
        """folder/{nextgpt.json, projections.safetensors, llm/ (weights + tokenizer.json)}, plus
        imagebind/ unless `encoder_dir` names an existing ImageBind folder. Decoders are referenced
        by folder (`decoder_dirs`: modality -> diffusers-layout folder), not copied."""
        folder = Path(folder)
        meta_path = folder / "nextgpt.json"
        if meta_path.exists() and not overwrite:
            raise FileExistsError(f"{meta_path} exists; pass overwrite=True to replace it")
        llm_dir = folder / "llm"
        llm_dir.mkdir(parents=True, exist_ok=True)
        (llm_dir / "config.json").write_text(json.dumps(asdict(self.llama_model.config), indent=2))
        weights.save_safetensors(self.llama_model.state_dict(), llm_dir / "model.safetensors", overwrite=overwrite)
        self.tokenizer.save(llm_dir, overwrite=overwrite)
        if encoder_dir is None:
            encoder_dir = folder / "imagebind"
            weights.save_safetensors(self.visual_encoder.state_dict(), encoder_dir / "model.safetensors",
                                     overwrite=overwrite)
            (encoder_dir / "config.json").write_text(json.dumps(self.visual_encoder.config.to_dict(), indent=2))
        proj = {k: v for k, v in self.state_dict().items() if k.startswith(("llama_proj.", "gen_text_hidden_fcs"))}
        weights.save_safetensors(proj, folder / "projections.safetensors", overwrite=overwrite)
        rel = lambda p: os.path.relpath(Path(p).resolve(), folder.resolve())
        meta = {"encoder": rel(encoder_dir), "enc_dim": self.llama_proj.in_features,
                "projections": {m: asdict(self.output_projection(m).config) for m in self.signal_ids},
                "decoders": {m: rel(d) for m, d in (decoder_dirs or {}).items()},
                "decoder_kwargs": dict(decoder_kwargs or {}), "default_steps": self.default_steps}
        meta_path.write_text(json.dumps(meta, indent=2))
        return folder

    # ------------------------------------------------------------ one exchange

    def chat(self, messages, *, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, force_response=None,
             guidance_scale=None, num_inference_steps=None, decode=True, progress=True) -> Reply:
        """Answer the last user turn of `messages` (a string, message dicts or a Conversation;
        a Conversation gets the answer appended). Signal tokens in the answer are projected and
        routed to their decoder; decode=False stops after the projection."""
        conv = messages if isinstance(messages, Conversation) else Conversation.from_messages(messages)
        prompt = self.build_prompt(conv)
        new = self.generate_ids(prompt, max_new_tokens, temperature, top_p, seed, force_response, progress)
        fixed, runs, notices = find_signal_runs(new, self.signal_ids)
        text, raw = self._answer_text(fixed)
        reply = Reply(text=text, raw_text=raw, notices=notices, token_ids=fixed, prompt=prompt)
        if runs:
            hidden = self.last_hidden(prompt, fixed)
            offset = prompt.embeds.shape[1]
            for modality, start in runs:
                with torch.inference_mode():
                    cond = self.project(modality, hidden, offset + start)
                reply.signals.append((modality, offset + start))
                reply.conditioning.append((modality, cond))
                if not decode:
                    continue
                if modality not in self.decoder_loaders:
                    reply.notices.append(f"the model asked for {modality} output, but this model has no "
                                         f"{modality} decoder; skipped")
                    continue
                try:
                    decoder = self.decoder(modality)
                except WeightsError as e:
                    reply.notices.append(f"the {modality} decoder could not be loaded, so no {modality} output: {e}")
                    continue
                media = decoder.generate(
                    cond, guidance_scale=guidance_scale or self.default_guidance, num_inference_steps=num_inference_steps or self.default_steps,
                    seed=seed, progress=progress)
                {"image": reply.images, "audio": reply.audios, "video": reply.videos}[modality].extend(media)
        if isinstance(messages, Conversation):
            messages.assistant(raw)
        return reply

    def _answer_text(self, ids):
        """(text without signal tokens, text with them) of the answer, cut at the stop string."""
        names = {t: n for m, ids_ in self.signal_ids.items() for t, n in zip(ids_, signal_token_names(m, len(ids_)))}
        plain, raw, chunk = [], [], []
        for t in list(ids) + [None]:
            if t in names or t is None:
                piece = self.tokenizer.decode(chunk, skip_special=True) if chunk else ""
                plain.append(piece)
                raw.append(piece)
                chunk = []
                if t is not None:
                    raw.append(names[t])
            elif t != self.tokenizer.eos_id:
                chunk.append(t)
        cut = lambda s: s.split(STOP_STRING)[0].strip()
        raw = " ".join(p.strip() for p in raw if p.strip())
        raw = re.sub(r"\s+(?=\[(?:IMG|VID|AUD)\d+\])", "", raw)   # runs back to back, as they were generated
        return cut(" ".join(p.strip() for p in plain if p.strip())), cut(raw)


def encoder_input(encoder, modality, source) -> torch.Tensor:
    """A path / PIL image / (waveform, sr) / frames -> the (1, ...) input ImageBind takes."""
    c = encoder.config
    if modality == "image":
        return media.preprocess_image(media.load_image(source), size=c.image_size)[None]
    if modality == "video":
        return media.video_to_imagebind_clips(source, size=c.image_size, frames_per_clip=c.video_frames)[None]
    if modality == "audio":
        wave, sr = source if isinstance(source, tuple) else media.load_audio(source)
        return media.waveform_to_imagebind_audio(wave, sr, num_mel_bins=c.audio_num_mel_bins,
                                                 target_length=c.audio_target_len)[None]
    raise ValueError(f"unknown input modality {modality!r}; expected one of image, audio, video")


# ---------------------------------------------------------------- decoders

class Decoder:
    """A diffusion pipeline behind one interface: conditioning in, media out.

    The pipelines themselves embed "" with their own text encoder for the unconditional
    branch of classifier-free guidance, as the reference does.
    """

    def __init__(self, modality, pipeline, **call_kwargs):
        self.modality, self.pipeline, self.call_kwargs = modality, pipeline, call_kwargs

    def generate(self, cond, guidance_scale=7.5, num_inference_steps=50, seed=0, progress=True):
        out = self.pipeline(prompt_embeds=cond, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                            seed=seed, progress=progress, **self.call_kwargs)
        if self.modality == "image":
            return list(out)
        if self.modality == "audio":
            return [(np.asarray(w, dtype=np.float32).reshape(-1), self.pipeline.sampling_rate) for w in out]
        return [(np.clip(v, 0, 1) * 255).round().astype(np.uint8) for v in out]     # frames (T, H, W, 3)


# ---------------------------------------------------------------- presets

PRESETS = ("nextgpt-7b", "toy", "tiny-random")
REAL_DIR = weights.WEIGHTS_DIR / "real" / "nextgpt-7b"
TOY_DIR = weights.WEIGHTS_DIR / "toy"
HUB = {"delta": "ChocoWu/nextgpt_7b_tiva_v0", "image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
       "audio": "cvssp/audioldm-l-full", "video": "cerspense/zeroscope_v2_576w"}


def default_preset() -> str:
    return "toy" if (TOY_DIR / "nextgpt" / "nextgpt.json").is_file() else "tiny-random"


def _from_preset(name, dtype=None, device=None):
    if name == "tiny-random":
        return tiny_random()
    if name == "toy":
        if not (TOY_DIR / "nextgpt" / "nextgpt.json").is_file():
            raise WeightsError(f"the toy weights are not there yet ({TOY_DIR / 'nextgpt'} is missing); they "
                               f"come from the toy-world training. Use --preset tiny-random meanwhile.")
        return load_folder(TOY_DIR / "nextgpt", dtype=dtype, device=device)
    if name == "nextgpt-7b":
        return nextgpt_7b(dtype=dtype, device=device)
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def nextgpt_7b(dtype=None, device=None):
    """The official parts: converted ImageBind-huge, a local Vicuna-7B-v0, the converted delta,
    and SD-1.5 / AudioLDM / ZeroScope from the hub (loaded on first use)."""
    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.tokenizer import Tokenizer

    need = {"imagebind": REAL_DIR / "imagebind", "vicuna": REAL_DIR / "vicuna-7b-v0",
            "delta": REAL_DIR / "delta.safetensors"}
    missing = [f"{k} ({p})" for k, p in need.items() if not p.exists()]
    if missing:
        raise WeightsError(
            f"the nextgpt-7b preset is missing: {', '.join(missing)}. Run `minignext download nextgpt-7b` "
            f"(it fetches and converts the NExT-GPT delta, fetches the decoders, and says how to get "
            f"ImageBind-huge). Vicuna-7B-v0 is LLaMA-7B plus "
            f"lmsys/vicuna-7b-delta-v0; merge them with FastChat's apply_delta and save the HF folder "
            f"(config.json, *.safetensors, tokenizer.json) as {need['vicuna']}.")
    dtype = dtype or torch.float16
    llm = Llama.from_pretrained(need["vicuna"], dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(need["vicuna"])
    tok.add_special_tokens(added_tokens())
    delta = weights.load_safetensors(need["delta"], dtype=dtype, device=device or "cpu")
    rest = apply_delta(llm, delta)
    encoder = ImageBind.from_pretrained(need["imagebind"], dtype=dtype, device=device)
    projections = {m: OutputProjectionConfig.official(m, llm.config.hidden_size) for m in MODALITIES}
    clap_empty = REAL_DIR / "audioldm_unconditional.safetensors"
    loaders = {"image": lambda: Decoder("image", _hub_pipeline("ImagePipeline", HUB["image"], dtype, device)),
               "audio": lambda: Decoder("audio", _hub_pipeline("AudioPipeline", HUB["audio"], dtype, device,
                                                                unconditional=clap_empty), audio_length_in_s=5.0),
               "video": lambda: Decoder("video", _hub_pipeline("VideoPipeline", HUB["video"], dtype, device),
                                        height=320, width=576, num_frames=24)}
    model = NextGPT(encoder, llm, tok, projections, loaders, enc_dim=encoder.config.out_embed_dim)
    load_projections(model, rest, dtype=dtype, device=device)
    model.max_loaded_decoders = 1          # like the reference, one decoder at a time next to the LLM
    return model.eval()


def load_projections(model, tensors: dict, dtype=None, device=None):
    """Strictly load `llama_proj.*` and `gen_text_hidden_fcs*.0.*` (the delta's names)."""
    parts = {"llama_proj": model.llama_proj}
    parts.update({PROJECTION_NAMES[m]: getattr(model, PROJECTION_NAMES[m]) for m in model.signal_ids})
    stray = sorted({k.split(".")[0] for k in tensors} - set(parts))
    if stray:
        raise WeightsError(f"projection checkpoint has parts this model does not: {', '.join(stray)}")
    for name, module in parts.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.split(".")[0] == name}
        weights.load_into(module, sd, dtype=dtype, device=device)


PIPELINES = {"image": "ImagePipeline", "audio": "AudioPipeline", "video": "VideoPipeline"}


def load_folder(folder, dtype=None, device=None) -> NextGPT:
    """A NextGPT saved by `save_pretrained` (the toy preset)."""
    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.tokenizer import Tokenizer

    folder = Path(folder)
    meta = weights.read_config(folder, "nextgpt.json")
    if "delta" in meta:        # base LLM + a delta like the official release (minignext.toy.train_nextgpt)
        dtype = dtype or torch.float32
    encoder = ImageBind.from_pretrained(folder / meta["encoder"], dtype=dtype, device=device)
    llm_dir = folder / meta.get("llm", "llm")
    llm, tok = Llama.from_pretrained(llm_dir, dtype=dtype, device=device), Tokenizer.from_pretrained(llm_dir)
    if "delta" in meta:
        tok.add_special_tokens(added_tokens())
        delta = weights.load_safetensors(folder / meta["delta"], dtype=dtype, device=device or "cpu")
        delta = dict(kv for k, v in delta.items() for kv in delta_key(k, v))
        rest = apply_delta(llm, delta, lora_alpha=meta["lora_alpha"])
    else:
        rest = weights.load_safetensors(folder / "projections.safetensors")
    projections = {m: OutputProjectionConfig.from_dict(d) for m, d in meta["projections"].items()}
    loaders = {}
    for m, path in meta.get("decoders", {}).items():
        kwargs = meta.get("decoder_kwargs", {}).get(m, {})
        loaders[m] = lambda m=m, path=folder / path, kw=kwargs: Decoder(m, _folder_pipeline(m, path, dtype, device), **kw)
    model = NextGPT(encoder, llm, tok, projections, loaders, enc_dim=meta["enc_dim"])
    load_projections(model, rest, dtype=dtype, device=device)
    model.default_steps = meta.get("default_steps", model.default_steps)
    model.default_guidance = meta.get("default_guidance", model.default_guidance)
    return model.eval()


def _folder_pipeline(modality, path, dtype, device):
    """A decoder from a diffusers-layout folder; AudioLDM's unconditional CLAP vector comes from
    unconditional_embeds.safetensors next to it (minignext has no CLAP text encoder) or, for the
    toy decoder, from its own CLIP-style text_encoder/ (the normalised embedding of "")."""
    from minignext import diffusion

    cls = getattr(diffusion, PIPELINES[modality])
    if modality != "audio":
        return cls.from_pretrained(path, dtype=dtype, device=device)
    uncond = Path(path) / "unconditional_embeds.safetensors"
    if not uncond.is_file() and (Path(path) / "text_encoder").is_dir():
        from minignext.clip import CLIPText, CLIPTokenizer

        enc = CLIPText.from_pretrained(Path(path) / "text_encoder", dtype=torch.float32)
        tok = CLIPTokenizer.from_pretrained(Path(path) / "tokenizer")
        with torch.no_grad():
            embeds = F.normalize(enc(tok([""], max_length=tok.model_max_length)).embeds, dim=-1)[0]
        return cls.from_pretrained(path, dtype=dtype, device=device, unconditional_embeds=embeds)
    if not uncond.is_file():
        raise WeightsError(f"{uncond} is missing: the audio decoder needs the CLAP embedding of \"\" for "
                           f"classifier-free guidance (a tensor named 'embeds')")
    embeds = weights.load_safetensors(uncond)["embeds"]
    return cls.from_pretrained(path, dtype=dtype, device=device, unconditional_embeds=embeds)


def _hub_pipeline(cls_name, repo, dtype, device, unconditional=None):
    from minignext import diffusion

    cls = getattr(diffusion, cls_name)
    if unconditional is None:
        return cls.from_pretrained(repo, dtype=dtype, device=device)
    if not Path(unconditional).is_file():     # AudioLDM: minignext has no CLAP text encoder to embed ""
        raise WeightsError(f"{unconditional} is missing: AudioLDM's guidance needs the normalised CLAP text "
                           f"embedding of \"\" (512 values, saved under the name 'embeds'); compute it once with "
                           f"transformers' ClapTextModelWithProjection of {repo}")
    embeds = weights.load_safetensors(unconditional)["embeds"]
    return cls.from_pretrained(repo, dtype=dtype, device=device, unconditional_embeds=embeds)


def download_preset(name, overwrite=False):
    """Fetch (and convert) what a preset needs; yields progress lines."""
    if name == "tiny-random":
        yield "tiny-random is built in-process; nothing to download"
        return
    if name == "toy":
        yield f"the toy weights ship in {TOY_DIR} (or come from the toy-world training); nothing to download"
        return
    from huggingface_hub import hf_hub_download

    REAL_DIR.mkdir(parents=True, exist_ok=True)
    try:
        if not (REAL_DIR / "delta.safetensors").exists() or overwrite:
            pt = hf_hub_download(HUB["delta"], "pytorch_model.pt", local_dir=REAL_DIR / "raw")
            yield f"converted {convert_delta(pt, REAL_DIR / 'delta.safetensors', overwrite=overwrite)}"
        for modality in MODALITIES:
            yield f"{modality} decoder in {weights.resolve(HUB[modality])}"
    except WeightsError:
        raise
    except Exception as e:       # offline, gated, no disk: one clear message for all
        raise WeightsError(f"download failed ({type(e).__name__}: {e}). The hub must be reachable; set "
                           f"HF_HUB_OFFLINE=0 and check the network.") from None
    if not (REAL_DIR / "imagebind").exists():
        yield (f"ImageBind-huge: fetch imagebind_huge.pth from Meta (dl.fbaipublicfiles.com/imagebind) and run "
               f"`minignext convert imagebind imagebind_huge.pth {REAL_DIR / 'imagebind'}`")
    if not (REAL_DIR / "vicuna-7b-v0").exists():
        yield f"Vicuna-7B-v0: merge LLaMA-7B with lmsys/vicuna-7b-delta-v0 into {REAL_DIR / 'vicuna-7b-v0'}"


# ---------------------------------------------------------------- tiny-random: every part small and random

TINY_CORPUS = [
    "### Human: What is in this picture?\n### Assistant: A red circle on a blue background.",
    "### Human: Show me a green square.\n### Assistant: Here is a green square.",
    "### Human: What do you hear?\n### Assistant: A high tone that rises, then falls.",
    "### Human: Make a short video of a ball moving left.\n### Assistant: Here is the video.",
    "### Human: Describe the sound and draw it.\n### Assistant: A low hum. This is how it looks.",
    "### Human: Play a sound like this image.\n### Assistant: Sure, listen to this tone.",
    "the quick brown fox jumps over the lazy dog. a photo of a cat, a dog and a yellow triangle.",
]


def tiny_tokenizer():
    """A byte-level BPE of about 400 tokens trained in-process on TINY_CORPUS (deterministic)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from minignext.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS, trainer)
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>")


def _tiny_clip_text(hidden, with_projection=False, projection_dim=None):
    """A tiny random CLIP text encoder and its byte-level tokenizer (no merges)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from minignext.clip import CLIP_SPLIT, CLIPText, CLIPTextConfig, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    bpe = HFTokenizer(models.BPE(vocab, [], end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    config = CLIPTextConfig.tiny(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=projection_dim or hidden, with_projection=with_projection,
                            eos_token_id=vocab["<|endoftext|>"])
    return CLIPText(config).eval(), CLIPTokenizer(bpe)


TINY = {"llm_hidden": 64, "cond": {"image": (77, 32), "video": (77, 32), "audio": (1, 16)}}


def _tiny_image_pipeline():
    from minignext.diffusion import ImagePipeline
    from minignext.schedulers import DDIMScheduler
    from minignext.unet import UNet2DCondition, UNet2DConditionConfig
    from minignext.vae import AutoencoderKL, AutoencoderKLConfig

    text_encoder, tokenizer = _tiny_clip_text(TINY["cond"]["image"][1])
    unet = UNet2DCondition(UNet2DConditionConfig.tiny(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8,
                                                 cross_attention_dim=TINY["cond"]["image"][1], attention_head_dim=4))
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(16, 32), norm_num_groups=8, sample_size=32))
    return ImagePipeline(unet.eval(), vae.eval(), DDIMScheduler.from_config(SD_SCHEDULER), text_encoder, tokenizer)


SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                "set_alpha_to_one": False, "clip_sample": False, "num_train_timesteps": 1000}


def _tiny_audio_pipeline():
    """AudioLDM in miniature: the CLAP-space vector enters as class_labels; the unconditional
    branch is a tiny random CLIP-style text encoder's normalised embedding of ""."""
    from minignext.diffusion import AudioPipeline
    from minignext.schedulers import DDIMScheduler
    from minignext.unet import UNet2DCondition, UNet2DConditionConfig
    from minignext.vae import AutoencoderKL, AutoencoderKLConfig
    from minignext.vocoder import HifiGan, HifiGanConfig

    dim = TINY["cond"]["audio"][1]
    clap, clap_tok = _tiny_clip_text(32, with_projection=True, projection_dim=dim)
    with torch.no_grad():
        empty = F.normalize(clap(clap_tok([""])).embeds, dim=-1)[0]
    unet = UNet2DCondition(UNet2DConditionConfig.tiny(
        sample_size=8, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
        cross_attention_dim=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=dim, class_embeddings_concat=True))
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4))
    vocoder = HifiGan(HifiGanConfig.tiny(model_in_dim=16, upsample_initial_channel=16, upsample_rates=(8, 8),
                                    upsample_kernel_sizes=(16, 16)))
    scheduler = DDIMScheduler.from_config({**SD_SCHEDULER, "beta_start": 0.0015, "beta_end": 0.0195})
    return AudioPipeline(unet.eval(), vae.eval(), scheduler, vocoder.eval(), unconditional_embeds=empty)


def _tiny_video_pipeline():
    from minignext.diffusion import VideoPipeline
    from minignext.schedulers import DDIMScheduler
    from minignext.unet3d import UNet3DCondition, UNet3DConditionConfig
    from minignext.vae import AutoencoderKL, AutoencoderKLConfig

    text_encoder, tokenizer = _tiny_clip_text(TINY["cond"]["video"][1])
    unet = UNet3DCondition(UNet3DConditionConfig.tiny(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8,
                                                 cross_attention_dim=TINY["cond"]["video"][1], attention_head_dim=8,
                                                 transformer_in_heads=2))
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(16, 32), norm_num_groups=8, sample_size=16))
    return VideoPipeline(unet.eval(), vae.eval(), DDIMScheduler.from_config(SD_SCHEDULER), text_encoder, tokenizer)


TINY_DECODERS = {"image": (_tiny_image_pipeline, {}),
                 "audio": (_tiny_audio_pipeline, {"audio_length_in_s": 0.5}),
                 "video": (_tiny_video_pipeline, {"num_frames": 8})}


def _seeded(seed, build):
    def run():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build()
    return run


def tiny_random() -> "NextGPT":
    """Every part tiny and random, built in-process from fixed seeds: the same model every time.
    Its outputs are noise; it exists to show (and test) the data flow."""
    from minignext.imagebind import ImageBind, ImageBindConfig
    from minignext.llama import Llama, LlamaConfig

    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = ImageBind(ImageBindConfig.tiny()).eval()
        llm = Llama(LlamaConfig.tiny(vocab_size=tok.vocab_size, hidden_size=TINY["llm_hidden"], intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)).eval()
        new = add_nextgpt_tokens(tok, llm)
        with torch.no_grad():              # random rows too, rather than resize's copies of the mean row
            for w in (llm.model.embed_tokens.weight, llm.lm_head.weight):
                w[new] = torch.randn(len(new), w.shape[1]) * w[:new[0]].std()
        projections = {m: OutputProjectionConfig.tiny(in_dim=TINY["llm_hidden"], out_dim=d, num_queries=q,
                                                 num_signal_tokens=SIGNALS[m][1])
                       for m, (q, d) in TINY["cond"].items()}
        loaders = {}
        for i, (m, (build, kwargs)) in enumerate(TINY_DECODERS.items()):
            loaders[m] = _seeded(100 + i, lambda m=m, build=build, kw=kwargs: Decoder(m, build(), **kw))
        model = NextGPT(encoder, llm, tok, projections, loaders, enc_dim=encoder.config.out_embed_dim).eval()
    model.default_steps = 4
    return model
