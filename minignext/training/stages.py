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

from contextlib import nullcontext

import torch

from minignext.lora import lora_parameters
from minignext.systems.nextgpt import (MODALITIES, PROJECTION_NAMES, SPLICE_CLOSE, SPLICE_OPEN, add_nextgpt_tokens,
                                      freeze_old_rows, signal_token_names)
from minignext.systems.nextgpt_checkpoint import peft_name, projection_state
from minignext.toy.mllm import answer_loss, by_length, pad_batch, splice
from minignext.toy.trainer import ADAM_BETAS, Run, RunArgs, optimizer_step
from minignext.training import distributed

LORA = {"r": 32, "alpha": 32.0}            # NExT-GPT's stage 3; on the toy, r = 16 left a few requests without signals


def media_of(x) -> list:
    """A turn's media field as a list: None, one medium, or several."""
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def made_media(turn) -> tuple:
    """The media an exchange's answer makes: dialogues.Exchange names them in `made`, world.Turn and
    data.Turn in `assistant_media` (one, a list or None)."""
    made = getattr(turn, "made", None)
    return tuple(made) if made is not None else tuple(media_of(turn.assistant_media))


def encode_dialogue(model, turns, soft, target, max_tokens=None) -> dict:
    """Exchanges (each with .user, .assistant and .user_media: a medium with a .modality, a list of
    them, or None; and the media its answer makes, made_media) -> {"ids", "labels", "soft": [(position,
    vector)], "runs": [(modality, start, target)]}, laid out exactly as NextGPT.build_prompt lays out a
    conversation in the model's chat template, with labels on the assistant's tokens (its text, its
    signal runs and the stop that ends it). soft(medium) is an input's ImageBind vector, target(medium)
    the conditioning an output's decoder takes (Q, D). Every input gets its own <Img>[soft]</Img>
    before the user's text. Longer than max_tokens: cut, the slots and runs past the cut left out."""
    tok, template = model.tokenizer, model.template
    ask = template.assistant.rstrip(" ")                  # the generation prompt
    lead = template.assistant[len(ask):]                  # what stands before an answer's text
    stop_in_sep = template.stop[0] in template.sep       # ChatML's <|im_end|>; Vicuna's "###" opens the next turn
    user = tok.encode(template.user, add_bos=False)
    ids, labels = ([tok.bos_id], [-100]) if tok.adds_bos else ([], [])
    slots, runs = [], []

    def add(tokens, train):
        ids.extend(tokens)
        labels.extend(tokens if train else [-100] * len(tokens))

    if model.system:                                      # one piece, as NextGPT.prompt_segments gives it
        add(tok.encode(template.system_block(model.system), add_bos=False), False)

    for i, t in enumerate(turns):
        if stop_in_sep:
            add(user, False)
        else:
            add(user[:1], i > 0)                          # the stop that ends the previous answer
            add(user[1:], False)
        inputs = media_of(t.user_media)
        for m in inputs:
            add([tok.token_to_id(SPLICE_OPEN)], False)
            slots.append((len(ids), soft(m)))
            add([0], False)
            add([tok.token_to_id(SPLICE_CLOSE)], False)
        text = f" {t.user}" if inputs else t.user
        add(tok.encode(text, add_bos=False, special=False) + tok.encode(template.sep + ask, add_bos=False), False)
        made = made_media(t)
        answer = tok.encode(lead + t.assistant + "".join("".join(signal_token_names(m.modality)) for m in made)
                            + template.sep, add_bos=False)
        start, at = len(ids), 0
        add(answer, True)
        for m in made:                                    # each run where the answer's ids hold it
            run = model.signal_ids[m.modality]
            at = next(k for k in range(at, len(answer)) if answer[k:k + len(run)] == run)
            runs.append((m.modality, start + at, target(m)))
            at += len(run)
    if not stop_in_sep:
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


def distance_loss(model, pairs, args: RunArgs | None = None, rows_learn=True):
    """Mean per-token Euclidean distance (not squared) between the projected signal states and the
    decoder text encoder's output, averaged over the modalities present (in the global batch). pairs:
    [(modality, the hidden states at its signal run (n, H), the target conditioning)]. rows_learn=False:
    no gradient reaches the signal tokens' embedding rows."""
    shared = args is not None and args.world_size > 1
    totals, counts = [], []
    for modality in MODALITIES:
        mine = [(h, t) for m, h, t in pairs if m == modality]
        if not mine:
            totals.append(None)
            counts.append(0)
            continue
        ids = torch.tensor(model.signal_ids[modality], device=mine[0][0].device)
        with nullcontext() if rows_learn else torch.no_grad():
            emb = model.llama_model.embed(ids)[None].expand(len(mine), -1, -1)
        pred = model.output_projection(modality)(torch.stack([h for h, _ in mine]).float(), emb)
        target = torch.stack([t for _, t in mine]).to(pred)
        distances = (pred - target).norm(dim=-1)
        totals.append(distances.sum() if shared else signal_distance(pred, target))
        counts.append(distances.numel() if shared else 1)
    zero = torch.zeros((), device=model.llama_proj.weight.device)
    if shared:
        counts = distributed.all_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
        totals = [zero if t is None else t * args.world_size / c for t, c in zip(totals, counts)]
    present = [t for t, c in zip(totals, counts) if c]
    return torch.stack(present).mean() if present else zero


