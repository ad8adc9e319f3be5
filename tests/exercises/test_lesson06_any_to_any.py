import numpy as np
import pytest
import torch

from conftest import check

LESSON = "lesson06_any_to_any"
EARLY = ("off by one position: you read the states one position early (the step that predicted each "
         "signal token, as the reference's inference code does); read them AT the tokens")
UNCOUNTED = ("off by one position: a soft token's position must count the soft tokens inserted before it "
             "(soft token i lands at insert_at[i] + i)")


@pytest.mark.parametrize("insert_at", [[0], [3], [7], [2, 2], [1, 4, 7]])
def test_splice_matches_a_concatenation_built_by_hand(ex, insert_at):
    g = torch.Generator().manual_seed(len(insert_at))
    tokens, soft = torch.randn(7, 5, generator=g), torch.randn(len(insert_at), 5, generator=g)
    out, positions = ex.splice_soft_tokens(tokens, soft, insert_at)
    # the expected sequence, row by row: tokens in order, soft token i before token insert_at[i]
    rows, expected_positions = [], []
    for j in range(tokens.shape[0] + 1):
        for i, at in enumerate(insert_at):
            if at == j:
                expected_positions.append(len(rows))
                rows.append(soft[i])
        if j < tokens.shape[0]:
            rows.append(tokens[j])
    if list(positions) != expected_positions:
        pytest.fail(UNCOUNTED if list(positions) == list(insert_at) else
                    f"positions {list(positions)}, expected {expected_positions}", pytrace=False)
    check(out, torch.stack(rows), f"the spliced sequence for insert_at={insert_at}", rtol=0, atol=0)


def test_splice_rejects_bad_positions(ex):
    with pytest.raises(ValueError):
        ex.splice_soft_tokens(torch.zeros(4, 2), torch.zeros(2, 2), [3, 1])
    with pytest.raises(ValueError):
        ex.splice_soft_tokens(torch.zeros(4, 2), torch.zeros(1, 2), [9])


def test_extract_reads_the_states_at_the_signal_tokens(ex):
    run = [50, 51, 52, 53]
    ids = [1, 7, 8, 50, 9] + run + [3]             # a stray 50 first: only the full run counts
    hidden = torch.randn(2, len(ids), 6)
    got = ex.extract_signal_states(hidden, torch.tensor(ids), run)
    check(got, hidden[:, 5:9], "the states at [50, 51, 52, 53] (positions 5..8)",
          wrong=[(EARLY, hidden[:, 4:8]), ("you matched the stray 50 at position 3, not the whole run", hidden[:, 3:7])],
          rtol=0, atol=0)


def test_extract_raises_when_the_run_is_missing(ex):
    with pytest.raises(ValueError):
        ex.extract_signal_states(torch.randn(1, 5, 2), [1, 50, 51, 2, 3], [50, 51, 52])


@pytest.fixture(scope="module")
def tiny_model():
    from minignext.presets import from_preset

    return from_preset("tiny-random")


@pytest.mark.parametrize("modality, answer", [("image", "Sure [IMG0][IMG1][IMG2][IMG3]"),
                                              ("audio", "Listen [AUD0][AUD1][AUD2][AUD3][AUD4][AUD5][AUD6][AUD7]"),
                                              ("image", "Half a run [IMG0][IMG1]")])
def test_any_to_any_gives_what_chat_gives(ex, tiny_model, modality, answer):
    from PIL import Image

    from minignext.systems.nextgpt import Conversation

    def conversation():
        return Conversation().user("Look at this and answer.", image=Image.new("RGB", (32, 32), (200, 40, 40)))

    reply = tiny_model.chat(conversation(), force_response=answer, num_inference_steps=2, seed=0, progress=False)
    ids, conditioning, media = ex.any_to_any(tiny_model, conversation(), force_response=answer, num_inference_steps=2)
    assert list(ids) == reply.token_ids, "the answer's ids after repairing the signal runs differ from chat's"
    assert [m for m, _ in conditioning] == [m for m, _ in reply.conditioning], "not the same signal runs as chat"
    hidden = tiny_model.last_hidden(reply.prompt, reply.token_ids)
    (_, start), = reply.signals
    n = len(tiny_model.signal_ids[modality])
    early = tiny_model.output_projection(modality)(hidden[:, start - 1:start - 1 + n],
                                                   tiny_model.llama_model.embed(
                                                       torch.tensor(tiny_model.signal_ids[modality]))[None])
    early = early[:, 0] if modality == "audio" else early
    for (_, got), (_, want) in zip(conditioning, reply.conditioning):
        check(got, want, f"the {modality} conditioning vs chat's", wrong=[(EARLY, early)], atol=1e-5, rtol=1e-5)
    outputs = reply.images if modality == "image" else [w for w, _ in reply.audios]
    mine = [np.asarray(out if modality == "image" else out[0]) for _, out in media]
    assert len(mine) == len(outputs), f"{len(mine)} media decoded, chat decoded {len(outputs)}"
    for got, want in zip(mine, outputs):
        np.testing.assert_allclose(got.astype(np.float32), np.asarray(want).astype(np.float32), atol=1e-4,
                                   err_msg=f"the decoded {modality} differs from chat's")
