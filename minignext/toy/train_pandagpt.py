"""PandaGPT's one training stage (Su et al. 2023, "PandaGPT: One Model To Instruction-Follow Them
All", arXiv 2305.16355, sec. 2-3) on the toy foundations; reference: yxuansu/PandaGPT
code/model/openllama.py (`build_one_instance`, the prompt) and code/config/openllama_peft.yaml.

PandaGPT is NExT-GPT's input side trained in one go: the frozen ImageBind's vector -> llama_proj
(one Linear) -> ONE soft token between the texts "<Img>" and "</Img>", read by the LLM with LoRA
(r = alpha = 32) on q, k, v and o. llama_proj and the LoRA factors train together, from scratch,
on image-text instruction data only (LLaVA's and MiniGPT-4's): here dialogues about one image
(mllm.image_dialogue), in the Vicuna-v0 template, the answers and the "\\n###" after each
supervised. It never sees a sound or a video. It is asked about them anyway, zero-shot: their
ImageBind vectors go through the same llama_proj (`zero_shot` measures what comes out).

All of it runs on a bank of frozen ImageBind image embeddings (mllm.media_bank), so the loop only
runs the LLM. What ships is the release's delta, every trainable parameter under its training
name (llama_proj.*, llama_model.base_model.model....lora_{A,B}.default.weight), written by
PandaGPT.save_pretrained: weights/toy/pandagpt/delta.safetensors, with training.json.

    python -m minignext.toy.train pandagpt
    python -m minignext.toy.eval family
"""

import time
from pathlib import Path

import numpy as np
import torch

from minignext import weights
from minignext.systems.nextgpt import SPLICE_CLOSE, SPLICE_OPEN, Conversation
from minignext.systems.pandagpt import LORA_ALPHA, LORA_R, PandaGPT
from minignext.tokenizer import VICUNA_V0
from minignext.toy import checkers, family, world
from minignext.toy.mllm import batch_answer_loss, image_dialogue, media_bank, scaled_adam, tokens_with_labels
from minignext.toy.train_nextgpt import collate
from minignext.toy.trainer import TOY_DIR, Run, RunArgs, optimizer_step

OUT_DIR = TOY_DIR / "pandagpt"
STAGE = dict(steps=600, batch=32, lr=1e-3)         # steps, global batch, peak lr (of the LoRA factors)
PROJECTION_LR_SCALE = 5.0                          # llama_proj starts from nothing: it learns faster
BANK_PER_KEY = 32                                  # rendered images per object
MAX_TOKENS = 1024                                  # padded positions per micro-batch


def build(root=TOY_DIR, seed=0) -> PandaGPT:
    """PandaGPT over the frozen toy ImageBind and LLaMA, a fresh llama_proj and fresh LoRA factors."""
    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.tokenizer import Tokenizer

    root = Path(root)
    missing = [p for p in ("imagebind", "llm") if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks the toy foundations {', '.join(missing)}; train them first with "
                                f"`python -m minignext.toy.train foundations`")
    encoder = ImageBind.from_pretrained(root / "imagebind", dtype=torch.float32)
    llm = Llama.from_pretrained(root / "llm", dtype=torch.float32)
    torch.manual_seed(seed)
    model = PandaGPT(encoder, llm, Tokenizer.from_pretrained(root / "llm"), enc_dim=encoder.config.out_embed_dim)
    model.requires_grad_(False)
    model.add_lora(LORA_R, LORA_ALPHA)
    return model


def trainable(model: PandaGPT) -> list:
    from minignext.lora import lora_parameters

    model.requires_grad_(False)
    params = list(model.llama_proj.parameters()) + list(lora_parameters(model.llama_model).values())
    for p in params:
        p.requires_grad_(True)
    return params


def encode_dialogue(tokenizer, turns, bank, rng) -> dict:
    """World turns -> PandaGPT's training tokens, laid out as PandaGPT.build_prompt lays out the same
    conversation: "<s>### Human: <Img>" [soft] "</Img> {question}\\n### Assistant: {answer}\\n### Human: ..."
    with each run of text between soft tokens tokenized whole. Labels on every answer and the
    "\\n###" after it (build_one_instance); the soft slots as (position, ImageBind vector)."""
    t, stop = VICUNA_V0, VICUNA_V0.stop[0]
    texts, spans, vectors = [""], [[]], []      # the runs of text between soft tokens, their answers' spans
    for turn in turns:
        texts[-1] += t.user
        if turn.user_media is not None:
            m = turn.user_media
            rows = bank[(m.modality, m.obj, m.direction)]
            vectors.append(rows[rng.integers(len(rows))])
            texts[-1] += SPLICE_OPEN
            texts.append(SPLICE_CLOSE + " ")
            spans.append([])
        texts[-1] += turn.user + t.sep + t.assistant.rstrip()
        start = len(texts[-1])
        texts[-1] += f" {turn.assistant}{t.sep}"
        spans[-1].append((start, len(texts[-1]) + len(stop)))     # the answer, "\n" and the "###" after it
    texts[-1] += stop
    ids, labels, soft = [tokenizer.bos_id], [-100], []
    for k, (text, answer_spans) in enumerate(zip(texts, spans)):
        if k:
            soft.append((len(ids), vectors[k - 1]))
            ids.append(0)
            labels.append(-100)
        i, lab = tokens_with_labels(tokenizer, text, answer_spans)
        ids += i
        labels += lab
    return {"ids": ids, "labels": labels, "soft": soft, "runs": []}


