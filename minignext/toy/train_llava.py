"""LLaVA-1.5's two training stages (Liu et al. 2023, "Improved Baselines with Visual Instruction
Tuning", arXiv 2310.03744, sec. 3; LLaVA, arXiv 2304.08485, sec. 4.2) on the toy foundations;
reference: haotian-liu/LLaVA llava/train/train.py and scripts/v1_5/{pretrain,finetune}.sh.

The vision tower. LLaVA reads a CLIP ViT-L/14-336: every patch token of its layer -2, CLS dropped.
The toy world has no CLIP, so the frozen toy ImageBind's vision trunk stands in for it, rewritten
into CLIP's layout (`tower_key`): it is the same pre-norm ViT, and its Conv3d stem over an image
repeated to 2 frames is a Conv2d whose kernel is summed over time. A 32x32 image gives 8x8 = 64
patch tokens, 64 wide; the projector (Linear, GELU, Linear) makes them 64 soft tokens of the toy
LLaMA's width.

    stage 1  feature alignment      LLaVA's "plain" examples, <s><image>{caption}\\n (llava.encode_caption);
                                    only the projector trains, the LLM is frozen.
    stage 2  visual instruction     vicuna_v1 conversations about an image (llava.encode_conversation,
                                    exactly what Llava.chat sends; SYSTEM says why without the system
                                    sentence); the projector and the whole LLM train.

LLaVA-1.5 runs each stage for one epoch with AdamW: lr 1e-3 (stage 1) and 2e-5 (stage 2). The toy
LLM was trained from scratch at 3e-3, so stage 2 uses a larger rate for it (STAGES, LLM_LR_SCALE).
The frozen tower is run in the loop on images rendered for each step: every image is new.

What ships is what llava-hf/llava-1.5-7b-hf ships, the hub layout: weights/toy/llava/{config.json,
model.safetensors (fp16: vision_tower.vision_model.*, multi_modal_projector.*, language_model.*),
tokenizer.json, tokenizer_config.json}, with <image> and <pad> added after the vocabulary and the
vocabulary padded to a multiple of 64, as transformers' converter does; and training.json.

    python -m minignext.toy.train llava
    python -m minignext.toy.eval family
"""

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from minignext import weights
from minignext.clip import CLIPVisionConfig
from minignext.imagebind import ImageBindConfig
from minignext.llama import Llama
from minignext.systems.llava import Llava, LlavaConfig, encode_caption, encode_conversation
from minignext.systems.nextgpt import Conversation
from minignext.tokenizer import Tokenizer
from minignext.toy import family, world
from minignext.toy.mllm import batch_answer_loss, image_dialogue, pad_batch, scaled_adam
from minignext.toy.train_imagebind import image_input
from minignext.toy.trainer import TOY_DIR, Run, RunArgs, optimizer_step

OUT_DIR = TOY_DIR / "llava"
STAGES = {                                  # steps, global batch, peak lr
    1: dict(steps=400, batch=32, lr=2e-3),
    2: dict(steps=1000, batch=16, lr=1e-3),
}
LLM_LR_SCALE = 0.5                          # stage 2: the LLM's rate, relative to the projector's
MAX_TOKENS = 1200                           # padded positions per micro-batch
# vicuna_v1 without its system sentence, as the hub's llava-1.5 chat template writes the prompt
# ("USER: <image>\n... ASSISTANT:"): the sentence is 93 tokens of words the toy LLM never saw, more
# than the image's 64, on every example.
SYSTEM = ""
STORE_DTYPE = torch.float16


# ---------------------------------------------------------------- the vision tower: ImageBind's trunk in CLIP's names

IB, CLIP = "modality_", "vision_tower.vision_model."
TOWER_NAMES = (                             # ImageBind vision key (regex) -> CLIP hub key, first match wins
    (r"preprocessors\.vision\.cls_token", "embeddings.class_embedding"),
    (r"preprocessors\.vision\.rgbt_stem\.proj\.1\.weight", "embeddings.patch_embedding.weight"),
    (r"preprocessors\.vision\.pos_embedding_helper\.pos_embed", "embeddings.position_embedding.weight"),
    (r"trunks\.vision\.pre_transformer_layer\.0\.", "pre_layrnorm."),
    (r"trunks\.vision\.blocks\.(\d+)\.norm_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"trunks\.vision\.blocks\.(\d+)\.norm_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"trunks\.vision\.blocks\.(\d+)\.attn\.in_proj_", r"encoder.layers.\1.self_attn.{}_proj."),
    (r"trunks\.vision\.blocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"trunks\.vision\.blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"heads\.vision\.0\.", "post_layernorm."),
)


