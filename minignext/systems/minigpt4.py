"""MiniGPT-4 (Zhu et al. 2023, "MiniGPT-4: Enhancing Vision-Language Understanding with Advanced
Large Language Models", arXiv 2304.10592): BLIP-2's frozen image encoder and Q-Former in front of
a frozen Vicuna, joined by one trained linear layer.

    image -> EVA-ViT-g -> post_layernorm -> Q-Former (32 queries) -> llama_proj -> 32 soft tokens
    "###Human: <Img>[32 soft tokens]</Img> Describe this image. ###Assistant: " -> Vicuna -> "...###"

Reference code: Vision-CAIR/MiniGPT-4 (minigpt4/models/minigpt4.py and minigpt_base.py,
conversation/conversation.py, processors/blip_processors.py). Its LLaMA-2 variant has no Q-Former:
the ViT's patch tokens are concatenated four neighbours at a time (256 -> 64 tokens of
4 x 1408 = 5632) before `llama_proj` (5632 -> 4096).

BLIP-2's own assembly with a LLaMA language model (transformers' Blip2ForConditionalGeneration)
is in this file too. MiniGPT-4 is that assembly with `llama_proj` in the place of
`language_projection` and a chat template around it, so the transformers class is the reference
its image path is checked against, and both share `splice_image_tokens`.

Checkpoints. The official MiniGPT-4 file holds what was trained, {"model": {llama_proj.*}}. The
frozen parts come from LAVIS files (eva_vit_g.pth: the ViT; blip2_pretrained_flant5xxl.pth:
ln_vision, the Q-Former and its query tokens), renamed by `minignext.blip2.lavis_key`; the LLM is
a Hugging Face LLaMA folder.
"""

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from minignext import blip2 as b2
from minignext import media, weights
from minignext.generation import generate
from minignext.llama import Llama, LlamaConfig, fill_tied_head

IMAGE_PLACEHOLDER = "<ImageHere>"
VIT_TOKENS_PER_LLM_TOKEN = 4          # the LLaMA-2 variant's concatenation


# ---------------------------------------------------------------- BLIP-2 with LLaMA (transformers' layout)

def splice_image_tokens(token_embeds, image_mask, image_tokens):
    """Put image tokens (B, N, H) at the N positions per row where image_mask (B, T) is True."""
    counts = image_mask.sum(dim=1)
    n = image_tokens.shape[1]
    if image_mask.shape[0] != image_tokens.shape[0] or bool((counts != n).any()):
        raise ValueError(f"every prompt needs exactly {n} image positions, one per image token; "
                         f"got {counts.tolist()} for {image_tokens.shape[0]} image(s)")
    return token_embeds.masked_scatter(image_mask[..., None], image_tokens.to(token_embeds.dtype))


class Blip2ForConditionalGeneration(nn.Module):
    """Images + prompt ids holding `num_query_tokens` copies of `image_token_index` per image ->
    LLaMA logits. Attribute names are transformers' checkpoint keys."""

    def __init__(self, config: b2.Blip2Config):
        super().__init__()
        if config.text_config is None or config.image_token_index is None:
            raise ValueError("Blip2ForConditionalGeneration needs a text_config (the LLaMA) and an "
                             "image_token_index (the placeholder id the query outputs replace)")
        self.config = config
        q = config.qformer_config
        self.vision_model = b2.Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size))
        self.qformer = b2.Blip2QFormerModel(q)
        self.language_projection = nn.Linear(q.hidden_size, config.text_config.hidden_size)
        self.language_model = Llama(config.text_config)

    def image_tokens(self, pixel_values):
        _, queries = b2.query_features(self.vision_model, self.query_tokens, self.qformer, pixel_values)
        return self.language_projection(queries)

    def embed(self, pixel_values, input_ids):
        return splice_image_tokens(self.language_model.embed(input_ids), input_ids == self.config.image_token_index,
                                   self.image_tokens(pixel_values))

    def forward(self, pixel_values, input_ids, attention_mask=None):
        return self.language_model(inputs_embeds=self.embed(pixel_values, input_ids), attention_mask=attention_mask)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, max_new_tokens=20, **kwargs):
        """The new tokens (B, max_new_tokens or fewer); kwargs as minignext.generation.generate."""
        return generate(self.language_model, inputs_embeds=self.embed(pixel_values, input_ids),
                        max_new_tokens=max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        folder = weights.resolve(path)
        model = weights.build_on_meta(cls, b2.Blip2Config.from_hf(weights.read_config(folder)))
        sd = dict(pair for k, t in weights.load_safetensors(folder).items() for pair in b2.hf_key(k, t))
        weights.load_into(model, fill_tied_head(model.config.text_config, sd, "language_model."), dtype, device)
        model.language_model.tie_weights()
        return model.eval()


# ---------------------------------------------------------------- MiniGPT-4

@dataclass(frozen=True)
class ChatStyle:
    """The demo's conversation: system + sep, then role + message + sep for every message."""
    system: str
    roles: tuple
    sep: str


CHAT_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
               "once I provide it to you. Please answer my questions.")
