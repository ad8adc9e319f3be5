"""MiniGPT-4 (Zhu et al. 2023, arXiv 2304.10592) on the toy foundations, with the BLIP-2 Q-Former it
reads through (Li et al. 2023, arXiv 2301.12597) pretrained first. Reference code: Vision-CAIR/MiniGPT-4
(minigpt4/models/minigpt4.py, train_configs/minigpt4_stage{1,2}_*.yaml) and Salesforce LAVIS
(lavis/models/blip2_models/blip2_qformer.py).

    ViT       the toy ImageBind's vision branch, converted into BLIP-2's vision model (`eva_vit_state`)
              and frozen. BLIP-2 reads EVA-CLIP one block before its end; so does the toy: 2 of 3 blocks.
    Q-Former  BLIP-2's first stage on image-caption pairs: image-text contrastive (ITC) and matching
              (ITM, on hard negatives) losses; its third loss, image-grounded captioning, is left out.
              The ViT stays frozen; ln_vision, the query tokens, the Q-Former with its text side and
              the heads train. Then all of it is frozen.
    stage 1   llama_proj alone, on captions: "<s>[queries]a picture of a red circle\n"
    stage 2   llama_proj alone, on a small curated set of described images (MiniGPT-4's 3,500, its 400
              steps of 12) in the template "###Human: <Img><ImageHere></Img> {question}###Assistant: "
              with "###" ending the answer: the demo's conversation without its system sentence.

Every batch holds distinct objects of the world (there are 21 to train on): with two red circles in a
batch, ITC would call one the other's negative, and ITM's "hard negative" would be a match.

On disk, weights/toy/minigpt4/ is what the two releases hold: `blip2_pretrained.safetensors` (LAVIS's
names: ln_vision, Qformer.bert.*, query_tokens, the ITC/ITM heads, temp) and
`pretrained_minigpt4.safetensors` (the MiniGPT-4 checkpoint: llama_proj only), with `minigpt4.json`
(the configs and where the foundations are). The ViT is the foundation itself, converted when loaded.
`load` assembles the model with `MiniGPT4.from_official`.

    python -m minignext.toy.train minigpt4              the 8-query model
    python -m minignext.toy.train minigpt4-1q           the same recipe with 1 query (minigpt4-4q: 4)
    python -m minignext.toy.eval family
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minignext import blip2 as b2
from minignext import weights
from minignext.systems import minigpt4 as mg
from minignext.toy import family, world
from minignext.toy.train_imagebind import image_input
from minignext.toy.trainer import TOY_DIR, Run, RunArgs, optimizer_step

OUT_DIR = TOY_DIR / "minigpt4"
QUERIES = 8                     # 65 ViT tokens per query-read, as 257 / 32 in MiniGPT-4
ABLATION = (1, 4)               # the other query counts of the lesson's ablation
QFORMER = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
               cross_attention_frequency=2)           # BERT-base in BLIP-2: 768 wide, 12 blocks
ITC_WIDTH = 32                  # BLIP-2: 256
STAGES = {                      # steps, batch (distinct objects for the Q-Former), peak lr
    "qformer": dict(steps=1500, batch=20, lr=1e-3),
    1: dict(steps=1200, batch=32, lr=3e-3),
    2: dict(steps=400, batch=12, lr=1e-3),
}
CURATED = 3500                  # stage 2's fixed set of described images
ADAMW = dict(betas=(0.9, 0.999), weight_decay=0.05)    # LAVIS's and MiniGPT-4's optimiser
TEMP_INIT, TEMP_RANGE = 0.07, (0.001, 0.5)            # ITC's learned temperature, clamped as LAVIS does
# The toy LLM knows only the world's words: the demo's system sentence ("Give the following image: ...")
# would be 80 tokens of noise to it, so the toy chats without one, and stage 2 trains in exactly the
# layout that chat builds: "###Human: <Img>[queries]</Img> {question}###Assistant: ".
CHAT_STYLE = dataclasses.replace(mg.VICUNA0, system="")
PROMPT_TEMPLATE = CHAT_STYLE.sep + CHAT_STYLE.roles[0] + "{}" + CHAT_STYLE.sep + CHAT_STYLE.roles[1]
STORE_DTYPE = torch.float16
BLIP2_FILE, CHECKPOINT_FILE, META_FILE = "blip2_pretrained.safetensors", "pretrained_minigpt4.safetensors", "minigpt4.json"


# ---------------------------------------------------------------- the frozen ViT, from the toy ImageBind

def vision_config(imagebind_config, blocks=None) -> b2.Blip2VisionConfig:
    """BLIP-2's vision config for the toy ImageBind's vision branch, read after `blocks` blocks
    (default: all but the last, as BLIP-2 reads EVA-CLIP)."""
    c = imagebind_config
    t, kh, kw = c.kernel_size
    if t != c.video_frames or kh != kw:
        raise ValueError(f"an image is one patch deep only if the stem's time kernel covers its {c.video_frames} "
                         f"repeated frames, with square patches; got kernel {c.kernel_size}")
    return b2.Blip2VisionConfig(hidden_size=c.vision_embed_dim, intermediate_size=4 * c.vision_embed_dim,
                                num_hidden_layers=c.vision_num_blocks - 1 if blocks is None else blocks,
                                num_attention_heads=c.vision_num_heads, image_size=c.image_size, patch_size=kh,
                                pre_layernorm=True)


def eva_vit_state(imagebind_state: dict) -> dict:
    """The toy ImageBind's vision branch in the layout of LAVIS's eva_vit_g.pth (plus ln_pre, the
    LayerNorm ImageBind puts before its first block). Exact: an image enters ImageBind as two equal
    frames under a 3-D stem whose kernel spans both, which is a 2-D convolution by the sum of the two
    time slices; and the key bias of its attention adds one number to all of a query's scores, which
    the softmax cancels (EVA has none)."""
    pre, trunk = "modality_preprocessors.vision.", "modality_trunks.vision."
    sd = {k: t.float() for k, t in imagebind_state.items() if k.startswith((pre, trunk))}
    stem = sd[pre + "rgbt_stem.proj.1.weight"]
    out = {"cls_token": sd[pre + "cls_token"], "pos_embed": sd[pre + "pos_embedding_helper.pos_embed"],
           "patch_embed.proj.weight": stem.sum(dim=2), "patch_embed.proj.bias": stem.new_zeros(stem.shape[0]),
           "ln_pre.weight": sd[trunk + "pre_transformer_layer.0.weight"],
           "ln_pre.bias": sd[trunk + "pre_transformer_layer.0.bias"]}
    blocks = sorted({int(k[len(trunk + "blocks."):].split(".")[0]) for k in sd if k.startswith(trunk + "blocks.")})
    for i in blocks:
        src, dst = f"{trunk}blocks.{i}.", f"blocks.{i}."
        q_bias, _, v_bias = sd[src + "attn.in_proj_bias"].chunk(3)
        out.update({dst + "attn.qkv.weight": sd[src + "attn.in_proj_weight"], dst + "attn.q_bias": q_bias,
                    dst + "attn.v_bias": v_bias})
        for theirs, ours in (("norm_1", "norm1"), ("norm_2", "norm2"), ("attn.out_proj", "attn.proj"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out.update({f"{dst}{ours}.{p}": sd[f"{src}{theirs}.{p}"] for p in ("weight", "bias")})
    return out


def foundations(root=TOY_DIR):
    """The frozen toy parts MiniGPT-4 is built on: the ImageBind config and weights (for the ViT), the
    LLM folder, and the ImageBind text tokenizer (the Q-Former's text side)."""
    from minignext.clip import CLIPTokenizer
    from minignext.imagebind import ImageBindConfig

    root = Path(root)
    missing = [p for p in ("imagebind", "llm") if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks the toy foundations {', '.join(missing)}; train them first with "
                                f"`python -m minignext.toy.train foundations`")
    ib = root / "imagebind"
    return (ImageBindConfig.from_hf(weights.read_config(ib)), weights.load_safetensors(ib), root / "llm",
            CLIPTokenizer.from_pretrained(ib))


def pixels(images) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> BLIP-2's input; at the native size `mg.preprocess_image` only normalises."""
    return image_input(np.asarray(images))


# ---------------------------------------------------------------- BLIP-2's first stage: the Q-Former

def blip2_config(vision: b2.Blip2VisionConfig, text_vocab: int, context: int, queries: int) -> b2.Blip2Config:
    q = b2.Blip2QFormerConfig(vocab_size=text_vocab, max_position_embeddings=context, encoder_hidden_size=vision.hidden_size,
                              use_qformer_text_input=True, **QFORMER)
    return b2.Blip2Config(vision_config=vision, qformer_config=q, num_query_tokens=queries, image_text_hidden_size=ITC_WIDTH)


def lavis_vit(vit: dict, vision: b2.Blip2VisionConfig) -> dict:
    """The converted ViT (`eva_vit_state`) under BLIP-2's names, up to the block it is read after."""
    return {k: t for k, t in b2.from_lavis({"visual_encoder." + k: t for k, t in vit.items()}).items()
            if not (k.startswith("vision_model.encoder.layers.") and int(k.split(".")[3]) >= vision.num_hidden_layers)}


def build_qformer(config: b2.Blip2Config, vit: dict, generator) -> b2.Blip2ForImageTextRetrieval:
    """BLIP-2's retrieval model over the frozen ViT, its Q-Former initialised as BERT (normal, std 0.02;
    BLIP-2 starts from BERT-base's weights, which the toy world has no counterpart of) and its query
    tokens as LAVIS does (normal, std 0.02)."""
    model = b2.Blip2ForImageTextRetrieval(config)
    with torch.no_grad():
        for m in [*model.qformer.modules(), *model.embeddings.modules()]:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02, generator=generator)
            if isinstance(m, nn.Linear):
                m.bias.zero_()
        model.query_tokens.normal_(0.0, 0.02, generator=generator)
    missing, unexpected = model.load_state_dict(lavis_vit(vit, config.vision_config), strict=False)
    if unexpected or any(k.startswith("vision_model.") and "post_layernorm" not in k for k in missing):
        raise weights.WeightsError(f"the converted ViT does not fit BLIP-2's vision model: unexpected {unexpected}, "
                                   f"missing {[k for k in missing if k.startswith('vision_model.')]}")
    return model