def tower_key(key, tensor) -> list:
    """One key of ImageBind's checkpoint -> the CLIP vision tower's keys in LLaVA's hub layout
    ([] for the other branches and the vision head's projection, which LLaVA does not read)."""
    for pattern, new in TOWER_NAMES:
        m = re.match(IB + pattern, key)
        if m is None:
            continue
        name = CLIP + m.expand(new) + key[m.end():]
        if "{}" in name:                    # nn.MultiheadAttention's fused in_proj -> q, k, v
            return [(name.format(p), t) for p, t in zip("qkv", tensor.chunk(3))]
        if name.endswith("patch_embedding.weight"):
            return [(name, tensor.float().sum(2))]     # (D, 3, T, p, p): the T identical frames of an image
        if name.endswith(("class_embedding", "position_embedding.weight")):
            return [(name, tensor.reshape(-1, tensor.shape[-1]).squeeze(0))]
        return [(name, tensor)]
    return []


def tower_config(ib: ImageBindConfig) -> CLIPVisionConfig:
    kt, kh, kw = ib.kernel_size
    if kh != kw or kt != max(ib.video_frames, 2):
        raise ValueError(f"an ImageBind stem {tuple(ib.kernel_size)} over {ib.video_frames} frames is no "
                         f"square Conv2d over one image")
    return CLIPVisionConfig(hidden_size=ib.vision_embed_dim, intermediate_size=4 * ib.vision_embed_dim,
                            num_hidden_layers=ib.vision_num_blocks, num_attention_heads=ib.vision_num_heads,
                            image_size=ib.image_size, patch_size=kh, projection_dim=ib.out_embed_dim,
                            with_projection=False, hidden_act="gelu", layer_norm_eps=1e-6)


# ---------------------------------------------------------------- the model

def build(root=TOY_DIR, seed=0) -> Llava:
    """A Llava over the frozen foundations: ImageBind's vision trunk as the tower, the toy LLaMA with
    <image> and <pad> added (the vocabulary padded to a multiple of 64), a fresh projector."""
    root = Path(root)
    missing = [p for p in ("imagebind", "llm") if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks the toy foundations {', '.join(missing)}; train them first with "
                                f"`python -m minignext.toy.train foundations`")
    ib = ImageBindConfig.from_hf(weights.read_config(root / "imagebind"))
    tower = dict(kv for k, t in weights.load_safetensors(root / "imagebind").items() for kv in tower_key(k, t))
    llm = Llama.from_pretrained(root / "llm", dtype=torch.float32)
    tok = Tokenizer.from_pretrained(root / "llm")
    vocab = llm.config.vocab_size
    if tok.add_special_tokens(["<image>", "<pad>"]) != [vocab, vocab + 1]:
        raise weights.WeightsError(f"{root / 'llm'}: the tokenizer's vocabulary does not end at the LLM's {vocab} rows")
    llm.resize_token_embeddings(math.ceil((vocab + 2) / 64) * 64)
    text = dataclasses.replace(llm.config, pad_token_id=vocab + 1)
    config = LlavaConfig(vision_config=tower_config(ib), text_config=text, image_token_index=vocab,
                         image_seq_length=tower_config(ib).grid ** 2)
    torch.manual_seed(seed)
    model = Llava(config, tok)
    model.system = SYSTEM
    weights.load_into(model.vision_tower, {k.removeprefix("vision_tower."): v.float() for k, v in tower.items()})
    model.language_model.load_state_dict(llm.state_dict())
    return model.requires_grad_(False)


def trainable(model: Llava, stage) -> list:
    """Switch on what `stage` trains: the projector (1), the projector and the whole LLM (2)."""
    model.requires_grad_(False)
    parts = [model.multi_modal_projector] + ([model.language_model] if stage == 2 else [])
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


# ---------------------------------------------------------------- examples

def example(model: Llava, stage, rng) -> dict:
    """One training example: stage 1 an image and its caption; stage 2 a dialogue about an image
    (mllm.image_dialogue)."""
    if stage == 1:
        m = world.Media("image", world.sample_object(rng))
        c = model.config
        ids, labels = encode_caption(model.tokenizer, m.caption(rng), c.image_token_index, c.image_tokens)
        return {"ids": ids, "labels": labels, "image": m.render(rng)}
    turns = image_dialogue(rng)
    return dialogue_example(model, turns, turns[0].user_media.render(rng))


def dialogue_example(model: Llava, turns, image) -> dict:
    """World turns about `image` -> ids and labels exactly as chat() lays out the same conversation."""
    conv = Conversation()
    for t in turns:
        conv.user(t.user, image=image if t.user_media is not None else None).assistant(t.assistant)
    ids, labels, _ = encode_conversation(model.tokenizer, conv, model.config.image_token_index,
                                         model.config.image_tokens, system=model.system)
    return {"ids": ids, "labels": labels, "image": image}