VICUNA0 = ChatStyle(CHAT_SYSTEM, ("Human: ", "Assistant: "), "###")
LLAMA2 = ChatStyle(CHAT_SYSTEM, ("<s>[INST] ", " [/INST] "), "")


@dataclass
class MiniGPT4Config:
    vision_config: b2.Blip2VisionConfig = field(default_factory=b2.Blip2VisionConfig)
    qformer_config: b2.Blip2QFormerConfig = field(default_factory=b2.Blip2QFormerConfig)
    text_config: LlamaConfig = field(default_factory=LlamaConfig.vicuna_7b)
    has_qformer: bool = True             # False: the LLaMA-2 variant
    num_query_token: int = 32
    prompt_template: str = "###Human: {} ###Assistant: "   # stage 2's training prompt
    end_sym: str = "###"                 # ends every answer in training; generation stops at it
    max_txt_len: int = 160               # answer tokens kept in training (stage 2)
    chat_style: ChatStyle = VICUNA0

    def __post_init__(self):
        v = self.vision_config
        if self.qformer_config.encoder_hidden_size != v.hidden_size:
            self.qformer_config = dataclasses.replace(self.qformer_config, encoder_hidden_size=v.hidden_size)
        if self.has_qformer:
            self.image_feature_size, self.num_image_tokens = self.qformer_config.hidden_size, self.num_query_token
        else:
            if v.num_patches % VIT_TOKENS_PER_LLM_TOKEN:
                raise ValueError(f"the LLaMA-2 variant groups the ViT's {v.num_patches} patch tokens by "
                                 f"{VIT_TOKENS_PER_LLM_TOKEN}: they must divide evenly")
            self.image_feature_size = VIT_TOKENS_PER_LLM_TOKEN * v.hidden_size
            self.num_image_tokens = v.num_patches // VIT_TOKENS_PER_LLM_TOKEN

    @classmethod
    def official(cls, text_config: LlamaConfig, has_qformer=True):
        """The released models: Vicuna-v0 with the Q-Former, or LLaMA-2-chat without it."""
        if has_qformer:
            return cls(text_config=text_config)
        return cls(text_config=text_config, has_qformer=False, prompt_template="[INST] {} [/INST] ",
                   end_sym="</s>", chat_style=LLAMA2)

    @classmethod
    def tiny(cls, has_qformer=True, text_config=None):
        return cls(vision_config=b2.Blip2VisionConfig.tiny(), qformer_config=b2.Blip2QFormerConfig.tiny(),
                   text_config=text_config or LlamaConfig.tiny(vocab_size=512, max_position_embeddings=256),
                   has_qformer=has_qformer, num_query_token=4)


