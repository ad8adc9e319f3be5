"""NExT-GPT's three training stages at real size (Wu et al. 2023, arXiv 2309.05519, sec. 4 and 5;
reference: NExT-GPT-Lagacy code/train.py, which ran them under DeepSpeed ZeRO-2, code/dsconfig/).
The stage code is the toy world's (minignext.training.stages); the data are the reference's caption
pairs and MosIT-style dialogues (minignext.training.data); the processes are torchrun's.

    torchrun --nproc_per_node 4 -m minignext.train nextgpt --preset nextgpt-7b --data DIR --out OUT \\
        --device cuda --dtype bfloat16 [--fsdp]
    python -m minignext.train nextgpt --preset tiny-random --data DIR --out OUT      # the same, tiny, on a CPU

Presets: nextgpt-7b starts from the converted ImageBind-huge and Vicuna-7B-v0 in weights/real/nextgpt-7b/
(what `minignext download nextgpt-7b` prepares), with fresh projections and NExT-GPT's new token rows:
the released delta is what this trains. tiny-random is minignext.tiny's model, every part tiny; its
parts as they are before training are saved in OUT/base/, which the result points at.

Every input medium is encoded once by the frozen ImageBind before stage 1, each process encoding a
share of the files; the encoder then leaves memory, and the LLM stages train without it. In bf16 the
frozen weights stay bf16 and what trains is kept in fp32, the forward running under autocast. FSDP
(--fsdp) leaves the loop's own model on the CPU and shards a twin of it onto the devices. The result,
OUT/{nextgpt.json, delta.safetensors}, is the layout `NextGPT.from_pretrained` reads, the delta in the
official names (in the training dtype); with nextgpt-7b it also replaces the preset's
weights/real/nextgpt-7b/delta.safetensors.
"""

import math
import time
from pathlib import Path

import torch

from minignext.lora import add_lora, lora_parameters
from minignext.systems.nextgpt import INPUTS, MODALITIES, SPLICE_OPEN, NextGPT, encoder_input
from minignext.systems.nextgpt_checkpoint import save_pretrained, write_folder
from minignext.toy.trainer import RunArgs
from minignext.training import data, stages
from minignext.weights import WeightsError

PRESETS = ("nextgpt-7b", "tiny-random")
PEAK_LR = 5e-4              # the reference's warmup_max_lr, every stage
BATCH = 8                   # global; the reference: 1 per GPU
MAX_TOKENS = 512            # the reference's max_length


