"""NExT-GPT's three training stages (Wu et al., arXiv 2309.05519, sec. 4 and 5), written once for the
toy world (minignext.toy.train_nextgpt) and the real-size path (minignext.training.nextgpt);
reference: NExT-GPT-Lagacy code/model/anyToImageVideoAudio.py, common/utils.py and its stage configs.

    stage 1  encoder-side alignment   X -> caption; only llama_proj trains; CE on the caption.
    stage 2  decoder-side alignment   caption -> caption + signal tokens; the NEW token rows of
             embed_tokens / lm_head and the output projections train; CE + the mean per-token
             Euclidean distance (not squared) between the projected signal states and the decoder
             text encoder's output for the caption.
    stage 3  instruction tuning       dialogues; LoRA (r = alpha = 32) on q, k, v, o plus both
             projections and the new rows; CE on the assistant tokens plus the stage-2 distance for
             every answer that makes media.

All stages use Adam with betas (0.9, 0.95). An example is a dialogue already laid out as token ids in
the model's chat template, exactly as NextGPT.build_prompt lays out a conversation: labels on the
assistant tokens, the soft-token slots with their ImageBind vectors, and the signal runs with the
decoder conditioning they must produce. Each step draws a global batch of examples and trains on
this process's share (minignext.toy.trainer); the losses weight the shares so that N processes take
the step one process takes on the whole batch.
"""

import torch

from minignext.lora import lora_parameters
from minignext.systems.nextgpt import (
    MODALITIES,
    PROJECTION_NAMES,
    SPLICE_CLOSE,
    SPLICE_OPEN,
    add_nextgpt_tokens,
    freeze_old_rows,
)
from minignext.systems.nextgpt_checkpoint import peft_name, projection_state
from minignext.toy.mllm import answer_ce, pad_batch, splice
from minignext.toy.trainer import ADAM_BETAS, Run, RunArgs, optimizer_step
from minignext.training import distributed

LORA = {"r": 32, "alpha": 32.0}            # NExT-GPT's stage 3; on the toy, r = 16 left a few requests without signals


def media_of(x) -> list:
    """A turn's media field as a list: None, one medium, or several."""
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def encode_dialogue(model, turns, soft, target, max_tokens=None) -> dict:
    """Turns (each with .user, .assistant, .user_media, .assistant_media: a medium with a .modality,
    a list of them, or None) -> {"ids", "labels", "soft": [(position, vector)], "runs": [(modality,
    start, target)]}. soft(medium) is the medium's ImageBind vector, target(medium) the conditioning
    its decoder takes (Q, D). Every input gets its own <Img>[soft]</Img> before the user's text;
    every answer ends with the signal runs of the media it makes, then the separator. Longer than
    max_tokens: cut, with the slots and runs past the cut left out."""
    tok, template = model.tokenizer, model.template
    ids, labels, slots, runs = [tok.bos_id], [-100], [], []

    def add(tokens, train):
        ids.extend(tokens)
        labels.extend(tokens if train else [-100] * len(tokens))

    user = tok.encode(template.user, add_bos=False)
    ask = template.assistant.rstrip(" ")
    for i, t in enumerate(turns):
        add(user[:1], i > 0)                              # the "###" that ends the previous answer
        add(user[1:], False)
        inputs = media_of(t.user_media)
        for m in inputs:
            add([tok.token_to_id(SPLICE_OPEN)], False)
            slots.append((len(ids), soft(m)))
            add([0], False)
            add([tok.token_to_id(SPLICE_CLOSE)], False)
        text = f" {t.user}" if inputs else t.user
        add(tok.encode(text + template.sep + ask, add_bos=False), False)
        add(tok.encode(f" {t.assistant}", add_bos=False), True)
        for m in media_of(t.assistant_media):
            runs.append((m.modality, len(ids), target(m)))
            add(model.signal_ids[m.modality], True)
        add(tok.encode(template.sep, add_bos=False), True)
    add(user[:1], True)
    if max_tokens is not None and len(ids) > max_tokens:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        slots = [(p, v) for p, v in slots if p < max_tokens]
        runs = [r for r in runs if r[1] + len(model.signal_ids[r[0]]) <= max_tokens]
    return {"ids": ids, "labels": labels, "soft": slots, "runs": runs}


def collate(model, examples):
    """Right-padded batch: input embeddings with the projected soft tokens spliced in, labels, runs."""
    device = model.llama_proj.weight.device
    ids, labels = pad_batch([e["ids"] for e in examples], [e["labels"] for e in examples])
    embeds = model.llama_model.embed(ids.to(device))
    soft = [(b, p, v) for b, e in enumerate(examples) for p, v in e["soft"]]
    if soft:
        b, p, v = zip(*soft)
        vectors = model.llama_proj(torch.stack(v).to(device))[:, 0]
        embeds = splice(embeds, b, p, vectors.to(embeds.dtype))
    runs = [(b, m, s, t) for b, e in enumerate(examples) for m, s, t in e["runs"]]
    return embeds, labels.to(device), runs


def signal_distance(pred, target):
    """Stage 2's alignment loss: the mean over tokens of the Euclidean (L2, not squared) distance."""
    return (pred - target).norm(dim=-1).mean()


