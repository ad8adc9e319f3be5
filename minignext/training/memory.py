"""Memory per GPU of training NExT-GPT-7B, computed on the meta device: the model is built at full size
with shapes and no storage, each stage switches on what it trains (minignext.training.stages.trainable),
and the bytes are counted. No weights and no GPU are needed.

What is counted, per parameter, in bf16 training as minignext.training.nextgpt runs it:
    frozen      2 bytes: the bf16 weight
    trained    16 bytes: an fp32 weight (autocast computes in bf16), its fp32 gradient, Adam's m and v
               (the embedding and lm_head matrices count whole: their old rows' gradients are zeroed,
               not absent, as in the reference, which trains every row)
ImageBind is not there: minignext encodes every input once before stage 1 and frees it (the reference
keeps ImageBind-huge, 2.4 GB in bf16, on every GPU throughout).

    DDP      everything on every GPU
    FSDP     weights, gradients and Adam's state split N ways, plus, while they run, the root unit
             gathered whole (embed_tokens, lm_head, the final norm, the projections; trained ones with
             their full gradients) and two decoder layers (the one running and the next, prefetched)
    ZeRO-2   the reference (NExT-GPT-Lagacy code/dsconfig/, DeepSpeed): bf16 weights on every GPU,
             bf16 gradients split N ways, Adam's fp32 master weights, m and v offloaded to the CPU

Activations come on top, per GPU for the sequences it holds: an estimate, the tensors autograd keeps
for backward in one bf16 forward of the LLM with LoRA and the loss, counted on the meta device without
activation checkpointing; SDPA's T x T attention scores are left out (a fused attention kernel keeps
none on a GPU), and the meta device's attention keeps fp32 copies of q, k and v, so it is on the high side.
"""

import torch

from minignext import weights
from minignext.llama import Llama, LlamaConfig, LlamaDecoderLayer
from minignext.lora import add_lora
from minignext.projection import OutputProjectionConfig
from minignext.systems.nextgpt import MODALITIES, NextGPT, added_tokens
from minignext.toy.mllm import answer_ce
from minignext.training import stages

GB = 1e9
WAYS = ("DDP", "FSDP", "ZeRO-2")


def nextgpt_on_meta(stage) -> NextGPT:
    """NExT-GPT-7B's LLM and projections at full size on the meta device, LoRA added for stage 3 and
    `stage`'s parameters set to train."""
    from minignext.tiny import tiny_tokenizer

    config = LlamaConfig.vicuna_7b()
    config.vocab_size += len(added_tokens())
    llm = weights.build_on_meta(Llama, config).to(torch.bfloat16)
    tok = tiny_tokenizer()                      # only the ids of NExT-GPT's tokens are read
    tok.add_special_tokens(added_tokens())
    projections = {m: OutputProjectionConfig.official(m, config.hidden_size) for m in MODALITIES}
    with torch.device("meta"):
        model = NextGPT(None, llm, tok, projections)
        if stage == 3:
            add_lora(llm, stages.LORA["r"], stages.LORA["alpha"])
    model.first_new_id = LlamaConfig.vicuna_7b().vocab_size
    stages.trainable(model, stage)
    return model


def split(params) -> tuple[int, int]:
    """(frozen, trained) parameter counts."""
    params = list(params)
    trained = sum(p.numel() for p in params if p.requires_grad)
    return sum(p.numel() for p in params) - trained, trained


def counts(model) -> dict:
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    return {"all": split(model.parameters()), "layer": split(layers[0].parameters()),
            "root": split(p for p in model.parameters() if id(p) not in in_layers)}


def per_gpu(way, c: dict, gpus: int) -> float:
    """Bytes per GPU of weights, gradients and optimiser state (activations apart)."""
    frozen, trained = c["all"]
    if way == "DDP":
        return 2 * frozen + 16 * trained
    if way == "ZeRO-2":
        return 2 * (frozen + trained) + 2 * trained / gpus
    root_frozen, root_trained = c["root"]
    layer_frozen, layer_trained = c["layer"]
    gathered = 2 * root_frozen + 8 * root_trained + 2 * (2 * layer_frozen + 4 * layer_trained)
    return (2 * frozen + 16 * trained) / gpus + (gathered if gpus > 1 else 0)


def activation_bytes_per_token(tokens=512) -> float:
    """The estimate of the module docstring, per token, for a sequence of `tokens`."""
    model = nextgpt_on_meta(3)
    llm = model.llama_model
    llm.model.init_buffers("meta")
    params = {id(p) for p in model.parameters()}
    saved, keep = {}, []

    def pack(t):
        keep.append(t)                          # keeps ids unique while counting
        base = t._base if t._base is not None else t
        if id(base) not in params and tuple(t.shape[-2:]) != (tokens, tokens):
            saved[id(t)] = t.numel() * t.element_size()
        return t

    x = torch.empty(1, tokens, llm.config.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        answer_ce(llm(inputs_embeds=x), labels)
    return sum(saved.values()) / tokens


def table(gpus=(1, 2, 4, 8), tokens=512) -> dict:
    """{"rows": [(way, stage, trained params, [GB per GPU for each count])], "activations": bytes per
    token, "tokens": tokens}."""
    rows = []
    by_stage = {s: counts(nextgpt_on_meta(s)) for s in (1, 2, 3)}
    for way in WAYS:
        for stage, c in by_stage.items():
            rows.append((way, stage, c["all"][1], [per_gpu(way, c, n) / GB for n in gpus]))
    return {"rows": rows, "activations": activation_bytes_per_token(tokens), "tokens": tokens, "gpus": gpus}


def markdown_table(gpus=(1, 2, 4, 8), tokens=512) -> str:
    t = table(gpus, tokens)
    lines = ["| way | stage | trained parameters | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in gpus) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in gpus) + " |"]
    what = {1: "1 (input projection)", 2: "2 (output projections, new rows)", 3: "3 (+ LoRA r=32)"}
    for way, stage, trained, gb in t["rows"]:
        cells = [what[stage], f"{trained / 1e6:,.1f} M"] + [f"{x:.1f} GB" for x in gb]
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    per_token = t["activations"]
    lines.append("")
    lines.append(f"Activations, on top, per GPU: about {per_token / 1e6:.1f} MB a token (an estimate), "
                 f"{per_token * tokens / GB:.1f} GB for one sequence of {tokens} tokens.")
    return "\n".join(lines)