def build(preset, dtype=torch.float32, device="cpu", seed=0):
    """(model, {"encoder": folder, "llm": folder} or None): the model before stage 1. tiny-random has
    no folders; `train` writes them."""
    if preset == "tiny-random":
        from minignext.tiny import tiny_random

        model = tiny_random().to(dtype)
        model.first_new_id = model.tokenizer.token_to_id(SPLICE_OPEN)
        return model.to(device), None
    if preset != "nextgpt-7b":
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.presets import REAL_DIR
    from minignext.projection import OutputProjectionConfig
    from minignext.tokenizer import Tokenizer

    dirs = {"encoder": REAL_DIR / "imagebind", "llm": REAL_DIR / "vicuna-7b-v0"}
    missing = [str(p) for p in dirs.values() if not p.is_dir()]
    if missing:
        raise WeightsError(f"training nextgpt-7b starts from ImageBind-huge and Vicuna-7B-v0, missing: "
                           f"{', '.join(missing)}; `minignext download nextgpt-7b` says how to get them")
    encoder = ImageBind.from_pretrained(dirs["encoder"], dtype=dtype, device=device)
    llm = Llama.from_pretrained(dirs["llm"], dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(dirs["llm"])
    torch.manual_seed(seed)
    new = stages.add_tokens(tok, llm)
    projections = {m: OutputProjectionConfig.official(m, llm.config.hidden_size) for m in MODALITIES}
    model = NextGPT(encoder, llm, tok, projections, enc_dim=encoder.config.out_embed_dim).to(device)
    model.requires_grad_(False)
    model.first_new_id = new[0]
    return model, dirs


@torch.no_grad()
def imagebind_table(model, media, args: RunArgs, device) -> dict:
    """{path: ImageBind vector} of every input medium; each process encodes a share of them and all
    get all (RunArgs.gather)."""
    media = sorted(set(media), key=lambda m: (m.modality, str(m.path)))
    encoder = model.visual_encoder.to(device)
    dtype = next(encoder.parameters()).dtype
    vectors = []
    for m in args.shard(media):
        source = data.video_source(m.path) if m.modality == "video" else m.path
        x = encoder_input(encoder, m.modality, source).to(device, dtype)
        vectors.append(model.imagebind_vector(INPUTS[m.modality], x)[0].float())
    mine = torch.stack(vectors) if vectors else torch.zeros(0, model.llama_proj.in_features, device=device)
    return {m.path: v for m, v in zip(media, args.gather(mine).cpu())}


def stage_dialogues(data_dir, todo) -> dict:
    pairs = data.read_pairs(data_dir) if {1, 2} & set(todo) else None
    return {s: data.read_mosit(data_dir) if s == 3 else data.pair_dialogues(pairs, s) for s in todo}


def train(args: RunArgs, preset, data_dir, out, last_stage=3, batch=BATCH, lr=PEAK_LR, epochs=1.0, steps=None,
          dtype=torch.float32, max_tokens=MAX_TOKENS) -> dict:
    """Stages 1 to `last_stage` on the data in data_dir; OUT/{nextgpt.json, delta.safetensors}. Each
    stage runs `steps` steps of `batch` dialogues, or enough for `epochs` passes over its data; a
    stage whose run finished before (OUT/runs/) is loaded, not trained again."""
    t0, out, todo = time.perf_counter(), Path(out), tuple(range(1, last_stage + 1))
    load_on = "cpu" if args.fsdp else args.device       # FSDP: the shards go to the devices, not the model
    model, dirs = build(preset, dtype, load_on, args.seed_of("nextgpt/init"))
    if dirs is None:        # tiny-random: its parts before training become the folders the result points at
        args.on_main(save_pretrained, model, out / "base", overwrite=True)
        dirs = {"encoder": out / "base" / "imagebind", "llm": out / "base" / "llm"}
    dialogues = stage_dialogues(data_dir, todo)
    inputs = [m for s in todo for d in dialogues[s] for t in d for m in t.user_media]
    table = imagebind_table(model, inputs, args, args.device)
    model.visual_encoder = None                      # frozen and no longer needed: out of memory
    shapes = {m: (model.output_projection(m).config.num_queries, model.output_projection(m).config.out_dim)
              for m in MODALITIES}
    report = {}
    for stage in todo:
        if stage == 3:
            torch.manual_seed(args.seed_of("nextgpt_stage3/lora-init"))
            add_lora(model.llama_model, stages.LORA["r"], stages.LORA["alpha"])
        items = dialogues[stage]

        def draw(step, stage=stage, items=items):
            # the same indices on every rank; each encodes only its share (shard() keeps those)
            picks = args.sample(f"nextgpt_stage{stage}/order", step, len(items), batch)
            return [stages.encode_dialogue(model, items[i], lambda m: table[m.path],
                                           lambda m: data.load_target(m, shapes[m.modality]), max_tokens)
                    if k % args.world_size == args.rank else None for k, i in enumerate(picks)]

        total = steps or max(1, math.ceil(epochs * len(items) / batch))
        run = stages.run_stage(model, stage, args, draw, steps=total, lr=lr, warmup=total,
                               bf16=dtype == torch.bfloat16, save_frozen=False)
        report[stage] = {**stages.count_trainable(model, stage), "steps": run.total, "loss": run.mean_loss(),
                         **run.timing()}
    lora = stages.LORA if lora_parameters(model.llama_model) else None
    args.on_main(write_folder, out, model, stages.delta_state(model, dtype), encoder_dir=dirs["encoder"],
                 llm_dir=dirs["llm"], lora=lora, overwrite=True)
    return {"folder": str(out), "stages": report, "seconds": round(time.perf_counter() - t0, 1)}