def qformer_trainable(model) -> list:
    """What BLIP-2's first stage trains: everything but the ViT, whose ln_vision (post_layernorm) is new."""
    model.requires_grad_(True)
    model.vision_model.requires_grad_(False)
    model.vision_model.post_layernorm.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def qformer_batch(args: RunArgs, step, size) -> list:
    """One step's global batch: `size` distinct training objects, each rendered and captioned."""
    rng = args.rng("minigpt4_qformer/batches", step)
    objs = world.train_combinations()
    if size > len(objs):
        raise ValueError(f"a Q-Former batch holds distinct objects: at most {len(objs)}, asked for {size}")
    return [(world.render_image(o, rng), world.caption(o, rng, "image")) for o in rng.choice(objs, size, replace=False)]


def qformer_loss(model, temp, images, ids, generator):
    """LAVIS's Blip2Qformer.forward without its captioning loss: ITC + ITM."""
    image = model.vision_model(images).last_hidden_state
    mask = ids != 0
    feats, text = model.image_features(image), model.text_features(ids, mask)
    itc = b2.itc_loss(feats, text, temp)
    neg_image, neg_text = b2.sample_hard_negatives(b2.itc_similarity(feats, text) / temp, generator)
    logits, _ = model.itm_logits(torch.cat([image, image[neg_image], image]), torch.cat([ids, ids, ids[neg_text]]),
                                 torch.cat([mask, mask, mask[neg_text]]))
    is_match = torch.arange(3 * len(ids)) < len(ids)
    itm = b2.itm_loss(logits, is_match)
    return itc + itm, itc, itm


