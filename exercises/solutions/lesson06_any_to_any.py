"""Lesson 6 solutions, written out. In minignext/systems/nextgpt.py: `splice_soft_tokens`,
`extract_signal_states` (with `signal_states`), and NextGPT.chat, which is any_to_any plus the
answer's text, the conversation's history and the notices."""

import torch

from minignext.systems.nextgpt import find_signal_runs


def splice_soft_tokens(token_embeds, soft_tokens, insert_at):
    if len(insert_at) != soft_tokens.shape[0]:
        raise ValueError(f"{soft_tokens.shape[0]} soft tokens but {len(insert_at)} insert positions")
    pieces, positions, prev = [], [], 0
    for i, at in enumerate(insert_at):
        if not prev <= at <= token_embeds.shape[0]:
            raise ValueError(f"insert positions must be non-decreasing and within 0..{token_embeds.shape[0]}")
        pieces += [token_embeds[prev:at], soft_tokens[i:i + 1]]
        positions.append(at + i)           # the i soft tokens before it push it i places right
        prev = at
    pieces.append(token_embeds[prev:])
    return torch.cat(pieces), positions


def extract_signal_states(hidden, ids, run):
    ids, run = [int(i) for i in ids], [int(i) for i in run]
    for start in range(len(ids) - len(run) + 1):
        if ids[start:start + len(run)] == run:
            return hidden[:, start:start + len(run)]      # AT the tokens, not one position early
    raise ValueError(f"the signal run {run} does not occur in the token ids")


@torch.no_grad()
def any_to_any(model, conversation, force_response=None, max_new_tokens=32, num_inference_steps=None):
    prompt = model.build_prompt(conversation)                            # encode, project, splice
    new = model.generate_ids(prompt, max_new_tokens, force_response=force_response, progress=False)
    ids, runs, _ = find_signal_runs(new, model.signal_ids)              # complete or drop broken runs
    hidden = model.last_hidden(prompt, ids)                             # one forward over prompt + answer
    all_ids = prompt.ids + list(ids)                                    # -1 at the soft tokens
    conditioning, media = [], []
    for modality, start in runs:
        run = model.signal_ids[modality]
        at = prompt.embeds.shape[1] + start - 1      # from the token before the run: earlier turns' runs stay out
        states = extract_signal_states(hidden[:, at:], all_ids[at:], run)
        embeds = model.llama_model.embed(torch.tensor(run, device=model.device))[None].to(states.dtype)
        cond = model.output_projection(modality)(states, embeds)
        cond = cond[:, 0] if modality == "audio" else cond               # AudioLDM takes one vector
        conditioning.append((modality, cond))
        outputs = model.decoder(modality).generate(cond, num_inference_steps=num_inference_steps, seed=0,
                                                   progress=False)
        media += [(modality, out) for out in outputs]
    return ids, conditioning, media