def distance_loss(model, hidden, runs, args: RunArgs | None = None):
    """Mean per-token Euclidean distance (not squared) between the projected signal states and the
    decoder text encoder's output, averaged over the modalities present in the (global) batch."""
    totals, counts = [], []
    for modality in MODALITIES:
        mine = [(b, s, t) for b, m, s, t in runs if m == modality]
        if not mine:
            totals.append(hidden.new_zeros((), dtype=torch.float32))
            counts.append(0)
            continue
        ids = torch.tensor(model.signal_ids[modality], device=hidden.device)
        states = torch.stack([hidden[b, s:s + len(ids)] for b, s, _ in mine])
        emb = model.llama_model.embed(ids)[None].expand(len(mine), -1, -1)
        pred = model.output_projection(modality)(states, emb).float()
        target = torch.stack([t for _, _, t in mine]).to(pred)
        if args is None or args.world_size == 1:
            totals.append(signal_distance(pred, target))
            counts.append(1)
        else:
            distances = (pred - target).norm(dim=-1)
            totals.append(distances.sum())
            counts.append(distances.numel())
    if args is not None and args.world_size > 1:
        counts = distributed.all_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
        totals = [t * args.world_size / c if c else t for t, c in zip(totals, counts)]
    present = [t for t, c in zip(totals, counts) if c]
    return torch.stack(present).mean() if present else hidden.new_zeros((), dtype=torch.float32)


def loss_fn(model, examples, args: RunArgs | None = None):
    """(CE + distance, CE, distance) of a batch, or of this process's share of one (args)."""
    embeds, labels, runs = collate(model, examples)
    logits, hidden = model.llama_model(inputs_embeds=embeds, return_hidden=True)
    ce = answer_ce(logits, labels, args)
    dist = distance_loss(model, hidden, runs, args)
    return ce + dist, ce, dist


# ---------------------------------------------------------------- what trains

def add_tokens(tokenizer, llm) -> list:
    """Add NExT-GPT's tokens to the tokenizer and the LLM (add_nextgpt_tokens) and start their rows
    distinct and random at the old rows' scale (a resize starts them all at the mean row), except
    <Img> and </Img>, which start where the LLM's own spelling of them points. Returns the new ids."""
    spelled = [tokenizer.encode(name, add_bos=False) for name in (SPLICE_OPEN, SPLICE_CLOSE)]
    new = add_nextgpt_tokens(tokenizer, llm)
    with torch.no_grad():
        for w in {id(p): p for p in (llm.model.embed_tokens.weight, llm.lm_head.weight)}.values():
            w[new] = (torch.randn(len(new), w.shape[1]) * w[:new[0]].float().std()).to(w)
        embed = llm.model.embed_tokens.weight
        for i, ids in zip(new[:2], spelled):
            embed[i] = llm.embed(torch.tensor(ids, device=embed.device)).mean(0)
    return new


def trainable(model, stage) -> list:
    """Switch on exactly what `stage` trains (NExT-GPT sec. 4.1, 5); returns the parameters. The
    embedding / lm_head matrices train only in their new rows (a gradient hook zeroes the rest)."""
    model.requires_grad_(False)
    params = list(model.llama_proj.parameters())
    if stage >= 2:
        params = [] if stage == 2 else params
        for m in MODALITIES:
            params += list(model.output_projection(m).parameters())
        llm = model.llama_model
        for w in {id(p): p for p in (llm.model.embed_tokens.weight, llm.lm_head.weight)}.values():
            if not hasattr(w, "_rows_hook"):
                w._rows_hook = freeze_old_rows(w, model.first_new_id)
            params.append(w)
    if stage == 3:
        params += list(lora_parameters(model.llama_model).values())
    for p in params:
        p.requires_grad_(True)
    return params


def count_trainable(model, stage) -> dict:
    """Trainable parameters of `stage` (new rows only, for the resized matrices) vs all of them."""
    total = sum(p.numel() for p in model.parameters())
    n = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rows = p.shape[0] - model.first_new_id if name.endswith(("embed_tokens.weight", "lm_head.weight")) else None
        n += p.numel() if rows is None else rows * p.shape[1]
    return {"stage": stage, "trainable": n, "total": total, "percent": round(100 * n / total, 3)}


def run_stage(model, stage, args: RunArgs, draw, *, steps, lr, warmup=50, projection_lr_scale=1.0,
              autocast=None, save_frozen=True) -> Run:
    """Train `stage` for args.steps(steps) steps: `draw(step)` gives the step's global batch of
    examples (the same on every process), each process trains on its share. In stage 3 the
    projections' learning rate is lr * projection_lr_scale. autocast: a dtype (torch.bfloat16) to run
    the forward in; the trained parameters are then kept in fp32 (the optimiser's master copy)."""
    params = trainable(model, stage)
    if autocast is not None:
        for p in params:
            p.data = p.data.float()
    fast = {id(p) for m in ("llama_proj", *(PROJECTION_NAMES[m] for m in MODALITIES))
            for p in getattr(model, m).parameters()} if stage == 3 else set()
    groups = [{"params": [p for p in params if id(p) not in fast]},
              {"params": [p for p in params if id(p) in fast], "lr_scale": projection_lr_scale}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=ADAM_BETAS)
    run = Run.start(f"nextgpt_stage{stage}", args, {"model": model}, opt, steps, lr, warmup=warmup,
                    save_frozen=save_frozen, unused_params=stage > 1)
    device_type = torch.device(args.device).type

    def step_loss(model, examples):
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return loss_fn(model, examples, args)

    model.train()
    for step in run.steps():
        loss, ce, dist = run.forward(step_loss, model, args.shard(draw(step)))
        optimizer_step(opt, loss, params)
        run.log(loss.item(), ce=ce.item(), dist=dist.item())
    model.eval()
    return run


# ---------------------------------------------------------------- the delta, in the official names

def delta_state(model, dtype=torch.float16) -> dict:
    """What stages 1-3 trained, under the official checkpoint's (peft) names."""
    llm = model.llama_model
    out = {peft_name(k): v for k, v in lora_parameters(llm).items()}
    out[peft_name("model.embed_tokens.weight")] = llm.model.embed_tokens.weight
    out[peft_name("lm_head.weight")] = llm.lm_head.weight
    out.update(projection_state(model))
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}
