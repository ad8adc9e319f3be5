"""Lesson 6 exercises: the any-to-any loop, from its parts.

Solve these before you read minignext/systems/nextgpt.py; then compare. Each function raises
NotImplementedError with a first hint; more hints, each closer to code, are in HINTS at the
bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson06_any_to_any.py --exercises=mine
"""

import torch  # noqa: F401


def splice_soft_tokens(token_embeds, soft_tokens, insert_at):
    """Insert soft tokens into a sequence of token embeddings.

    token_embeds (T, H); soft_tokens (N, H); insert_at: N non-decreasing indices into the token
    sequence; soft token i goes right before token insert_at[i]. Return (spliced (T + N, H),
    positions): positions[i] is where soft token i ends up in the spliced sequence. Raise
    ValueError for decreasing or out-of-range positions.
    """
    raise _stuck("splice_soft_tokens")


def extract_signal_states(hidden, ids, run):
    """hidden (B, T, H): last-layer states over the tokens `ids` (T,). Return the states (B, n, H)
    AT the first place where the n ids of `run` (e.g. [IMG0]..[IMG3]) appear back to back.
    Raise ValueError when the run does not occur."""
    raise _stuck("extract_signal_states")


def any_to_any(model, conversation, force_response=None, max_new_tokens=32, num_inference_steps=None):
    """Answer the last user turn of `conversation` with a NextGPT `model`, wired from its parts:
    return (token_ids, conditioning, media).

    token_ids: the answer's ids after broken signal runs were completed or dropped;
    conditioning: [(modality, tensor)] for every signal run, in order -- image and video (1, Q, D),
    audio (1, D); media: [(modality, output)], the decoder's outputs for that conditioning, made
    with seed 0 and `num_inference_steps` (None: the decoder's own default).

    Parts you may use: model.build_prompt(conversation) (encoding and splicing),
    model.generate_ids(prompt, max_new_tokens, force_response=..., progress=False),
    minignext.systems.nextgpt.find_signal_runs(ids, model.signal_ids), model.last_hidden(prompt, ids),
    model.signal_ids, model.llama_model.embed(ids), model.output_projection(modality),
    model.decoder(modality).generate(cond, num_inference_steps=..., seed=0, progress=False), and
    your extract_signal_states. It must give what model.chat gives."""
    raise _stuck("any_to_any")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "splice_soft_tokens": [
        "Cut the token sequence at each insert position and put the soft token into the cut. "
        "Where a soft token ends up depends on its insert position and on how many soft tokens "
        "were already put in before it.",
        "Walk through the insert positions keeping the previous cut. Collect pieces: the tokens "
        "from the previous cut up to this position, then soft token i as a (1, H) slice. Soft "
        "token i lands at its insert position plus i. After the loop add the remaining tokens and "
        "concatenate all pieces.",
        "pieces, positions, prev = [], [], 0; for i, at in enumerate(insert_at): (check prev <= at <= "
        "T, else raise ValueError); pieces += [token_embeds[prev:at], soft_tokens[i:i + 1]]; "
        "positions.append(at + i); prev = at; pieces.append(token_embeds[prev:]); return "
        "torch.cat(pieces), positions",
    ],
    "extract_signal_states": [
        "Find where the run of signal tokens starts in the ids, and return the hidden states at "
        "exactly those positions: the state AT each signal token, not the one before it.",
        "Turn ids and run into Python lists of ints and compare each window of length n with the "
        "run. The states are a slice of hidden along the time dim (dim 1).",
        "ids, run = [int(i) for i in ids], [int(i) for i in run]; for start in range(len(ids) - "
        "len(run) + 1): if ids[start:start + len(run)] == run: return hidden[:, start:start + "
        "len(run)]; raise ValueError(...)",
    ],
    "any_to_any": [
        "NExT-GPT's loop in order: build the prompt (media become soft tokens), let the LLM write "
        "an answer, repair its signal runs, run the LLM once more over prompt and answer to get "
        "its last hidden states, and for every run project the states at its signal tokens into "
        "the decoder's conditioning, then decode it.",
        "find_signal_runs returns (fixed ids, runs, notices), each run a (modality, start in the "
        "answer). last_hidden covers prompt + answer, so a run's absolute position is the prompt "
        "length (prompt.embeds.shape[1]) plus its start. The output projection takes the states "
        "at the run and the run's own input embeddings (both (1, n, H)); audio keeps only query 0.",
        "prompt = model.build_prompt(conversation); new = model.generate_ids(prompt, max_new_tokens, "
        "force_response=force_response, progress=False); ids, runs, _ = find_signal_runs(new, "
        "model.signal_ids); hidden = model.last_hidden(prompt, ids); for modality, start in runs: run = "
        "model.signal_ids[modality]; states = hidden[:, prompt.embeds.shape[1] + start:][:, :len(run)]; "
        "cond = model.output_projection(modality)(states, model.llama_model.embed(torch.tensor(run))[None]); "
        "cond = cond[:, 0] if modality == 'audio' else cond; media += [(modality, out) for out in "
        "model.decoder(modality).generate(cond, num_inference_steps=num_inference_steps, seed=0, progress=False)]",
    ],
}