def loss_fn(model, examples, bf16=False, max_tokens=None, args: RunArgs | None = None, keep=None):
    """(CE + distance, CE, distance) on the answers, over the batch in length-sorted micro-batches of
    at most `max_tokens` padded positions (None: one batch): the same loss, with little padding. The
    LM head runs only where a label is (a 49k-token vocabulary would cost a fifth of the step).
    bf16: the matmuls in bfloat16 (autocast). With the RunArgs of one of several processes, this
    share's part of the global batch's loss, weighted by its labelled tokens and signal states.
    keep(pairs), if given, receives the signal states with their targets."""
    device = model.llama_proj.weight.device
    ce_sum, labelled, pairs = torch.zeros((), device=device), 0, []
    with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        for group in by_length(examples, max_tokens):
            embeds, labels, runs = collate(model, group)
            hidden = model.llama_model.hidden_states(inputs_embeds=embeds)
            ce_sum = ce_sum + answer_loss(model.llama_model.lm_head, hidden, labels, reduction="sum")
            labelled += int((labels[:, 1:] != -100).sum())
            pairs += [(m, hidden[b, s:s + len(model.signal_ids[m])], t) for b, m, s, t in runs]
    ce = ce_sum / max(1, labelled) if args is None or args.world_size == 1 else args.mean(ce_sum, labelled)
    dist = distance_loss(model, pairs, args)
    if keep is not None:
        keep(pairs)
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


def run_stage(model, stage, args: RunArgs, draw, *, steps, lr, warmup=50, projection_lr_scale=1.0, bf16=False,
              max_tokens=None, save_frozen=True, name="nextgpt", replay=None) -> Run:
    """Train `stage` for args.steps(steps) steps as the run `{name}_stage{stage}`: `draw(step)` gives
    the step's global batch of examples (the same on every process), each process trains on its share.
    In stage 3 the projections' learning rate is lr * projection_lr_scale. bf16: the forward under
    autocast, and what trains kept in fp32 (the optimiser's master copy). max_tokens: see loss_fn.
    replay: keeps each step's signal states (replay.keep) and runs its own updates after the step
    (replay.run(lr), at the projections' learning rate), as the toy smol recipe does."""
    params = trainable(model, stage)
    if bf16:
        for p in params:
            p.data = p.data.float()
    fast = {id(p) for m in ("llama_proj", *(PROJECTION_NAMES[m] for m in MODALITIES))
            for p in getattr(model, m).parameters()} if stage == 3 else set()
    groups = [{"params": [p for p in params if id(p) not in fast]},
              {"params": [p for p in params if id(p) in fast], "lr_scale": projection_lr_scale}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=ADAM_BETAS)
    run = Run.start(f"{name}_stage{stage}", args, {"model": model}, opt, steps, lr, warmup=warmup,
                    save_frozen=save_frozen, unused_params=stage > 1)
    model.train()
    for step in run.steps():
        batch = draw(step)
        if len(batch) < args.world_size:
            raise ValueError(f"a batch of {len(batch)} cannot be shared by {args.world_size} processes")
        loss, ce, dist = run.forward(loss_fn, model, args.shard(batch), bf16, max_tokens, args,
                                     None if replay is None else replay.keep)
        optimizer_step(opt, loss, params)
        if replay is not None:
            replay.run(opt.param_groups[-1]["lr"])
        run.log(loss.item(), ce=ce.item(), dist=dist.item())
    model.eval()
    return run


# ---------------------------------------------------------------- the delta, in the official names

def delta_state(model, dtype=torch.float16, compact_rows=False) -> dict:
    """What stages 1-3 trained, under the official checkpoint's (peft) names: the LoRA factors, the
    resized embed_tokens and lm_head (compact_rows: only their new rows, under `.new_rows`), llama_proj
    and the output projections, in `dtype`."""
    llm = model.llama_model
    out = {peft_name(k): v for k, v in lora_parameters(llm).items()}
    for name, w in (("model.embed_tokens", llm.model.embed_tokens.weight), ("lm_head", llm.lm_head.weight)):
        if compact_rows and name == "lm_head" and llm.config.tie_word_embeddings:
            continue                                # tied: its rows are the embedding's
        out[peft_name(f"{name}.new_rows" if compact_rows else f"{name}.weight")] = \
            w[model.first_new_id:] if compact_rows else w
    out.update(projection_state(model))
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}
