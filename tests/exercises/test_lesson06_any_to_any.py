import pytest
import torch

LESSON = "lesson06_any_to_any"


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
    assert list(positions) == expected_positions
    torch.testing.assert_close(out, torch.stack(rows), rtol=0, atol=0)


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
    torch.testing.assert_close(got, torch.stack([hidden[:, 5 + k] for k in range(4)], dim=1), rtol=0, atol=0)
    assert not torch.equal(got, hidden[:, 4:8])     # the reference's off-by-one


def test_extract_raises_when_the_run_is_missing(ex):
    with pytest.raises(ValueError):
        ex.extract_signal_states(torch.randn(1, 5, 2), [1, 50, 51, 2, 3], [50, 51, 52])
