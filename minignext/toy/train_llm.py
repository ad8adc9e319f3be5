"""The toy LLaMA: minignext.llama.Llama (Touvron et al. 2023, arXiv 2302.13971) with a small config
and its own byte-level BPE tokenizer, trained from scratch on the toy world's text.

NExT-GPT (Wu et al., arXiv 2309.05519) starts from Vicuna-7B-v0, a LLaMA that already speaks in the
Vicuna v0 template. The toy LLM learns the same from three kinds of text:
    - captions of every modality;
    - dialogues in the template, each input medium shown by its attribute words inside the marker,
      `<Img>red circle</Img>` (world.format_dialogue), so that the LLM learns to read what stands
      between the markers, where NExT-GPT later splices the projected soft token;
    - text-only requests and questions about the world's cross-modal mapping ("what does a red
      circle sound like?"), which make it copy the attributes it is asked about.
NExT-GPT reads each input medium from ONE position, the projected soft token, while the corpus shows
a medium by two or three words. A model this small does not learn by itself to read three attributes
(colour, shape, direction) out of one position, and stage 1 trains only the projection that writes
it. So half of the markers in each batch are folded into one position whose input embedding is the
scaled sum of their words' embeddings (`fold_markers`): the LLM learns to read a whole medium from a
single vector, which is what the projection must then produce.
NExT-GPT's own tokens (`<Img>`, `</Img>`, `[IMG0]`...) are NOT in the vocabulary: NExT-GPT adds
them later. The byte-level pre-tokenizer splits `<Img>` into `<`, `Img`, `>`, so no merge can
ever produce one of them.

On disk it is the Hugging Face LLaMA layout that `Llama.from_pretrained` and
`Tokenizer.from_pretrained` read: weights/toy/llm/{config.json, model.safetensors (fp16),
tokenizer.json, tokenizer_config.json}. Load it in fp32 (`dtype=torch.float32`) for CPU use.

    python -m minignext.toy.train foundations --only llm
    python -m minignext.toy.eval foundations --only llm
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minignext import weights
from minignext.llama import Llama, LlamaConfig
from minignext.tokenizer import VICUNA_V0, Tokenizer
from minignext.toy import world
from minignext.toy.mllm import answer_ce, pad_batch
from minignext.toy.trainer import ADAM_BETAS, TOY_DIR, Run, RunArgs, optimizer_step, summary

OUT_DIR = TOY_DIR / "llm"
SPECIAL = ("<unk>", "<s>", "</s>")        # ids 0, 1, 2 as in LLaMA; <unk> doubles as padding
VOCAB_SIZE = 512
MAX_TOKENS = 192                          # training sequences are cut here (the longest is ~110)
MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
SCHEDULE = dict(steps=600, batch_size=32, peak_lr=3e-3, warmup=40, corpus=20000)
FOLD_P = 0.5                              # share of the media markers folded into one position


def qa_text(obj: world.Obj, rng) -> str:
    """A text-only question about the cross-modal mapping, in the Vicuna v0 template."""
    if rng.random() < 0.5:
        q, a = f"what does {world.caption(obj, rng, 'image')} sound like?", world.caption(obj, rng, "audio")
        answer = f"it sounds like {a}."
    else:
        q, a = f"what does {world.caption(obj, rng, 'audio')} look like?", world.caption(obj, rng, "image")
        answer = f"it looks like {a}."
    return f"{VICUNA_V0.user}{q}\n{VICUNA_V0.assistant}{answer}\n"


def request_text(rng, split="train", phrasing="train") -> str:
    """A one-turn text-only request ("draw a red circle." -> "here is a red circle.")."""
    kind = ("make_image", "make_audio", "make_video")[rng.integers(3)]
    return world.format_dialogue([world.turn(kind, rng, phrasing, split)], media_marker="describe")


def corpus(n, seed=0, split="train", phrasing="train") -> list[str]:
    """World text (captions and dialogues, world.text_corpus); three texts in ten are replaced by
    one-turn requests and mapping questions, which teach the model to copy attributes."""
    rng = world.make_rng(seed)
    texts = world.text_corpus(n, seed=rng, split=split, phrasing=phrasing)
    for i in np.flatnonzero(rng.random(n) < 0.3):
        texts[i] = request_text(rng, split, phrasing) if rng.random() < 0.5 else qa_text(
            world.sample_object(rng, split), rng)
    return texts


def build_tokenizer(texts) -> Tokenizer:
    """A GPT-2-style byte-level BPE (every byte is a base token, so any input encodes)."""
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>")


def model_config(tokenizer: Tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=tokenizer.vocab_size, **MODEL)


def encode_corpus(tokenizer: Tokenizer, texts) -> list[list[int]]:
    """<s> text </s>, cut at MAX_TOKENS."""
    bos, eos = [tokenizer.bos_id], [tokenizer.eos_id]
    return [(bos + e.ids + eos)[:MAX_TOKENS] for e in tokenizer.tok.encode_batch(texts, add_special_tokens=False)]


def marker_spans(tokenizer: Tokenizer, texts) -> list[list[tuple[int, int]]]:
    """Per text, the token ranges [a, b) of what stands between <Img> and </Img>, in the ids of
    encode_corpus (which puts <s> first). The byte-level pre-tokenizer cuts at "<Img>" and "</Img>",
    so the words inside always start and end on token boundaries."""
    out = []
    for text, enc in zip(texts, tokenizer.tok.encode_batch(texts, add_special_tokens=False)):
        spans = []
        for m in re.finditer(r"<Img>(.+?)</Img>", text):
            inside = [i + 1 for i, (a, b) in enumerate(enc.offsets) if a >= m.start(1) and b <= m.end(1)]
            if inside and inside[-1] < MAX_TOKENS - 1:
                spans.append((inside[0], inside[-1] + 1))
        out.append(spans)
    return out


def fold_markers(embed, seqs, spans, rng, p=FOLD_P):
    """Right-padded input embeddings (B, T, D) and labels (B, T), where each marker's span is, with
    probability p, folded into one position: the sum of its token embeddings over sqrt(n). A folded
    position is nobody's label, so nothing learns to predict it. `embed` maps ids (T,) -> (T, D)."""
    rows, labels = [], []
    for seq, marks in zip(seqs, spans):
        e = embed(torch.tensor(seq))
        pieces, ids, last = [], [], 0
        for a, b in marks:
            if rng.random() >= p:
                continue
            pieces += [e[last:a], e[a:b].sum(0, keepdim=True) / (b - a) ** 0.5]
            ids += seq[last:a] + [-100]
            last = b
        rows.append(torch.cat(pieces + [e[last:]]))
        labels.append(ids + seq[last:])
    _, labels = pad_batch(labels)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), labels