def loss_fn(model: PandaGPT, examples, max_tokens=MAX_TOKENS) -> torch.Tensor:
    """Cross-entropy on the answers, over length-sorted micro-batches (mllm.batch_answer_loss)."""
    def states(group):
        embeds, labels, _ = collate(model, group)
        return model.llama_model.hidden_states(inputs_embeds=embeds), labels
    return batch_answer_loss(examples, states, model.llama_model.lm_head, max_tokens)


def train(args: RunArgs, out_dir=None, root=TOY_DIR, bank_per_key=BANK_PER_KEY) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    model = build(root, args.seed_of("pandagpt/init"))
    bank = media_bank(model.visual_encoder, ["image"], args.rng("pandagpt/media-bank"), "train", bank_per_key)
    params = trainable(model)
    opt = scaled_adam(params, list(model.llama_proj.parameters()), STAGE["lr"], PROJECTION_LR_SCALE)
    run = Run.start("pandagpt", args, {"model": model}, opt, STAGE["steps"], STAGE["lr"], warmup=50)
    model.train()
    for step in run.steps():
        rng = args.rng("pandagpt/batches", step)           # the global batch depends on the step only
        batch = args.shard([encode_dialogue(model.tokenizer, image_dialogue(rng), bank, rng)
                            for _ in range(STAGE["batch"])])
        loss = loss_fn(model, batch)
        optimizer_step(opt, loss, params)
        run.log(loss.item())
    model.eval().requires_grad_(False)
    out = Path(out_dir or OUT_DIR)
    model.save_pretrained(out, overwrite=True)
    stage = family.stage_record(run, STAGE["batch"], sum(p.numel() for p in params))
    family.write_training_record(out, minutes=round((time.perf_counter() - t0) / 60, 1),
                                 cpu_minutes=round((time.process_time() - cpu0) / 60, 1), examples=stage["examples"],
                                 stages={1: stage}, lora={"r": LORA_R, "alpha": LORA_ALPHA})
    return {"folder": str(out), **{k: v for k, v in stage.items() if k != "curve"},
            "seconds": round(time.perf_counter() - t0, 1),
            "megabytes": round((out / "delta.safetensors").stat().st_size / 1e6, 2)}


def load(folder=None, root=TOY_DIR) -> PandaGPT:
    """The shipped toy PandaGPT: the toy ImageBind and LLaMA of `root` with the delta of `folder`
    (weights/toy/pandagpt) merged, in fp32."""
    folder, root = Path(folder or OUT_DIR), Path(root)
    if not (folder / "delta.safetensors").is_file():
        raise weights.WeightsError(f"the toy PandaGPT is not there ({folder}); train it with "
                                   f"`python -m minignext.toy.train pandagpt`")
    return PandaGPT.from_pretrained(folder, imagebind=root / "imagebind", vicuna=root / "llm", dtype=torch.float32)


# ---------------------------------------------------------------- the family table

ZERO_SHOT = ("audio->text", "video->text")          # never in its training data


def source(modality, x):
    """A rendered input (family.inputs) in the form chat takes."""
    from PIL import Image

    if modality == "image":
        return Image.fromarray(x)
    return (torch.from_numpy(x), world.SAMPLE_RATE) if modality == "audio" else x


def answers(model: PandaGPT, direction, turns) -> list[str]:
    """PandaGPT's chat answers to the shared cases of an X -> text direction."""
    out = []
    for t, x in zip(turns, family.inputs(direction, turns)):
        m = t.user_media.modality
        conv = Conversation().user(t.user, **{m: [source(m, x)]})
        out.append(model.chat(conv, max_new_tokens=24, decode=False, progress=False).text)
    return out


def family_row(cases) -> "family.Row":
    """PandaGPT's row: image -> text as trained; audio -> text and video -> text zero-shot. The notes
    say how often a zero-shot answer still names the object (its colour and shape)."""
    model = load()
    accuracy, named = {}, []
    for direction in [d for d in ("image->text", *ZERO_SHOT) if d in cases]:
        turns = cases[direction]
        said = answers(model, direction, turns)
        accuracy[direction] = (float(np.mean([family.text_ok(t, a) for t, a in zip(turns, said)])), len(turns))
        if direction in ZERO_SHOT:
            hit = np.mean([checkers.check_text(a, want=t.user_media.obj).ok for t, a in zip(turns, said)])
            named.append(f"{direction.split('->')[0]} {100 * hit:.0f}%")
    delta = weights.load_safetensors(OUT_DIR / "delta.safetensors")
    record = family.training_record(OUT_DIR)
    return family.Row("PandaGPT", "ImageBind vector -> Linear", "1", sum(t.numel() for t in delta.values()),
                      record.get("minutes"), record.get("examples"), accuracy, zero_shot=ZERO_SHOT,
                      notes="trained on images only; zero-shot answers that name the object's colour and shape: "
                            + (", ".join(named) or "not asked"))
