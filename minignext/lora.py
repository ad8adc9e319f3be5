"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685):
a frozen weight W plus a trained low-rank update, h = W x + (alpha / r) B A x  (eq. 3).

NExT-GPT's stage 3 puts LoRA on the LLM's q, k, v and o projections (r = alpha = 32, via peft).
`LoRALinear` keeps the base weight under its own name and adds `lora_A` / `lora_B`, so a layer's
keys are `...q_proj.weight`, `...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`: peft's names
minus its wrapper (see minignext.systems.nextgpt_checkpoint.DELTA_RENAMES). B starts at zero, so training starts
from the unchanged model; `merge` folds the update back in with minignext.weights.merge_lora.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minignext.weights import merge_lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight (and bias) are shared with `base` and frozen, plus lora_A, lora_B."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha = r, alpha
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))      # peft's default
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * (self.alpha / self.r)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(merge_lora(self.weight, self.lora_A.weight, self.lora_B.weight, self.alpha, self.r))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def add_lora(model: nn.Module, r: int, alpha: float, targets=TARGETS) -> list[str]:
    """Replace every nn.Linear named in `targets` inside `model` by a LoRALinear; returns their names."""
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in targets and type(m) is nn.Linear]
    if not names:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in {type(model).__name__}")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha))
    return names


def merge_all(model: nn.Module) -> int:
    """Fold every LoRALinear in `model` back into a plain nn.Linear; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, getattr(owner, child).merged())
    return len(names)


def lora_parameters(model: nn.Module) -> dict:
    """{name: parameter} of the LoRA factors only."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