def pretrain_qformer(model, text_tok, args: RunArgs, part):
    cfg = STAGES["qformer"]
    temp = nn.Parameter(torch.tensor(TEMP_INIT))
    params = qformer_trainable(model) + [temp]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], **ADAMW)
    run = Run.start(part, args, {"model": model, "temp": nn.ParameterList([temp])}, opt, cfg["steps"], cfg["lr"],
                    warmup=100)
    model.train()
    for step in run.steps():
        images, captions = zip(*args.shard(qformer_batch(args, step, cfg["batch"])))
        loss, itc, itm = qformer_loss(model, temp, pixels(images), text_tok(list(captions)),
                                      args.generator(f"{part}/negatives", step))
        optimizer_step(opt, loss, params)
        with torch.no_grad():
            temp.clamp_(*TEMP_RANGE)
        run.log(loss.item(), itc=itc.item(), itm=itm.item())
    model.eval().requires_grad_(False)
    return run, temp.detach()


LAVIS_PREFIXES = (("vision_model.post_layernorm.", "ln_vision."), ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
                  ("embeddings.", "Qformer.bert.embeddings."), ("qformer.encoder.layer.", "Qformer.bert.encoder.layer."),
                  ("vision_projection.", "vision_proj."), ("text_projection.", "text_proj."))


def lavis_name(key: str) -> str:
    """A name of the retrieval model -> LAVIS's (the inverse of `blip2.lavis_key`)."""
    for ours, theirs in LAVIS_PREFIXES:
        if key.startswith(ours):
            key = theirs + key[len(ours):]
            break
    return key.replace("attention.attention.", "attention.self.")


