"""The toy LLaMA: a tiny training run end to end, and the shipped weights through the public loaders."""

import json

import numpy as np
import pytest
import torch

from minignext.llama import Llama
from minignext.systems.nextgpt import added_tokens
from minignext.tokenizer import VICUNA_V0, Tokenizer
from minignext.toy import train_llm, world
from minignext.toy.trainer import RunArgs, read_loss_log

SHIPPED = train_llm.OUT_DIR


def test_tiny_training_run_saves_a_loadable_model(tmp_path):
    summary = train_llm.train(RunArgs(scale=0.01, resume=False, progress=False, runs_dir=tmp_path / "runs"),
                              out_dir=tmp_path / "llm")
    assert summary["model"]["steps"] == 6
    log = read_loss_log("llm-seed0-scale0.01", runs_dir=tmp_path / "runs")
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    model = Llama.from_pretrained(tmp_path / "llm", dtype=torch.float32)
    tok = Tokenizer.from_pretrained(tmp_path / "llm")
    assert model.config.vocab_size == tok.vocab_size == train_llm.VOCAB_SIZE
    assert (tok.bos_id, tok.eos_id) == (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    ids = torch.tensor([tok.encode("### Human: draw a red circle.\n### Assistant:")])
    assert model(ids).shape == (1, ids.shape[1], train_llm.VOCAB_SIZE)
    with pytest.raises(FileExistsError):
        train_llm.save(tmp_path / "llm", model, tok)


def test_tokenizer_leaves_nextgpt_tokens_out_and_round_trips():
    tok = train_llm.build_tokenizer(train_llm.corpus(500, seed=3))
    for name in added_tokens():
        assert tok.token_to_id(name) is None, name
    text = world.format_dialogue(world.sample_dialogue(5))
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    new_ids = tok.add_special_tokens(added_tokens())
    assert min(new_ids) == train_llm.VOCAB_SIZE


def test_markers_fold_into_one_position_that_is_never_predicted():
    texts = ["### Human: <Img>magenta circle left</Img> describe this video.\n### Assistant: a magenta disc.\n",
             "a red circle"]
    tok = train_llm.build_tokenizer(train_llm.corpus(500, seed=3) + texts)
    data = train_llm.encode_corpus(tok, texts)
    spans = train_llm.marker_spans(tok, texts)
    assert spans[1] == [] and len(spans[0]) == 1
    a, b = spans[0][0]
    assert tok.decode(data[0][a:b]) == "magenta circle left"
    embed = torch.nn.Embedding(tok.vocab_size, 8)
    x, y = train_llm.fold_markers(embed, data, spans, np.random.default_rng(0), p=1.0)
    n = len(data[0]) - (b - a) + 1
    assert x.shape == (2, n, 8) and y.shape == (2, n)
    torch.testing.assert_close(x[0, a], embed(torch.tensor(data[0][a:b])).sum(0) / (b - a) ** 0.5)
    torch.testing.assert_close(x[0, a + 1:n], embed(torch.tensor(data[0][b:])))
    assert y[0, a] == -100 and y[0, a + 1] == data[0][b]             # nothing predicts the fold; it predicts </
    assert y[0, :a].tolist() == data[0][:a] and y[0, a + 1:].tolist() == data[0][b:]
    assert y[1, len(data[1]):].tolist() == [-100] * (n - len(data[1]))         # the padding
    kept, _ = train_llm.fold_markers(embed, data, spans, np.random.default_rng(0), p=0.0)
    torch.testing.assert_close(kept[0], embed(torch.tensor(data[0])))


needs_shipped = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(),
                                   reason="shipped toy LLM weights are not in weights/toy/llm")


@needs_shipped
def test_shipped_llm_loads_and_answers():
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    model = Llama.from_pretrained(SHIPPED, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(SHIPPED)
    assert model.model.embed_tokens.weight.shape == (tok.vocab_size, config["hidden_size"])
    assert all(tok.token_to_id(t) is None for t in added_tokens())
    questions = train_llm.request_questions(4, seed=99, split="train")
    for question, words in questions:      # the template is right; the attributes are often not (see eval)
        answer = train_llm.answer(model, tok, question)
        assert answer.startswith(("here is", "sure, ", "it sounds like")), (question, answer)
        assert len(train_llm.attributes_named(answer)) >= 2, (question, answer)
    ppl = train_llm.perplexity(model, tok, train_llm.corpus(64, seed=7))     # new texts, seen phrasings
    assert 1.0 < ppl < 2.5
    prompt = VICUNA_V0.render([{"role": "user", "content": "hello!"}])
    assert "hello" in train_llm.answer(model, tok, "hello!"), prompt
