"""PandaGPT (Su et al. 2023, "PandaGPT: One Model To Instruction-Follow Them All", arXiv 2305.16355):
NExT-GPT's input side alone. Reference: yxuansu/PandaGPT code/model/openllama.py.

    encode   ImageBind-huge: an image, video, audio clip, depth map, thermal image or IMU
             recording -> one 1024-d vector
    project  llama_proj: Linear -> ONE soft token, between the texts "<Img>" and "</Img>"
    LLM      Vicuna (v0) with LoRA r = alpha = 32 on q, k, v and o reads the Vicuna-v0 prompt
             "### Human: <Img>[soft]</Img> {question}\\n### Assistant:" and answers in text

It trains only llama_proj and the LoRA factors, on image-text pairs only: every other modality
reaches the LLM through ImageBind's joint space, zero-shot. So the class is NextGPT without output
projections or decoders. Two things differ from NExT-GPT: "<Img>" and "</Img>" are plain text,
not added tokens (the text between two soft tokens is tokenized as one string, as the reference
does), and PandaGPT's copy of ImageBind drops the logit scale of audio only, so thermal (x10),
depth and IMU (x5) embeddings reach llama_proj scaled, as its forward returns them.

The release is a delta `pytorch_model.pt`: every trainable parameter under its training name,
`llama_proj.{weight,bias}` and peft's `llama_model.base_model.model.model.layers.{i}.self_attn.
{q,k,v,o}_proj.lora_{A,B}.default.weight`; no embedding rows (PandaGPT adds no tokens). It loads
strictly against exactly that key set.
"""

from pathlib import Path

import torch

from minignext import lora, weights
from minignext.systems.nextgpt import Conversation, NextGPT
from minignext.systems.nextgpt_checkpoint import DELTA_RENAMES, apply_delta, peft_name
from minignext.weights import WeightsError

LORA_R = LORA_ALPHA = 32                    # and dropout 0.1 while training, on lora.TARGETS
SCALED = ("thermal", "depth", "imu")        # branches whose logit scale PandaGPT keeps


class PandaGPT(NextGPT):
    """ImageBind + llama_proj + a LLaMA; chat and generation as NextGPT's, text out only."""

    def __init__(self, visual_encoder, llama_model, tokenizer, enc_dim=1024):
        super().__init__(visual_encoder, llama_model, tokenizer, output_projections={}, enc_dim=enc_dim)

    def _splice_ids(self):
        return None                          # "<Img>" and "</Img>" are plain text here

    def prompt_segments(self, conversation: Conversation) -> list:
        """The segments with the text between two soft tokens joined: "### Human: <Img>" before
        the first, then "</Img> {question}\\n### Assistant: ..." after it, each tokenized whole."""
        out = []
        for seg in super().prompt_segments(conversation):
            if isinstance(seg, str) and out and isinstance(out[-1], str):
                out[-1] += seg
            else:
                out.append(seg)
        return out

    def imagebind_vector(self, branch, x):
        vector = self.visual_encoder.embed(branch, x)
        if branch in SCALED:
            vector = self.visual_encoder.modality_postprocessors[branch][1](vector)
        return vector

    # ------------------------------------------------------------ the release

    @classmethod
    def from_pretrained(cls, folder, imagebind=None, vicuna=None, delta=None, lora_alpha=LORA_ALPHA,
                        dtype=None, device=None) -> "PandaGPT":
        """folder/imagebind (a converted ImageBind-huge), folder/vicuna (a HF LLaMA folder with
        tokenizer.json) and the delta (folder/pytorch_model.pt as released, or delta.safetensors);
        each can be given on its own."""
        from minignext.imagebind import ImageBind
        from minignext.llama import Llama
        from minignext.tokenizer import Tokenizer

        folder = Path(folder)
        imagebind, vicuna = Path(imagebind or folder / "imagebind"), Path(vicuna or folder / "vicuna")
        if delta is None:
            delta = next((p for p in (folder / "pytorch_model.pt", folder / "delta.safetensors") if p.is_file()),
                         folder / "pytorch_model.pt")
        encoder = ImageBind.from_pretrained(imagebind, dtype=dtype, device=device)
        llm = Llama.from_pretrained(vicuna, dtype=dtype, device=device)
        model = cls(encoder, llm, Tokenizer.from_pretrained(vicuna), enc_dim=encoder.config.out_embed_dim)
        load_delta(model, read_delta(delta), lora_alpha=lora_alpha, dtype=dtype, device=device)
        return model.eval()

    def add_lora(self, r=LORA_R, alpha=LORA_ALPHA) -> list:
        """LoRA on the LLM's q, k, v and o, as PandaGPT trains it; returns the wrapped layers."""
        return lora.add_lora(self.llama_model, r, alpha)

    def delta_state(self) -> dict:
        """What PandaGPT releases: llama_proj and the LoRA factors, in the official names."""
        factors = lora.lora_parameters(self.llama_model)
        if not factors:
            raise ValueError("this PandaGPT carries no LoRA layers (add_lora); its delta would hold llama_proj only")
        state = {peft_name(k): v.detach() for k, v in factors.items()}
        return {**state, **{f"llama_proj.{k}": v.detach() for k, v in self.llama_proj.state_dict().items()}}

    def save_pretrained(self, folder, overwrite=False) -> Path:
        """folder/delta.safetensors: the delta, as the release names it; ImageBind and Vicuna
        stay where they are (from_pretrained takes their folders)."""
        return weights.save_safetensors(self.delta_state(), Path(folder) / "delta.safetensors", overwrite=overwrite)