def blip2_state(model, temp) -> dict:
    """The trained BLIP-2 parts under LAVIS's names (the frozen ViT is left out: it is the foundation)."""
    out = {"temp": temp.reshape(())}
    for key, t in model.state_dict().items():
        if key.startswith("vision_model.") and not key.startswith("vision_model.post_layernorm."):
            continue
        name = lavis_name(key)
        if [k for k, _ in b2.lavis_key(name, t)] != [key]:
            raise weights.WeightsError(f"{key} is saved as {name}, which blip2.lavis_key does not read back")
        out[name] = t
    return out


# ---------------------------------------------------------------- MiniGPT-4's two stages: llama_proj

def minigpt4_config(meta: dict, text_config) -> mg.MiniGPT4Config:
    """The toy MiniGPT-4's config from minigpt4.json: the Q-Former without its text side (MiniGPT-4 drops it)."""
    q = b2.Blip2QFormerConfig(**{**meta["qformer_config"], "use_qformer_text_input": False})
    return mg.MiniGPT4Config(vision_config=b2.Blip2VisionConfig(**meta["vision_config"]), qformer_config=q,
                             text_config=text_config, num_query_token=meta["num_query_token"],
                             prompt_template=PROMPT_TEMPLATE, chat_style=CHAT_STYLE)


def assemble(meta, vit, blip2_file, llama_proj, llm_dir, dtype=torch.float32) -> mg.MiniGPT4:
    """A MiniGPT-4 through its own loader (`MiniGPT4.from_official`), from the files' contents."""
    from minignext.llama import LlamaConfig

    config = minigpt4_config(meta, LlamaConfig.from_hf(weights.read_config(llm_dir)))
    return mg.MiniGPT4.from_official(llm_dir, llama_proj, blip2_file, vit, config=config, dtype=dtype)


def curated_set(args: RunArgs, size=CURATED) -> list:
    """Stage 2's fixed data: (object, render seed, question, answer) of described images."""
    rng = args.rng("minigpt4_stage2/curated")
    out = []
    for _ in range(args.count(size, 64)):
        t = world.turn("describe_image", rng, "train", "train")
        out.append((t.user_media.obj, int(rng.integers(2**31)), t.user, " " + t.assistant))
    return out


def stage_batch(args: RunArgs, stage, step, size, curated=None) -> list:
    """One step's global batch of (image, human message, answer). Stage 1: a bare caption after the
    image; stage 2: a question and answer of the curated set."""
    rng = args.rng(f"minigpt4_stage{stage}/batches", step)
    if stage == 1:
        objs = [world.sample_object(rng) for _ in range(size)]
        return [(world.render_image(o, rng), mg.IMAGE_PLACEHOLDER, world.caption(o, rng, "image")) for o in objs]
    picks = [curated[i] for i in rng.integers(len(curated), size=size)]
    return [(world.render_image(o, seed), f"<Img>{mg.IMAGE_PLACEHOLDER}</Img> {q}", a) for o, seed, q, a in picks]


def stage_loss(model, tok, batch, stage):
    c = model.config
    template, end = ("{}", "\n") if stage == 1 else (c.prompt_template, c.end_sym)
    examples = [mg.build_example(tok, [(human, answer)], c.num_image_tokens, template, end, c.max_txt_len)
                for _, human, answer in batch]
    b = mg.collate(examples)
    logits = model(pixels([img for img, _, _ in batch]), b["input_ids"], b["image_mask"], b["attention_mask"])
    return mg.lm_loss(logits, b["labels"])


def train_projection(model, tok, stage, args: RunArgs, part, curated=None):
    cfg = STAGES[stage]
    model.requires_grad_(False)
    params = list(model.llama_proj.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], **ADAMW)
    run = Run.start(part, args, {"llama_proj": model.llama_proj}, opt, cfg["steps"], cfg["lr"], warmup=50)
    for step in run.steps():
        loss = stage_loss(model, tok, args.shard(stage_batch(args, stage, step, cfg["batch"], curated)), stage)
        optimizer_step(opt, loss, params)
        run.log(loss.item())
    model.requires_grad_(False)
    return run


# ---------------------------------------------------------------- the recipe, saving and loading

def folder_for(queries) -> Path:
    return OUT_DIR if queries == QUERIES else TOY_DIR / f"minigpt4-{queries}q"


