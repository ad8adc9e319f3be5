"""NExT-GPT (Wu et al. 2023, "NExT-GPT: Any-to-Any Multimodal LLM", arXiv 2309.05519),
the loop that joins the parts; reference: NExT-GPT-Lagacy code/model/anyToImageVideoAudio.py.

    encode   ImageBind: each input image / audio / video -> one 1024-d vector
    project  llama_proj: -> ONE soft token, spliced as  <Img> [soft] </Img>
    LLM      Vicuna reads the Vicuna-v0 prompt, writes text and signal tokens
             [IMG0..3], [VID0..23], [AUD0..7]
    project  gen_text_hidden_fcs{,_video,_audio}: hidden states AT the signal tokens
             + their input embeddings -> the decoder's text conditioning
    decode   image / video / audio diffusion pipelines, loaded on demand

This file is the loop, in data-flow order: signal tokens and splicing, then the model; the
conversation it reads and the reply it gives are nextgpt_conversation.py, the decoders behind it
minignext.diffusion.MediaDecoder. The official checkpoint and minignext's folder layout are in
nextgpt_checkpoint.py; ready-made models in minignext/presets.py.
"""

import re

import torch
from torch import nn

from minignext import media
from minignext.diffusion import MediaDecoder  # noqa: F401  (the decoders a NextGPT routes to)
from minignext.generation import check_generation_options, decode_one_token, prefill, sample
from minignext.projection import InputProjection, OutputProjection
from minignext.systems.nextgpt_conversation import (INPUTS, SPLICE_CLOSE, SPLICE_OPEN, Conversation, Prompt,
                                                    Reply, UserText)
from minignext.tokenizer import VICUNA_V0, ChatTemplate
from minignext.utils import progress as progress_bar
from minignext.weights import WeightsError


# ---------------------------------------------------------------- signal tokens and splicing