def train(args: RunArgs, out_dir=None) -> dict:
    out_dir = Path(out_dir or OUT_DIR)
    texts = corpus(args.count(SCHEDULE["corpus"], least=1000), seed=args.rng("llm/corpus"))
    tokenizer = build_tokenizer(texts)
    data = encode_corpus(tokenizer, texts)
    spans = marker_spans(tokenizer, texts)
    torch.manual_seed(args.seed_of("llm/init"))
    model = Llama(model_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=SCHEDULE["peak_lr"], betas=ADAM_BETAS, weight_decay=0.01)
    run = Run.start("llm", args, {"model": model}, opt, SCHEDULE["steps"], SCHEDULE["peak_lr"], SCHEDULE["warmup"])
    model.train()
    for step in run.steps():
        rng = args.rng("llm/batches", step)               # the batch depends on the step only: resumable
        pick = rng.integers(len(data), size=SCHEDULE["batch_size"])
        embeds, labels = fold_markers(model.model.embed_tokens, [data[i] for i in pick], [spans[i] for i in pick], rng)
        loss = answer_ce(model(inputs_embeds=embeds), labels)
        optimizer_step(opt, loss, model.parameters())
        run.log(loss.item())
    model.eval()
    save(out_dir, model, tokenizer, overwrite=True)
    return summary(out_dir, model=run)


