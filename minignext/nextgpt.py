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

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minignext import media, weights
from minignext.generation import decode_one_token, prefill, sample
from minignext.projection import InputProjection, OutputProjection, OutputProjectionConfig
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
STOP_STRING = "###"


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
            items = [] if items is None else items if isinstance(items, (list, tuple)) else [items]
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
        ### Human: <Img>[soft]</Img> instruction\\n### Assistant: answer\\n### Human: ..."""
        if not self.turns or self.turns[-1].role != "user":
            raise ValueError("the conversation must end with a user turn for the model to answer")
        out = []
        for t, turn in enumerate(self.turns):
            if turn.role == "assistant":
                out.append(f" {turn.text}\n")
                continue
            out.append("### Human: ")
            for k in range(len(turn.media)):
                out += [SPLICE_OPEN, (t, k), SPLICE_CLOSE]
            out.append(f" {turn.text}\n### Assistant:" if turn.media else f"{turn.text}\n### Assistant:")
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
        nums = {m: cfg.num_signal_tokens for m, cfg in output_projections.items()}
        self.signal_ids = {m: [self._token_id(t) for t in signal_token_names(m, n)] for m, n in nums.items()}
        self.splice_ids = (self._token_id(SPLICE_OPEN), self._token_id(SPLICE_CLOSE))

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
            self._decoders[modality] = self.decoder_loaders[modality]()
        return self._decoders[modality]

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
            if isinstance(seg, str):
                ids += [self._token_id(seg)] if seg in (SPLICE_OPEN, SPLICE_CLOSE) else self.tokenizer.encode(seg)
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
        toy weights do not reliably emit signal tokens by themselves."""
        llm = self.llama_model
        forced = None if force_response is None else self.tokenizer.encode(force_response)
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

    # ------------------------------------------------------------ one exchange

    def chat(self, messages, *, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, force_response=None,
             guidance_scale=7.5, num_inference_steps=50, decode=True, progress=True) -> Reply:
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
                media = self.decoder(modality).generate(
                    cond, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
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
                piece = self.tokenizer.decode(chunk) if chunk else ""
                plain.append(piece)
                raw.append(piece)
                chunk = []
                if t is not None:
                    raw.append(names[t])
            elif t != self.tokenizer.eos_id:
                chunk.append(t)
        cut = lambda s: s.split(STOP_STRING)[0].strip()
        return cut(" ".join(p.strip() for p in plain if p.strip())), cut(" ".join(p.strip() for p in raw if p.strip()))


def encoder_input(encoder, modality, source) -> torch.Tensor:
    """A path / PIL image / waveform / frames -> the (1, ...) input ImageBind takes."""
    size = encoder.config.vision_image_size if hasattr(encoder.config, "vision_image_size") else 224
    if modality == "image":
        return media.preprocess_image(media.load_image(source), size=size)[None]
    if modality == "video":
        return media.video_to_imagebind_clips(source, size=size)[None]
    if modality == "audio":
        wave, sr = source if isinstance(source, tuple) else media.load_audio(source)
        return media.waveform_to_imagebind_audio(wave, sr)[None]
    raise ValueError(f"unknown input modality {modality!r}; expected one of image, audio, video")