SIGNALS = {"image": ("IMG", 4), "video": ("VID", 24), "audio": ("AUD", 8)}
MODALITIES = tuple(SIGNALS)


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
    zeroes the others (the reference leaves all 32038 rows trainable). Returns the hook handle.
    The parameter also keeps `first_trained_row`, for FSDP, whose sharded gradients bypass the hook."""
    def hook(grad):
        grad = grad.clone()
        grad[:first_new_id] = 0
        return grad
    param.requires_grad_(True)
    param.first_trained_row = first_new_id
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


# ---------------------------------------------------------------- the model

PROJECTION_NAMES = {"image": "gen_text_hidden_fcs", "video": "gen_text_hidden_fcs_video",
                    "audio": "gen_text_hidden_fcs_audio"}


class NextGPT(nn.Module):
    """Encoder + LLM + projections; decoders are built on first use by `decoder_loaders`.

    Attribute names follow the reference (`visual_encoder`, `llama_model`, `llama_proj`,
    `gen_text_hidden_fcs*`), so the official delta loads into `state_dict()` names.
    """

    def __init__(self, visual_encoder, llama_model, tokenizer, output_projections: dict,
                 decoder_loaders: dict | None = None, enc_dim=1024, template: ChatTemplate = VICUNA_V0,
                 system: str = ""):
        super().__init__()
        self.template = template               # NExT-GPT's Vicuna-v0; ChatML on an LLM tuned with it
        self.system = system                   # a system message that opens every prompt ("": none, as NExT-GPT)
        self.visual_encoder = visual_encoder
        self.llama_model = llama_model
        self.tokenizer = tokenizer
        self.llama_proj = InputProjection(enc_dim, llama_model.config.hidden_size)
        for modality, cfg in output_projections.items():
            setattr(self, PROJECTION_NAMES[modality], nn.ModuleList([OutputProjection(cfg)]))
        self.decoder_loaders = dict(decoder_loaders or {})
        self._decoders = {}
        self.max_loaded_decoders = None      # 1 keeps a single decoder in memory (nextgpt-7b)
        nums = {m: cfg.num_signal_tokens for m, cfg in output_projections.items()}
        self.signal_ids = {m: [self._token_id(t) for t in signal_token_names(m, n)] for m, n in nums.items()}
        self.splice_ids = self._splice_ids()

    @classmethod
    def from_preset(cls, name, dtype=None, device=None) -> "NextGPT":
        """A ready-made model by name; see minignext.presets.PRESETS."""
        from minignext.presets import from_preset

        return from_preset(name, dtype=dtype, device=device)

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None) -> "NextGPT":
        """A model saved by `save_pretrained` (or trained by minignext.toy.train_nextgpt)."""
        from minignext.systems.nextgpt_checkpoint import load_folder

        return load_folder(folder, dtype=dtype, device=device)

    def save_pretrained(self, folder, decoder_dirs=None, decoder_kwargs=None, encoder_dir=None, overwrite=False):
        """See minignext.systems.nextgpt_checkpoint.save_pretrained."""
        from minignext.systems.nextgpt_checkpoint import save_pretrained

        return save_pretrained(self, folder, decoder_dirs, decoder_kwargs, encoder_dir, overwrite)

    def _token_id(self, token):
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise WeightsError(f"the tokenizer has no {token!r} token; add NExT-GPT's tokens with "
                               f"add_nextgpt_tokens(tokenizer, llm) first")
        return i

    def _splice_ids(self):
        """<Img> and </Img>: tokens NExT-GPT adds to the vocabulary."""
        return self._token_id(SPLICE_OPEN), self._token_id(SPLICE_CLOSE)

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

    # ------------------------------------------------------------ encode and splice

    @torch.no_grad()
    def encode(self, modality, source) -> torch.Tensor:
        """One input (path, PIL image, waveform...) -> its soft token (1, H)."""
        if self.visual_encoder is None:
            raise ValueError("this model has no encoder; it cannot read media inputs")
        x = encoder_input(self.visual_encoder, modality, source).to(self.device)
        return self.llama_proj(self.imagebind_vector(INPUTS[modality], x).to(self.llama_proj.weight.dtype))[:, 0]

    def imagebind_vector(self, branch, x):
        """ImageBind's normalised embedding, without the logit scale of its forward."""
        return self.visual_encoder.embed(branch, x)

    def prompt_segments(self, conversation: Conversation) -> list:
        """What build_prompt encodes: the conversation's segments, each text piece on its own."""
        return conversation.segments(self.template, conversation.system_or(self.system))

    def _text_ids(self, seg) -> list:
        if type(seg) is str and seg in (SPLICE_OPEN, SPLICE_CLOSE):
            return [self._token_id(seg)]
        return self.tokenizer.encode(seg, add_bos=False, special=not isinstance(seg, UserText))

    def build_prompt(self, conversation: Conversation, on_progress=None) -> Prompt:
        ids, insert_at, soft, modalities, notices = [], [], [], [], []
        todo, done = sum(len(t.media) - len(t.soft) for t in conversation.turns), 0
        if self.tokenizer.adds_bos:
            ids.append(self.tokenizer.bos_id)
        for seg in self.prompt_segments(conversation):
            if isinstance(seg, str):
                ids += self._text_ids(seg)
                continue
            t, k = seg
            turn = conversation.turns[t]
            while len(turn.soft) <= k:                   # encode once, keep for later turns
                modality, source = turn.media[len(turn.soft)]
                if modality == "video":                  # a video of one frame is read as an image
                    modality, source, note = media.video_or_still(source)
                    turn.media[len(turn.soft)] = (modality, source)
                    notices += [note] if note else []
                turn.soft.append(self.encode(modality, source))
                done += 1
                if on_progress is not None:
                    on_progress(f"encode {modality}", done, todo)
            insert_at.append(len(ids))
            soft.append(turn.soft[k])
            modalities.append(turn.media[k][0])
        embeds = self.llama_model.embed(torch.tensor(ids, device=self.device))
        soft = torch.cat(soft) if soft else embeds[:0]
        embeds, positions = splice_soft_tokens(embeds, soft.to(embeds.dtype), insert_at)
        full_ids = list(ids)
        for p in positions:
            full_ids.insert(p, -1)
        return Prompt(embeds[None], full_ids, positions, modalities, notices)

    def prompt_length(self, conversation: Conversation) -> int:
        """The positions build_prompt takes, counted without encoding any media."""
        return (self.tokenizer.bos_id is not None) + sum(len(self._text_ids(seg)) if isinstance(seg, str) else 1
                                                           for seg in self.prompt_segments(conversation))

    def fit_history(self, conversation: Conversation, new_tokens: int) -> list:
        """Drop the oldest turns until the prompt and `new_tokens` fit in the LLM's positions; the
        inputs of dropped turns move to the first turn kept, newest first, while they still fit.
        Returns a notice of what went."""
        positions = self.llama_model.config.max_position_embeddings
        limit, turns = positions - new_tokens, conversation.turns
        if self.prompt_length(conversation) <= limit:
            return []
        dropped, carried = 0, []                    # (input, its soft token or None), oldest first
        while len(turns) > 1 and (turns[0].role == "assistant" or self.prompt_length(conversation) > limit):
            gone = turns.pop(0)
            dropped += 1
            carried += [(m, gone.soft[i] if i < len(gone.soft) else None) for i, m in enumerate(gone.media)]
        if self.prompt_length(conversation) > limit:
            raise ValueError(f"the last message ({self.prompt_length(conversation)} positions) and {new_tokens} new "
                             f"tokens exceed the LLM's {positions} positions; shorten the conversation's last "
                             f"message or ask for fewer new tokens")
        first, kept = turns[0], []
        for item, soft in reversed(carried):
            first.media.insert(0, item)
            if self.prompt_length(conversation) > limit:
                first.media.pop(0)
                break
            kept.insert(0, soft)
        encoded = kept[:next((i for i, t in enumerate(kept) if t is None), len(kept))]
        first.soft = encoded + first.soft if len(encoded) == len(kept) else encoded   # a cache of a media prefix
        note = f"the conversation outgrew the LLM's {positions} positions, so its {dropped} oldest turns were dropped"
        return [note + (f"; {len(kept)} of their {len(carried)} inputs were kept" if carried else "")]


    # ------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate_ids(self, prompt: Prompt, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None,
                     force_response=None, progress=True, on_progress=None):
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
            checked = logits.device.type != "meta"          # the meta device has shapes, no values
            for _ in progress_bar(range(budget), desc="generating", enabled=progress):
                if checked and not torch.isfinite(logits).all():
                    raise WeightsError(f"the LLM's logits after {len(out)} new tokens are NaN or infinite: its "
                                       f"weights (or an input's soft token) hold non-finite values")
                if forced is not None or queue:
                    token = queue.pop(0)
                else:
                    logits[:, blocked] = float("-inf")
                    token = int(sample(logits.float().cpu(), temperature, top_p, generator=gen)[0])
                    queue = list(firsts.get(token, []))
                out.append(token)
                if on_progress is not None:
                    on_progress("generate", len(out), budget)
                if (forced is None and token == eos) or (forced is not None and not queue):
                    break
                if forced is None and not queue and self.template.stop[0] in self.tokenizer.decode(out[-4:]):
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
             guidance_scale=None, num_inference_steps=None, decode=True, progress=True, on_progress=None) -> Reply:
        """Answer the last user turn of `messages` (a string, message dicts or a Conversation;
        a Conversation gets the answer appended). Signal tokens in the answer are projected and
        routed to their decoder; decode=False stops after the projection. guidance_scale and
        num_inference_steps override every decoder's own defaults (None keeps them; 0 is a value).

        on_progress(phase, done, total), if given, follows the work as it happens, whatever
        `progress` says about the terminal bars: phase "encode <modality>" after each new input,
        "generate" after each answer token (total is the token budget; an answer may stop before
        it), "decode <modality>" after each denoising step."""
        check_generation_options(max_new_tokens, temperature, top_p, guidance_scale, num_inference_steps)
        conv = messages if isinstance(messages, Conversation) else Conversation.from_messages(messages)
        budget = max_new_tokens if force_response is None else len(self.tokenizer.encode(force_response, add_bos=False))
        longest_run = max(map(len, self.signal_ids.values()), default=0)     # a run cut short is completed
        notices = self.fit_history(conv, budget + longest_run)
        prompt = self.build_prompt(conv, on_progress)
        new = self.generate_ids(prompt, max_new_tokens, temperature, top_p, seed, force_response, progress,
                                on_progress)
        fixed, runs, fixes = find_signal_runs(new, self.signal_ids)
        text, raw = self._answer_text(fixed)
        reply = Reply(text=text, raw_text=raw, notices=notices + prompt.notices + fixes, generated_ids=new,
                      token_ids=fixed, prompt=prompt)
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
                except (WeightsError, OSError, ValueError) as e:
                    raise WeightsError(f"the {modality} decoder could not be loaded: {e}") from None
                step = None if on_progress is None else (lambda i, n, m=modality: on_progress(f"decode {m}", i, n))
                media = decoder.generate(cond, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                         seed=seed, progress=progress, on_step=step)
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
        cut = self.template.cut
        raw = " ".join(p.strip() for p in raw if p.strip())
        raw = re.sub(r"\s+(?=\[(?:IMG|VID|AUD)\d+\])", "", raw)   # runs back to back, as they were generated
        return cut(" ".join(p.strip() for p in plain if p.strip())), cut(raw)


def encoder_input(encoder, modality, source) -> torch.Tensor:
    """A path / PIL image / (waveform, sr) / frames / a disparity map (H, W) / IMU readings (6, T)
    -> the (1, ...) input ImageBind takes."""
    c = encoder.config
    if modality == "image":
        return media.preprocess_image(media.load_image(source), size=c.image_size)[None]
    if modality == "video":
        return media.video_to_imagebind_clips(source, size=c.image_size, frames_per_clip=c.video_frames)[None]
    if modality == "audio":
        mel = dict(num_mel_bins=c.audio_num_mel_bins, target_length=c.audio_target_len)
        if isinstance(source, tuple):
            return media.waveform_to_imagebind_audio(*source, **mel)[None]
        return media.audio_to_imagebind(source, **mel)[None]
    if modality == "thermal":
        return media.thermal_to_imagebind(source, size=c.image_size)[None]
    if modality == "depth":
        return media.depth_to_imagebind(source, size=c.image_size)[None]
    if modality == "imu":
        return media.imu_to_imagebind(source, length=c.imu_length)[None]
    raise ValueError(f"unknown input modality {modality!r}; expected one of {', '.join(INPUTS)}")