def preprocess_image(image, size=224) -> torch.Tensor:
    """BLIP-2's evaluation transform: squash to size x size (bicubic, no crop, the aspect ratio is
    not kept), scale to [0, 1], normalise with CLIP's mean and std. A path, PIL image or uint8
    (H, W, 3) array gives (3, size, size); a list of them gives (N, 3, size, size)."""
    if isinstance(image, (list, tuple)):
        return torch.stack([preprocess_image(i, size) for i in image])
    pil = media._as_pil(image).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(media.CLIP_MEAN).view(3, 1, 1)) / torch.tensor(media.CLIP_STD).view(3, 1, 1)


@dataclass
class Example:
    input_ids: torch.Tensor              # (T,) long, 0 at the image positions
    labels: torch.Tensor                 # (T,) the assistant's tokens, -100 everywhere else
    image_mask: torch.Tensor             # (T,) bool, True at the image positions


def build_example(tokenizer, turns, num_image_tokens, template="###Human: {} ###Assistant: ", end_sym="###",
                  max_txt_len=None) -> Example:
    """MiniGPT-4's training sequence for one image and a conversation [(human, assistant), ...]:

        <s> template(human_1) assistant_1 end_sym <s> template(human_2) assistant_2 end_sym ...

    The first human message holds the one `<ImageHere>`, which becomes `num_image_tokens` image
    positions. Each piece is tokenized on its own, without special tokens, as the reference does,
    so the supervised tokens of a turn are exactly tokenizer(assistant + end_sym); `max_txt_len`
    truncates them. Stage 1 (captions, no instruction) is template "{}", human "<ImageHere>",
    end_sym "\n"."""
    if not turns:
        raise ValueError("build_example needs at least one (human, assistant) turn")
    ids, labels, image = [], [], []

    def add(tokens, supervised=False, is_image=False):
        ids.extend(tokens)
        labels.extend(tokens if supervised else [-100] * len(tokens))
        image.extend([is_image] * len(tokens))

    for i, (human, assistant) in enumerate(turns):
        if human.count(IMAGE_PLACEHOLDER) != (i == 0):
            raise ValueError(f"the first human message must hold exactly one {IMAGE_PLACEHOLDER} and later ones "
                             f"none; message {i} has {human.count(IMAGE_PLACEHOLDER)}")
        before, _, after = template.format(human).partition(IMAGE_PLACEHOLDER)
        add([tokenizer.bos_id] + tokenizer.encode(before, add_bos=False))
        add([0] * (num_image_tokens if i == 0 else 0), is_image=True)
        add(tokenizer.encode(after, add_bos=False))
        add(tokenizer.encode(assistant + end_sym, add_bos=False)[:max_txt_len], supervised=True)
    return Example(torch.tensor(ids), torch.tensor(labels), torch.tensor(image))


def collate(examples, pad_id=0) -> dict:
    """Right-pad examples into a batch: input_ids, labels, image_mask, attention_mask (B, T)."""
    t = max(len(e.input_ids) for e in examples)
    pad = lambda x, value: F.pad(x, (0, t - len(x)), value=value)
    return {"input_ids": torch.stack([pad(e.input_ids, pad_id) for e in examples]),
            "labels": torch.stack([pad(e.labels, -100) for e in examples]),
            "image_mask": torch.stack([pad(e.image_mask, False) for e in examples]),
            "attention_mask": torch.stack([pad(torch.ones_like(e.image_mask), False) for e in examples])}


