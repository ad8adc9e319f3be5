"""Autoregressive text generation for minignext.llama.Llama, apart from the model.

Mirrors the decode loop of pytorch-labs/gpt-fast (generate.py): `prefill()` runs the
prompt once and fills the static KV cache, then `decode_one_token()` feeds back one
token at a time, each step writing one position of the cache. Sampling is greedy
(temperature 0), or temperature with optional top-k (Fan et al. 2018) and nucleus
top-p (Holtzman et al. 2020) filtering, reproducible from a seed.
"""

import math

import numpy as np
import torch

from minignext.utils import progress as progress_bar


@torch.inference_mode()
def prefill(model, input_ids=None, inputs_embeds=None):
    """Run the whole prompt from position 0; return the logits (B, V) of its last token."""
    hidden = model.hidden_states(input_ids, inputs_embeds=inputs_embeds, input_pos=0)
    return model.lm_head(hidden[:, -1])


@torch.inference_mode()
def decode_one_token(model, token, pos: int):
    """token (B, 1) at position `pos` -> logits (B, V) of the next token."""
    return model.lm_head(model.hidden_states(token, input_pos=pos)[:, -1])


def filter_logits(logits, temperature=1.0, top_p=1.0, top_k=None):
    """Scale logits (B, V) by 1/temperature and set those outside top-k / top-p to -inf."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits, temperature=0.0, top_p=1.0, top_k=None, generator=None):
    """logits (B, V) -> token ids (B,): argmax at temperature 0, else a draw."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_p, top_k).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, input_ids=None, max_new_tokens=32, *, inputs_embeds=None, temperature=0.0, top_p=1.0,
             top_k=None, seed=None, stop_token_ids=None, stop_strings=None, tokenizer=None, stream=False,
             progress=True):
    """Generate up to `max_new_tokens` tokens after a prompt.

    With `input_ids` (B, T) returns prompt + new tokens (B, T + N), like transformers;
    with `inputs_embeds` (B, T, hidden) returns only the new tokens (B, N).
    stop_token_ids: None stops at the model's eos token; [] never stops early.
    stop_strings: stop once the decoded new text contains one (needs `tokenizer`);
    the token that completes it is kept. Finished rows are padded with pad/eos.
    stream=True (batch 1) returns an iterator yielding each new token id as an int.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate needs exactly one of input_ids (B, T) or inputs_embeds (B, T, hidden)")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=")
    if stop_token_ids is None:
        eos = model.config.eos_token_id
        stop_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    prompt = input_ids if input_ids is not None else inputs_embeds
    limit = model.config.max_position_embeddings
    if prompt.shape[1] > limit:
        raise ValueError(f"prompt of {prompt.shape[1]} tokens is longer than max_position_embeddings ({limit})")
    if stream and prompt.shape[0] != 1:
        raise ValueError(f"stream=True yields one token at a time for a batch of 1, got batch {prompt.shape[0]}")
    tokens = _loop(model, input_ids, inputs_embeds, max_new_tokens, temperature, top_p, top_k, seed,
                   list(stop_token_ids), list(stop_strings or []), tokenizer, progress)
    if stream:
        return (int(t[0]) for t in tokens)
    new = list(tokens)
    device = prompt.device
    new = torch.stack(new, dim=1) if new else torch.empty(prompt.shape[0], 0, dtype=torch.long, device=device)
    return torch.cat([input_ids, new], dim=1) if input_ids is not None else new


def _loop(model, input_ids, inputs_embeds, max_new_tokens, temperature, top_p, top_k, seed,
          stop_token_ids, stop_strings, tokenizer, progress):
    """Yield the next tokens (B,) one step at a time; the KV cache lives only while it runs."""
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, t = prompt.shape[:2]
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - t)
    if max_new_tokens <= 0:
        return
    device = prompt.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(stop_token_ids, dtype=torch.long, device=device)
    pad = model.config.pad_token_id
    if pad is None or pad < 0:      # some LLaMA configs say -1
        pad = stop_token_ids[0] if stop_token_ids else 0
    done = torch.zeros(b, dtype=torch.bool, device=device)
    texts = [[] for _ in range(b)]

    model.setup_cache(b, t + max_new_tokens, device=device)
    try:  # no inference_mode around the loop: while a stream is paused, the caller's code runs
        logits = prefill(model, input_ids, inputs_embeds)
        steps = progress_bar(range(max_new_tokens), desc="generating", enabled=None if progress else False)
        for i in steps:
            token = sample(logits, temperature, top_p, top_k, generator)
            if stops.numel() or stop_strings:
                token = torch.where(done, pad, token)
            yield token
            if stops.numel():
                done = done | torch.isin(token, stops)
            if stop_strings:
                for row in range(b):
                    texts[row].append(int(token[row]))
                    text = tokenizer.decode(texts[row])
                    if any(s in text for s in stop_strings):
                        done[row] = True
            if (stops.numel() or stop_strings) and bool(done.all()):
                break
            if i + 1 < max_new_tokens:
                logits = decode_one_token(model, token[:, None], t + i)
    finally:
        model.clear_cache()


def check_generation_options(max_new_tokens=1, temperature=0.0, top_p=1.0, guidance_scale=None,
                             num_inference_steps=None):
    """The options of a generation call (the LLM's sampling, a diffusion decoder's guidance and steps),
    checked: None keeps a default, 0 is a value, NaN is an error."""
    def whole(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def real(x):
        return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)

    for name, value, ok, want in (
            ("max_new_tokens", max_new_tokens, whole(max_new_tokens) and max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", temperature, real(temperature) and temperature >= 0, "a finite number >= 0"),
            ("top_p", top_p, real(top_p) and 0 < top_p <= 1, "a number in (0, 1]"),
            ("guidance_scale", guidance_scale, guidance_scale is None or real(guidance_scale) and guidance_scale >= 0,
             "a finite number >= 0"),
            ("num_inference_steps", num_inference_steps,
             num_inference_steps is None or whole(num_inference_steps) and num_inference_steps >= 1,
             "an integer >= 1")):
        if not ok:
            raise ValueError(f"{name} must be {want}; got {value!r}")

