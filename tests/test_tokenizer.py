"""Tokenizer wrapper and chat templates, on a tiny BPE trained in-process."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minignext.tokenizer import PLAIN, VICUNA_V0, ChatTemplate, Tokenizer

SENTENCES = ["a red circle moves to the left", "a blue square makes a low tone",
             "### Human: what is this?", "### Assistant: a green triangle", "the sound rises and falls"] * 4


def train_tiny(folder, with_config=True):
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(SENTENCES, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if with_config:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    return folder


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(train_tiny(tmp_path_factory.mktemp("tok")))


def test_special_ids_and_vocab(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.token_to_id("<unk>") == 0
    assert tok.vocab_size == tok.tok.get_vocab_size()


def test_encode_matches_the_tokenizers_library(tok, tmp_path):
    raw = HFTokenizer.from_file(str(train_tiny(tmp_path / "t") / "tokenizer.json"))
    text = "a red square makes a tone"
    assert tok.encode(text) == [1] + raw.encode(text).ids
    assert tok.encode(text, add_bos=False) == raw.encode(text).ids
    assert tok.decode(tok.encode(text), skip_special=True) == text
    assert tok.decode(tok.encode(text)).startswith("<s>")


def test_against_transformers_fast_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = train_tiny(tmp_path / "t")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>")
    ours = Tokenizer.from_pretrained(folder / "tokenizer.json")   # the file alone works too
    text = "the blue circle rises"
    assert ours.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(text, add_bos=False)) == ref.decode(ref(text, add_special_tokens=False)["input_ids"])


def test_added_special_tokens_are_never_split(tmp_path):
    tok = Tokenizer.from_pretrained(train_tiny(tmp_path / "t"))
    before = tok.vocab_size
    ids = tok.add_special_tokens(["<Img>", "</Img>", "[IMG0]"])
    assert ids == list(range(before, before + 3)) and tok.vocab_size == before + 3
    assert tok.add_special_tokens(["<Img>"]) == [ids[0]]          # already there: same id
    enc = tok.encode("a red<Img></Img> circle [IMG0]", add_bos=False)
    assert ids[0] in enc and ids[1] in enc and ids[2] in enc
    assert tok.decode(enc, skip_special=True).split() == ["a", "red", "circle"]


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_save_never_overwrites(tok, tmp_path):
    tok.save(tmp_path)
    with pytest.raises(FileExistsError):
        tok.save(tmp_path)
    tok.save(tmp_path, overwrite=True)
    assert Tokenizer.from_pretrained(tmp_path).encode("a red circle") == tok.encode("a red circle")


def test_vicuna_v0_template():
    one = VICUNA_V0.render([{"role": "user", "content": "<Img></Img> what is this?"}])
    assert one == "### Human: <Img></Img> what is this?\n### Assistant:"
    two = VICUNA_V0.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "draw"}], add_generation_prompt=False)
    assert two == "### Human: hi\n### Assistant: hello\n### Human: draw\n"
    assert VICUNA_V0.stop == ("###",)
    assert VICUNA_V0.cut(" a red circle.\n### Human: more") == "a red circle."


def test_plain_template_and_bad_messages():
    assert PLAIN.render([{"role": "user", "content": "a red circle"}]) == "a red circle\n"
    assert PLAIN.stop == ()
    system = ChatTemplate("sys", user="USER: ", assistant="ASSISTANT: ", system="", sep=" ")
    assert system.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]) \
        == "Be brief. USER: hi ASSISTANT:"
    with pytest.raises(ValueError, match="role"):
        VICUNA_V0.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        VICUNA_V0.render([{"role": "user"}])