def lm_loss(logits, labels):
    """Next-token cross-entropy: position t predicts labels[t + 1]; -100 is not counted."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class MiniGPT4(nn.Module):
    def __init__(self, config: MiniGPT4Config):
        super().__init__()
        self.config = config
        self.vision_model = b2.Blip2VisionModel(config.vision_config)
        if config.has_qformer:
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_token, config.qformer_config.hidden_size))
            self.qformer = b2.Blip2QFormerModel(config.qformer_config)
        self.llama_proj = nn.Linear(config.image_feature_size, config.text_config.hidden_size)
        self.llama_model = Llama(config.text_config)

    def encode_image(self, pixel_values):
        """Images (B, 3, S, S) -> the LLM's image tokens (B, num_image_tokens, hidden)."""
        if self.config.has_qformer:
            return self.llama_proj(b2.query_features(self.vision_model, self.query_tokens, self.qformer,
                                                     pixel_values)[1])
        patches = self.vision_model(pixel_values).last_hidden_state[:, 1:]
        return self.llama_proj(rearrange(patches, "b (n k) d -> b n (k d)", k=VIT_TOKENS_PER_LLM_TOKEN))

    def forward(self, pixel_values, input_ids, image_mask, attention_mask=None):
        """Logits for a batch from `build_example` + `collate`."""
        embeds = splice_image_tokens(self.llama_model.embed(input_ids), image_mask, self.encode_image(pixel_values))
        return self.llama_model(inputs_embeds=embeds, attention_mask=attention_mask)

    def context_embeds(self, tokenizer, prompt: str, image_tokens):
        """A prompt with one `<ImageHere>` per image -> (1, T, hidden): the pieces between the
        placeholders tokenized on their own (BOS on the first), image tokens (N, hidden) between."""
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        if len(pieces) != len(image_tokens) + 1:
            raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} but {len(image_tokens)} "
                             f"image(s) were given")
        device = self.llama_proj.weight.device
        embed = lambda text, bos: self.llama_model.embed(torch.tensor(tokenizer.encode(text, add_bos=bos), dtype=torch.long,
                                                                      device=device))
        parts = [embed(pieces[0], True)]
        for tokens, piece in zip(image_tokens, pieces[1:]):
            parts += [tokens.to(parts[0].dtype), embed(piece, False)]
        return torch.cat(parts)[None]

    @torch.no_grad()
    def chat(self, tokenizer, image, question, history=(), max_new_tokens=300, **kwargs) -> str:
        """One answer about one image (a path, PIL image or uint8 array). history: earlier
        (question, answer) pairs. kwargs as minignext.generation.generate (greedy by default)."""
        c = self.config
        pixels = preprocess_image(image, c.vision_config.image_size)[None].to(self.llama_proj.weight)
        prompt = chat_prompt(question, history, c.chat_style)
        embeds = self.context_embeds(tokenizer, prompt, self.encode_image(pixels))
        new = generate(self.llama_model, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                       stop_strings=[c.end_sym], tokenizer=tokenizer, **kwargs)
        text = tokenizer.decode(new[0], skip_special=True)
        return text.split(c.end_sym)[0].split("Assistant:")[-1].strip()

    @classmethod
    def from_official(cls, llm, checkpoint, blip2_file=None, eva_vit=None, config=None, dtype=None, device=None):
        """Assemble MiniGPT-4 from its official parts: `llm` a Hugging Face LLaMA folder, `checkpoint`
        the MiniGPT-4 file (llama_proj), `blip2_file` LAVIS's BLIP-2 checkpoint (ln_vision, Q-Former,
        query tokens; not used by the LLaMA-2 variant), `eva_vit` LAVIS's eva_vit_g.pth. Paths or
        already loaded dicts. Without `config`, the width of llama_proj picks the variant."""
        folder = weights.resolve(llm)
        trained = read_checkpoint(checkpoint)
        if config is None:
            text = LlamaConfig.from_hf(weights.read_config(folder))
            width = tuple(trained.get("llama_proj.weight", torch.empty(0, 0)).shape)[1:]
            config = MiniGPT4Config.official(text, has_qformer=width != (VIT_TOKENS_PER_LLM_TOKEN * 1408,))
        model = weights.build_on_meta(cls, config)
        check_trained(model, trained)
        llm_sd = {"llama_model." + k: t for k, t in weights.load_safetensors(folder).items()}
        sd = {**frozen_from_lavis(config, blip2_file, eva_vit), **trained,
              **fill_tied_head(config.text_config, llm_sd, "llama_model.")}
        weights.load_into(model, sd, dtype=dtype, device=device)
        model.llama_model.tie_weights()
        return model.eval()


