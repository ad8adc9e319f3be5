"""The any-to-any loop: splicing, signal-token runs, gradient masking, and the tiny-random
NextGPT end to end (text + image / audio / video in; text + image, audio, video out)."""

import numpy as np
import pytest
import torch

from minignext.nextgpt import (SIGNALS, added_tokens, find_signal_runs, freeze_old_rows, signal_states,
                               signal_token_names, splice_soft_tokens)

SIG = {"image": [10, 11, 12, 13], "audio": [20, 21, 22]}


def test_added_tokens_give_the_official_ids():
    names = added_tokens()
    assert len(names) == 38 and 32000 + names.index("[IMG0]") == 32002
    assert 32000 + names.index("[VID0]") == 32006 and 32000 + names.index("[AUD7]") == 32037
    assert signal_token_names("audio") == [f"[AUD{i}]" for i in range(SIGNALS["audio"][1])]


def test_splice_soft_tokens_against_direct_concatenation():
    tok = torch.randn(6, 8)
    soft = torch.randn(2, 8)
    out, pos = splice_soft_tokens(tok, soft, [2, 4])
    expected = torch.cat([tok[:2], soft[:1], tok[2:4], soft[1:], tok[4:]])
    assert pos == [2, 5]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out, pos = splice_soft_tokens(tok, soft, [0, 0])     # two inputs back to back at the start
    assert pos == [0, 1] and torch.equal(out[2:], tok)
    with pytest.raises(ValueError, match="non-decreasing"):
        splice_soft_tokens(tok, soft, [4, 2])


def test_complete_run_is_found_at_its_position():
    ids = [1, 2, 10, 11, 12, 13, 3]
    fixed, runs, notices = find_signal_runs(ids, SIG)
    assert fixed == ids and runs == [("image", 2)] and notices == []


def test_partial_run_is_completed_with_a_notice():
    fixed, runs, notices = find_signal_runs([5, 10, 11, 6, 20, 21, 22], SIG)
    assert fixed == [5, 10, 11, 12, 13, 6, 20, 21, 22]
    assert runs == [("image", 1), ("audio", 6)]
    assert len(notices) == 1 and "completed" in notices[0] and "image" in notices[0]


def test_out_of_order_and_headless_runs():
    fixed, runs, notices = find_signal_runs([10, 12, 11, 7, 21, 22, 8], SIG)
    assert fixed == [10, 11, 12, 13, 7, 8]                # image completed, audio without [AUD0] dropped
    assert runs == [("image", 0)]
    assert any("dropped" in n and "audio" in n for n in notices)


def test_signal_states_are_read_at_the_tokens_not_one_before():
    hidden = torch.arange(10.0)[None, :, None].expand(1, 10, 3)
    got = signal_states(hidden, 4, 3)
    assert got[0, :, 0].tolist() == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        signal_states(hidden, 8, 3)


def test_freeze_old_rows_trains_only_the_new_rows():
    emb = torch.nn.Embedding(10, 4)
    freeze_old_rows(emb.weight, 7)
    emb(torch.tensor([1, 5, 8, 9])).sum().backward()
    assert emb.weight.grad[:7].abs().sum() == 0
    assert (emb.weight.grad[8:] != 0).all()