def read_delta(path) -> dict:
    """The delta from the released pickle (read with weights_only=True) or from safetensors,
    with peft's wrapper dropped from the names (nextgpt_checkpoint.DELTA_RENAMES)."""
    path = Path(path)
    raw = weights.load_safetensors(path) if path.suffix == ".safetensors" else weights.load_pickle(path)
    out = {}
    for key, tensor in raw.items():
        for old, new in DELTA_RENAMES:
            key = key.replace(old, new)
        out[key] = tensor
    return out


def expected_delta(model: PandaGPT, r: int) -> dict:
    """Name -> a meta tensor of the expected shape, for every key of the delta and no other."""
    meta = lambda *shape: torch.empty(shape, device="meta")
    out = {"llama_proj.weight": meta(*model.llama_proj.weight.shape), "llama_proj.bias": meta(*model.llama_proj.bias.shape)}
    for name, module in model.llama_model.named_modules():
        if name.split(".")[-1] in lora.TARGETS and isinstance(module, torch.nn.Linear):
            out[f"llama_model.{name}.lora_A.weight"] = meta(r, module.in_features)
            out[f"llama_model.{name}.lora_B.weight"] = meta(module.out_features, r)
    return out


def load_delta(model: PandaGPT, delta: dict, lora_alpha=LORA_ALPHA, dtype=None, device=None) -> PandaGPT:
    """Check `delta` (read_delta's names) against exactly the expected keys and shapes, merge its
    LoRA into the LLM (W + alpha / r * B A) and load llama_proj."""
    ranks = {t.shape[0] for k, t in delta.items() if ".lora_A." in k}
    if len(ranks) > 1:
        raise WeightsError(f"the delta's LoRA factors have several ranks {sorted(ranks)}; PandaGPT uses one")
    weights.check_state_dict(expected_delta(model, ranks.pop() if ranks else LORA_R), delta,
                             where="the PandaGPT delta (llama_proj and LoRA on q, k, v, o of every layer)")
    rest = apply_delta(model.llama_model, delta, lora_alpha=lora_alpha)
    weights.load_into(model.llama_proj, {k.removeprefix("llama_proj."): v for k, v in rest.items()},
                      dtype=dtype, device=device)
    return model
