"""Lesson 6 exercises: the any-to-any loop (minignext/systems/nextgpt.py).

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson06_any_to_any.py --exercises=mine
"""


def splice_soft_tokens(token_embeds, soft_tokens, insert_at):
    """Insert soft tokens into a sequence of token embeddings.

    token_embeds (T, H); soft_tokens (N, H); insert_at: N non-decreasing indices into the token
    sequence; soft token i goes right before token insert_at[i]. Return (spliced (T + N, H),
    positions): positions[i] is where soft token i ends up in the spliced sequence.
    """
    raise NotImplementedError(
        "Walk through insert_at keeping the previous cut `prev`: append token_embeds[prev:at], then "
        "soft_tokens[i:i+1] (its position is at + i, since i soft tokens came before it); finish with "
        "token_embeds[prev:] and torch.cat the pieces. Reject decreasing or out-of-range positions "
        "with a ValueError.")


def extract_signal_states(hidden, ids, run):
    """hidden (B, T, H): last-layer states over the tokens `ids` (T,). Return the states (B, n, H)
    AT the first place where the n ids of `run` (e.g. [IMG0]..[IMG3]) appear back to back.
    Raise ValueError when the run does not occur."""
    raise NotImplementedError(
        "Convert ids and run to Python lists, find the first start with ids[start:start+n] == run, "
        "and return hidden[:, start:start+n]. Not start-1: the reference's inference code reads one "
        "position early, training reads at the tokens, and so should you.")