def train(args: RunArgs, queries=QUERIES, out_dir=None, root=TOY_DIR) -> dict:
    from minignext.tokenizer import Tokenizer

    t0 = time.perf_counter()
    ib_config, ib_state, llm_dir, text_tok = foundations(root)
    vit = eva_vit_state(ib_state)
    vision = vision_config(ib_config)
    tag = f"minigpt4_{queries}q"
    config = blip2_config(vision, text_tok.tokenizer.get_vocab_size(), text_tok.model_max_length, queries)
    blip2 = build_qformer(config, vit, args.generator(f"{tag}/init"))
    runs = {}
    runs["qformer"], temp = pretrain_qformer(blip2, text_tok, args, f"{tag}_qformer")
    meta = {"imagebind": "", "llm": "", "vision_config": dataclasses.asdict(vision),
            "qformer_config": dataclasses.asdict(config.qformer_config), "num_query_token": queries}
    torch.manual_seed(args.seed_of(f"{tag}/llama_proj-init"))
    proj = nn.Linear(QFORMER["hidden_size"], weights.read_config(llm_dir)["hidden_size"])
    model = assemble(meta, vit, blip2_state(blip2, temp), {f"llama_proj.{k}": v for k, v in proj.state_dict().items()},
                     llm_dir)
    tok = Tokenizer.from_pretrained(llm_dir)
    runs[1] = train_projection(model, tok, 1, args, f"{tag}_stage1")
    runs[2] = train_projection(model, tok, 2, args, f"{tag}_stage2", curated_set(args))
    out = save(out_dir or folder_for(queries), model, blip2_state(blip2, temp), meta, root)
    stages = {str(k): {"steps": r.total, "batch": STAGES[k]["batch"], "loss": r.mean_loss(), "seconds": round(r.seconds, 1)}
              for k, r in runs.items()}
    examples = sum(s["steps"] * s["batch"] for s in stages.values())
    family.write_training_record(out, minutes=round((time.perf_counter() - t0) / 60, 1), examples=examples,
                                 queries=queries, stages=stages)
    return {"folder": str(out), "queries": queries, "examples": examples, "stages": stages,
            "megabytes": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6, 2)}


def save(folder, model, blip2: dict, meta: dict, root=TOY_DIR) -> Path:
    folder, root = Path(folder), Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(Path(p).resolve(), folder.resolve())      # noqa: E731
    store = lambda sd: {k: v.detach().to(STORE_DTYPE).contiguous() for k, v in sd.items()}   # noqa: E731
    weights.save_safetensors(store(blip2), folder / BLIP2_FILE, overwrite=True)
    weights.save_safetensors(store({f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()}),
                             folder / CHECKPOINT_FILE, overwrite=True)
    meta = {**meta, "imagebind": rel(root / "imagebind"), "llm": rel(root / "llm"), "blip2": BLIP2_FILE,
            "checkpoint": CHECKPOINT_FILE}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_retrieval(folder=OUT_DIR):
    """BLIP-2's retrieval model as the Q-Former's pretraining left it (with its text side and the ITC
    and ITM heads, which MiniGPT-4 drops), its ITC temperature and its text tokenizer."""
    from minignext.clip import CLIPTokenizer

    folder = Path(folder)
    meta = weights.read_config(folder, META_FILE)
    vision = b2.Blip2VisionConfig(**meta["vision_config"])
    config = b2.Blip2Config(vision_config=vision, qformer_config=b2.Blip2QFormerConfig(**meta["qformer_config"]),
                            num_query_tokens=meta["num_query_token"], image_text_hidden_size=ITC_WIDTH)
    saved = weights.load_safetensors(folder / meta["blip2"])
    vit = lavis_vit(eva_vit_state(weights.load_safetensors(folder / meta["imagebind"])), vision)
    model = weights.load_into(weights.build_on_meta(b2.Blip2ForImageTextRetrieval, config),
                              {**vit, **b2.from_lavis(saved)}, dtype=torch.float32)
    return model.eval(), saved["temp"].float(), CLIPTokenizer.from_pretrained(folder / meta["imagebind"])


def load(folder=OUT_DIR, dtype=torch.float32):
    """(MiniGPT4, its LLM tokenizer) from a folder that `save` wrote."""
    from minignext.tokenizer import Tokenizer

    folder = Path(folder)
    meta = weights.read_config(folder, META_FILE)
    llm_dir = folder / meta["llm"]
    vit = eva_vit_state(weights.load_safetensors(folder / meta["imagebind"]))
    model = assemble(meta, vit, weights.load_safetensors(folder / meta["blip2"]),
                     weights.load_safetensors(folder / meta["checkpoint"]), llm_dir, dtype)
    return model, Tokenizer.from_pretrained(llm_dir)