def save(folder, model: Llama, tokenizer: Tokenizer, dtype=torch.float16, overwrite=False):
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.exists() and not overwrite:
        raise FileExistsError(f"{config_path} exists; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "torch_dtype": str(dtype).removeprefix("torch."), "vocab_size": c.vocab_size,
              **MODEL, "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    weights.save_safetensors({k: v.to(dtype) for k, v in model.state_dict().items()},
                             folder / "model.safetensors", overwrite=overwrite)
    tokenizer.save(folder / "tokenizer.json", overwrite=overwrite)
    settings = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                "model_max_length": c.max_position_embeddings}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def load(folder=None) -> tuple[Llama, Tokenizer]:
    folder = Path(folder or OUT_DIR)
    return Llama.from_pretrained(folder, dtype=torch.float32), Tokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- evaluation

@torch.inference_mode()
def perplexity(model, tokenizer, texts) -> float:
    """exp of the mean next-token cross-entropy over all tokens of `texts`."""
    data = encode_corpus(tokenizer, texts)
    total, count = 0.0, 0
    for i in range(0, len(data), 64):
        ids, labels = pad_batch(data[i:i + 64])
        n = int((labels[:, 1:] != -100).sum())
        total += answer_ce(model(ids), labels).item() * n
        count += n
    return math.exp(total / count)


def answer(model, tokenizer, question) -> str:
    """Greedy answer to a text-only question asked in the Vicuna v0 template."""
    prompt = VICUNA_V0.render([{"role": "user", "content": question}])
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, 32, stop_strings=list(VICUNA_V0.stop), tokenizer=tokenizer,
                         progress=False)
    return VICUNA_V0.cut(tokenizer.decode(out[0, ids.shape[1]:], skip_special=True))


ATTRIBUTE_OF_WORD = {**{w: s for s, words in world.SHAPE_WORDS.items() for w in words},
                     **{w: d for d, words in world.DIRECTION_WORDS.items() for w in words},
                     **{v: c for c, v in world.CONTOUR_VERBS.items()},
                     **{w: w for w in world.COLOURS + world.PITCHES + world.CONTOURS}}


def attributes_named(text) -> set:
    """The world attributes a text names, synonyms resolved ("plus sign" -> cross, "upwards" -> up)."""
    text = " ".join(re.findall(r"[a-z]+", text.lower()))
    return {a for w, a in ATTRIBUTE_OF_WORD.items() if re.search(rf"\b{w}\b", text)}


def request_questions(n, seed, split="all"):
    """Text-only requests ("draw a red circle.") and mapping questions, with the attributes a right
    answer names."""
    rng = world.make_rng(seed)
    out = []
    for _ in range(n):
        obj, modality = world.sample_object(rng, split), ("image", "audio", "video")[rng.integers(3)]
        direction = world.DIRECTIONS[rng.integers(4)] if modality == "video" else None
        x = world.caption(obj, rng, modality, direction)
        template = world._pick(rng, world.INSTRUCTIONS[f"make_{modality}"], "train")
        words = {"image": (obj.colour, obj.shape), "audio": (obj.pitch, obj.contour),
                 "video": (obj.colour, obj.shape, direction)}[modality]
        out.append((template.format(x=x), set(words)))
    for _ in range(n // 4):
        obj = world.sample_object(rng, split)
        out.append((f"what does {world.caption(obj, rng, 'image')} sound like?", {obj.pitch, obj.contour}))
    return out


def evaluate(quick=False, seed=1234):
    from minignext.toy.eval import Metric

    model, tokenizer = load()
    n = 200 if quick else 1000
    metrics = []
    for split, phrasing, note in (("train", "train", "new texts, seen phrasings"),
                                  ("train", "test", "held-out phrasings"),
                                  ("heldout", "train", "held-out combinations")):
        texts = corpus(n, seed=seed, split=split, phrasing=phrasing)
        metrics.append(Metric("toy LLM perplexity", perplexity(model, tokenizer, texts), None, n, note))
    for split, note in (("train", "seen combinations"), ("heldout", "held-out combinations")):
        questions = request_questions(8 if quick else 40, seed, split)
        right = [attributes_named(answer(model, tokenizer, q)) == words for q, words in questions]
        metrics.append(Metric("toy LLM text-only answers name the asked object", float(np.mean(right)),
                              None, len(right), note))
    return metrics