def chat_prompt(question, history=(), style=VICUNA0) -> str:
    """The demo's prompt: the first message carries the image, the last waits for the answer."""
    messages = []
    for i, (q, a) in enumerate([*history, (question, None)]):
        messages += [(style.roles[0], f"<Img>{IMAGE_PLACEHOLDER}</Img> {q}" if i == 0 else q), (style.roles[1], a)]
    return style.system + style.sep + "".join(role + msg + style.sep if msg else role for role, msg in messages)


# ---------------------------------------------------------------- official checkpoints

# The runner saves the state dict minus frozen *parameters*, so persistent buffers of the frozen
# parts may ride along (the Q-Former's position ids; the RoPE frequencies of older transformers).
# They hold nothing learned.
CHECKPOINT_BUFFERS = re.compile(r"Qformer\.bert\.embeddings\.position_ids|llama_model\..*rotary_emb\.inv_freq")
# What a LAVIS BLIP-2 file holds that MiniGPT-4 does not use: the text side of the Q-Former
# (embeddings and per-layer text feed-forward), the retrieval heads and BLIP-2's own LLM projection.
UNUSED_BLIP2 = re.compile(r"embeddings\.|vision_projection\.|text_projection\.|itm_head\.|language_projection\."
                          r"|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def _state(path_or_dict) -> dict:
    return path_or_dict if isinstance(path_or_dict, dict) else weights.load_pickle(path_or_dict)


def read_checkpoint(path_or_dict) -> dict:
    """The trained tensors of an official MiniGPT-4 file ({"model": {...}, "optimizer": ...})."""
    return {k: t for k, t in _state(path_or_dict).items() if not CHECKPOINT_BUFFERS.fullmatch(k)}


def check_trained(model: MiniGPT4, trained: dict):
    """The checkpoint must hold exactly llama_proj.weight and llama_proj.bias, in the model's shapes."""
    expected = {k: t for k, t in model.state_dict().items() if k.startswith("llama_proj.")}
    got = tuple(trained["llama_proj.weight"].shape) if "llama_proj.weight" in trained else None
    if got and got != tuple(expected["llama_proj.weight"].shape) and got[1] in (768, 5632):
        raise weights.WeightsError(
            f"llama_proj.weight is {got} in the checkpoint but {tuple(expected['llama_proj.weight'].shape)} in the "
            f"model: a 768-wide projection reads the Q-Former (Vicuna variant), a 5632-wide one reads 4 ViT tokens "
            f"(LLaMA-2 variant, has_qformer=False); the first number is the LLM's width")
    weights.check_state_dict(expected, trained, where="the MiniGPT-4 checkpoint (llama_proj only)")


def frozen_from_lavis(config: MiniGPT4Config, blip2_file=None, eva_vit=None) -> dict:
    """The frozen parts in this module's names, from LAVIS files, loaded in the reference's order
    (the ViT file first, then the BLIP-2 file, whose copy of a tensor wins)."""
    sd = {}
    if eva_vit is not None:
        # eva_vit_g.pth holds the bare ViT; blocks past num_hidden_layers (EVA-CLIP-g's 40th) are unused
        vit = {"visual_encoder." + k: t for k, t in _state(eva_vit).items()
               if not (m := re.match(r"blocks\.(\d+)\.", k)) or int(m[1]) < config.vision_config.num_hidden_layers}
        sd.update(b2.from_lavis(vit))
    if blip2_file is not None:
        sd.update(b2.from_lavis(_state(blip2_file)))
    sd = {k: t for k, t in sd.items() if not UNUSED_BLIP2.match(k)}
    if not config.has_qformer and "vision_model.post_layernorm.weight" not in sd:
        # the LLaMA-2 variant never loads ln_vision: it keeps its initial ones and zeros
        d = config.vision_config.hidden_size
        sd.update({"vision_model.post_layernorm.weight": torch.ones(d), "vision_model.post_layernorm.bias": torch.zeros(d)})
    return sd