def loss_fn(model: Llava, examples, max_tokens=MAX_TOKENS) -> torch.Tensor:
    """Cross-entropy on the answers, over length-sorted micro-batches (mllm.batch_answer_loss)."""
    def states(group):
        ids, labels = pad_batch([e["ids"] for e in group], [e["labels"] for e in group],
                                pad_id=model.config.text_config.pad_token_id)
        embeds = model.embed_inputs(ids, image_input(np.stack([e["image"] for e in group])))
        return model.language_model.hidden_states(inputs_embeds=embeds), labels
    return batch_answer_loss(examples, states, model.language_model.lm_head, max_tokens)


def run_stage(model: Llava, stage, args: RunArgs) -> Run:
    cfg = STAGES[stage]
    params = trainable(model, stage)
    opt = scaled_adam(params, list(model.language_model.parameters()), cfg["lr"], LLM_LR_SCALE)
    part = f"llava_stage{stage}"
    run = Run.start(part, args, {"model": model}, opt, cfg["steps"], cfg["lr"], warmup=50)
    model.train()
    for step in run.steps():
        rng = args.rng(f"{part}/batches", step)           # the global batch depends on the step only
        batch = args.shard([example(model, stage, rng) for _ in range(cfg["batch"])])
        loss = loss_fn(model, batch)
        optimizer_step(opt, loss, params)
        run.log(loss.item())
    model.eval()
    return run


def train(args: RunArgs, out_dir=None, root=TOY_DIR) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    model = build(root, args.seed_of("llava/init"))
    stages = {}
    for stage in STAGES:
        run = run_stage(model, stage, args)
        stages[stage] = family.stage_record(run, STAGES[stage]["batch"], sum(p.numel() for p in trainable(model, stage)))
    model.requires_grad_(False)
    out = save(model, out_dir or OUT_DIR, overwrite=True)
    family.write_training_record(out, minutes=round((time.perf_counter() - t0) / 60, 1),
                                 cpu_minutes=round((time.process_time() - cpu0) / 60, 1),
                                 examples=sum(s["examples"] for s in stages.values()), stages=stages)
    return {"folder": str(out), "stages": {k: {n: v for n, v in s.items() if n != "curve"} for k, s in stages.items()},
            "seconds": round(time.perf_counter() - t0, 1), "megabytes": round(folder_bytes(out) / 1e6, 2)}


# ---------------------------------------------------------------- the release

def save(model: Llava, folder, overwrite=False) -> Path:
    """The hub layout that Llava.from_pretrained and transformers' LlavaForConditionalGeneration read."""
    folder = Path(folder)
    state = {k: v.detach().to(STORE_DTYPE) for k, v in model.state_dict().items()}
    weights.save_safetensors(state, folder / "model.safetensors", overwrite=overwrite)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    model.tokenizer.save(folder, overwrite=overwrite)
    settings = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "model_max_length": model.config.text_config.max_position_embeddings}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def load(folder=None) -> Llava:
    """The shipped toy LLaVA (weights/toy/llava), in fp32."""
    folder = Path(folder or OUT_DIR)
    if not (folder / "config.json").is_file():
        raise weights.WeightsError(f"the toy LLaVA is not there ({folder}); train it with "
                                   f"`python -m minignext.toy.train llava`")
    model = Llava.from_pretrained(folder, dtype=torch.float32)
    model.system = SYSTEM
    return model


# ---------------------------------------------------------------- the family table

@torch.inference_mode()
def answers(model: Llava, turns, images, max_new_tokens=16) -> list[str]:
    """Llava's answers to one-turn questions about images, prompts of one length batched through
    the model's own prompt() and generate()."""
    prompts = [model.prompt(Conversation().user(t.user, image=x)) for t, x in zip(turns, images)]
    out = [None] * len(prompts)
    for length in {ids.shape[1] for ids, _ in prompts}:
        rows = [i for i, (ids, _) in enumerate(prompts) if ids.shape[1] == length]
        new = model.generate(torch.cat([prompts[i][0] for i in rows]), torch.cat([prompts[i][1] for i in rows]),
                             max_new_tokens, progress=False)
        for i, ids in zip(rows, new.tolist()):
            out[i] = model.tokenizer.decode([t for t in ids if t != model.tokenizer.eos_id], skip_special=True).strip()
    return out


def family_row(cases) -> "family.Row":
    """LLaVA's row: image -> text only (it reads images and writes text)."""
    model, accuracy = load(), {}
    if "image->text" in cases:
        turns = cases["image->text"]
        said = answers(model, turns, family.inputs("image->text", turns))
        accuracy["image->text"] = (float(np.mean([family.text_ok(t, a) for t, a in zip(turns, said)])), len(turns))
    record = family.training_record(OUT_DIR)
    trained = sum(p.numel() for m in (model.multi_modal_projector, model.language_model) for p in m.parameters())
    return family.Row("LLaVA", "all ViT patches (layer -2) -> MLP", str(model.config.image_tokens), trained,
                      record.get("minutes"), record.get("examples"), accuracy,
                      notes="reads images only; the LLM trains in stage 2")
