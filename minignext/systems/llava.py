"""LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning", arXiv 2310.03744;
LLaVA: "Visual Instruction Tuning", arXiv 2304.08485): a CLIP vision tower, a two-layer MLP and a
LLaMA that reads the image as one soft token per patch.

    image    pad to a square with the CLIP mean, resize to 336, CLIP-normalise
    encode   CLIP ViT-L/14-336 (clip.CLIPVision): the hidden states of layer -2, CLS dropped
    project  multi_modal_projector: Linear, GELU, Linear -> 576 soft tokens
    splice   each <image> placeholder of the prompt takes one of them, in order
    LLM      Vicuna-7B-v1.5 (llama.Llama) writes the answer

Module names are the keys of the Hugging Face hub layout (llava-hf/llava-1.5-7b-hf:
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
`language_model.lm_head.weight`), which transformers' LlavaForConditionalGeneration reads.
`convert_original` turns the original release (haotian-liu/LLaVA: `model.*`, `lm_head.weight`,
`model.mm_projector.{0,2}.*`, or stage 1's `mm_projector.bin` alone) into that layout. The prompt
is LLaVA's "vicuna_v1" conversation (llava/conversation.py) and the training labels follow its
`preprocess_v1` (llava/train/train.py): only the answers and their end tokens are supervised.
Stage 1's captions use its "plain" template instead (`encode_caption`, after `preprocess_plain`).
"""

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from minignext import media, weights
from minignext.clip import CLIPVision, CLIPVisionConfig, add_tower_prefix
from minignext.generation import generate
from minignext.llama import Llama, LlamaConfig, fill_tied_head
from minignext.systems.nextgpt import Conversation, Reply
from minignext.tokenizer import Tokenizer
from minignext.utils import config_from_dict
from minignext.weights import WeightsError

# What transformers fills in when a sub-config leaves a field out: LlamaConfig() is LLaMA-7B,
# CLIPVisionConfig() is ViT-B/32. LlavaConfig() without a vision_config takes ViT-L/14-336.
HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=None)
HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               num_channels=3, image_size=224, patch_size=32, projection_dim=512,
                               hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAVA_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768)
PROJECTOR_ACTIVATIONS = {"gelu": F.gelu}
IGNORE_INDEX = -100                     # labels the loss skips


def _vision(d: dict) -> CLIPVisionConfig:
    return config_from_dict(CLIPVisionConfig, {**HF_CLIP_VISION_DEFAULTS, **d}, with_projection=False)


def _text(d: dict) -> LlamaConfig:
    return LlamaConfig.from_hf({**HF_LLAMA_DEFAULTS, **d})


@dataclass
class LlavaConfig:
    """transformers' LlavaConfig: its field names and defaults (LLaVA-1.5-7B's shapes)."""
    vision_config: CLIPVisionConfig = field(default_factory=lambda: _vision(LLAVA_VISION))
    text_config: LlamaConfig = field(default_factory=lambda: _text({}))
    image_token_index: int = 32000              # the placeholder id, one per patch feature
    image_seq_length: int = 576                 # informational, as in transformers: see image_tokens
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    vision_feature_layer: int | tuple = -2      # hidden_states index; several are concatenated
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(f"projector_hidden_act must be one of {sorted(PROJECTOR_ACTIVATIONS)}, "
                             f"got {self.projector_hidden_act!r}")
        layers = self.feature_layers
        depth = self.vision_config.num_hidden_layers
        if any(not -depth - 1 <= i <= depth for i in layers):
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is outside the tower's "
                             f"{depth + 1} hidden states")
        if self.tie_word_embeddings and not self.text_config.tie_word_embeddings:
            self.text_config = dataclasses.replace(self.text_config, tie_word_embeddings=True)
        self.tie_word_embeddings = self.text_config.tie_word_embeddings

    @property
    def image_tokens(self) -> int:
        """Features per image, so placeholders per image: one per patch, plus CLS with "full"."""
        return self.vision_config.grid ** 2 + (self.vision_feature_select_strategy == "full")

    @property
    def feature_layers(self) -> tuple:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        """From a hub config.json; sub-config fields left out take transformers' defaults."""
        vision = _vision(d["vision_config"]) if d.get("vision_config") else _vision(LLAVA_VISION)
        return config_from_dict(cls, d, renames={"image_token_id": "image_token_index"}, vision_config=vision,
                                text_config=_text(d.get("text_config") or {}))

    def to_dict(self) -> dict:
        """config.json in the hub layout's names."""
        d = {k: v for k, v in asdict(self).items() if k not in ("vision_config", "text_config")}
        vision = {k: v for k, v in asdict(self.vision_config).items() if k != "with_projection"}
        return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], **d,
                "vision_config": {"model_type": "clip_vision_model", **vision},
                "text_config": {"model_type": "llama", **asdict(self.text_config)}}

    @classmethod
    def tiny(cls, **overrides) -> "LlavaConfig":
        """A 32x32-image, 16-patch LLaVA with a 2-layer, 64-wide LLaMA of 128 tokens (the last two
        are <image> and <pad>)."""
        vision = _vision(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32))
        text = _text(dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=512, pad_token_id=127))
        return cls(**{"vision_config": vision, "text_config": text, "image_token_index": 126,
                      "image_seq_length": 16, **overrides})


# ---------------------------------------------------------------- the model (hub-layout names)

class LlavaMultiModalProjector(nn.Module):
    """Vision features -> LLM embeddings: Linear, GELU, Linear (LLaVA-1.5's "mlp2x_gelu")."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        width, bias = config.vision_config.hidden_size * len(config.feature_layers), config.multimodal_projector_bias
        self.linear_1 = nn.Linear(width, config.text_config.hidden_size, bias=bias)
        self.act = PROJECTOR_ACTIVATIONS[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class Llava(nn.Module):
    """model(input_ids, pixel_values) -> logits (B, T, V). Every image placeholder in input_ids
    (config.image_token_index) is replaced by one projected patch feature, image after image."""

    def __init__(self, config: LlavaConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVision(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = Llama(config.text_config)
        self.tokenizer = tokenizer
        self.system = SYSTEM        # what prompt() and chat() put first unless given a system sentence

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Llava":
        """A hub-layout folder: config.json, model*.safetensors, and tokenizer.json if chat is wanted."""
        folder = weights.resolve(path)
        config = LlavaConfig.from_hf(weights.read_config(folder))
        sd = fill_tied_head(config.text_config, weights.load_safetensors(folder), "language_model.")
        model = weights.load_into(weights.build_on_meta(cls, config), sd, dtype=dtype, device=device)
        model.language_model.tie_weights()
        if (folder / "tokenizer.json").is_file():
            model.tokenizer = Tokenizer.from_pretrained(folder)
        return model.eval()

    def image_features(self, pixel_values) -> torch.Tensor:
        """(N, 3, H, W) CLIP-normalised images -> (N, config.image_tokens, LLM width)."""
        states = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        c = self.config
        return self.multi_modal_projector(select_features(states, c.feature_layers, c.vision_feature_select_strategy))

    def embed_inputs(self, input_ids, pixel_values=None) -> torch.Tensor:
        """The LLM's input embeddings (B, T, H), image features spliced at the placeholders."""
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        vocab = c.text_config.vocab_size
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
            raise ValueError(f"token ids must be in 0..{vocab - 1}, got {int(input_ids.max())}"
                             f"{f' and {int(input_ids.min())}' if int(input_ids.min()) < 0 else ''}")
        slots = input_ids == c.image_token_index
        n_slots, n_images = int(slots.sum()), 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * c.image_tokens:
            raise ValueError(f"the prompt holds {n_slots} image placeholders (token id {c.image_token_index}), "
                             f"but {n_images} image(s) give {n_images * c.image_tokens} features: each image "
                             f"needs exactly {c.image_tokens} placeholders, one per patch feature")
        embeds = self.language_model.embed(input_ids)
        if n_images:
            embeds = splice_image_features(embeds, slots, self.image_features(pixel_values))
        return embeds

    def forward(self, input_ids, pixel_values=None, attention_mask=None):
        return self.language_model(inputs_embeds=self.embed_inputs(input_ids, pixel_values),
                                   attention_mask=attention_mask)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, max_new_tokens=64, **kwargs) -> torch.Tensor:
        """The new token ids (B, N) after the prompt; kwargs as minignext.generation.generate."""
        return generate(self.language_model, inputs_embeds=self.embed_inputs(input_ids, pixel_values),
                        max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------ chat

    def prompt(self, conversation: Conversation, system=None):
        """(input_ids (1, T), pixel_values (N, 3, S, S) or None) for the conversation's next answer."""
        if self.tokenizer is None:
            raise ValueError("this Llava has no tokenizer; load a folder with tokenizer.json or set model.tokenizer")
        system = conversation.system_or(self.system) if system is None else system
        ids, _, images = encode_conversation(self.tokenizer, conversation, self.config.image_token_index,
                                             self.config.image_tokens, system=system)
        size = self.config.vision_config.image_size
        pixels = torch.stack([preprocess_image(img, size) for img in images]) if images else None
        return torch.tensor([ids], device=self.language_model.lm_head.weight.device), pixels

    def chat(self, messages, *, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0, system=None,
             progress=True) -> Reply:
        """Answer the last user turn of `messages` (a string, message dicts with "image", or a
        Conversation, which gets the answer appended). `system`: the sentence before the first turn;
        when None, the conversation's own (a first message of role "system"), else model.system
        (LLaVA-1.5's); none when ""."""
        conv = messages if isinstance(messages, Conversation) else Conversation.from_messages(messages)
        ids, pixels = self.prompt(conv, system)
        if pixels is not None:
            pixels = pixels.to(ids.device)
        new = self.generate(ids, pixels, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            progress=progress)[0].tolist()
        text = self.tokenizer.decode([t for t in new if t != self.tokenizer.eos_id], skip_special=True).strip()
        if isinstance(messages, Conversation):
            messages.assistant(text)
        return Reply(text=text, raw_text=text, generated_ids=new, token_ids=new)


def select_features(hidden_states, layers, strategy="default") -> torch.Tensor:
    """LLaVA's vision features: the tower's hidden states at `layers` (indices into hidden_states,
    which begins with the input of the first layer; -2 is the output of the second-to-last layer),
    CLS dropped with strategy "default", concatenated along the width: (N, patches, D * len(layers))."""
    return torch.cat([hidden_states[i][:, 1:] if strategy == "default" else hidden_states[i] for i in layers], dim=-1)


def splice_image_features(embeds, slots, features) -> torch.Tensor:
    """`embeds` (B, T, H) with the features (N, P, H) written where the bool mask `slots` (B, T) is
    True: row after row, image after image, patch after patch. The graph is kept."""
    return embeds.masked_scatter(slots[..., None], features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))


# ---------------------------------------------------------------- image and prompt

def expand_to_square(img: Image.Image, fill=media.CLIP_MEAN) -> Image.Image:
    """LLaVA-1.5's `expand2square`: centre the image on a square of the background colour
    (the CLIP mean in 0..255), so that resizing keeps the whole image instead of cropping it."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    square = Image.new(img.mode, (side, side), tuple(int(x * 255) for x in fill))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    return square


def preprocess_image(img, size=336) -> torch.Tensor:
    """A path / PIL image / uint8 array -> (3, size, size): pad to square, resize, CLIP-normalise."""
    return media.preprocess_image(expand_to_square(media._as_pil(img)), size=size)


# LLaVA's "vicuna_v1" conversation: SYSTEM USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ...
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def render_conversation(conversation: Conversation, image_token="<image>", eos_token="</s>", system=None):
    """(prompt text, the character spans of the answers and their end tokens, the images) in
    the vicuna_v1 template. Each image is `image_token` and a newline, before its turn's text.
    A conversation that ends with a user turn ends with "ASSISTANT:", for the model to answer."""
    system = SYSTEM if system is None else system
    text, spans, images = f"{system} " if system else "", [], []
    for turn in conversation.turns:
        if turn.role == "assistant":
            text += "ASSISTANT: "
            spans.append((len(text), len(text) + len(turn.text) + len(eos_token)))
            text += turn.text + eos_token
            continue
        for modality, source in turn.media:
            if modality != "image":
                raise ValueError(f"LLaVA reads images only; this turn has a {modality} input")
            images.append(source)
        placeholders = (image_token + "\n") * len(turn.media)
        text += f"USER: {placeholders}{turn.text} "
    if conversation.turns and conversation.turns[-1].role == "user":
        text += "ASSISTANT:"
    return text, spans, images


def encode_conversation(tokenizer, conversation: Conversation, image_token_id: int, image_tokens: int,
                        system=None):
    """(input_ids, labels, images) of a conversation, for training and for chat alike.

    The prompt is tokenized as one string (as transformers' LlavaProcessor does), then each image
    token is repeated `image_tokens` times, one per patch feature. Labels are IGNORE_INDEX except
    on the tokens that overlap an answer or the end token after it: found by character offsets in
    that one tokenization, so they cannot drift from the ids the way LLaVA's preprocess_v1 can when
    it re-tokenizes each round to count its length ("tokenization mismatch", loss silently 0).
    """
    image_token, eos_token = tokenizer.id_to_token(image_token_id), tokenizer.id_to_token(tokenizer.eos_id)
    text, spans, images = render_conversation(conversation, image_token, eos_token, system)
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    if enc.ids.count(image_token_id) != len(images):
        raise ValueError(f"the tokenizer turns {len(images)} {image_token!r} into {enc.ids.count(image_token_id)} "
                         f"image tokens (id {image_token_id}); add it as a special token")
    ids, labels = ([tokenizer.bos_id], [IGNORE_INDEX]) if tokenizer.bos_id is not None else ([], [])
    for i, (start, end) in zip(enc.ids, enc.offsets):
        repeat = image_tokens if i == image_token_id else 1
        answer = any(start < b and end > a for a, b in spans)
        ids += [i] * repeat
        labels += [i if answer and i != image_token_id else IGNORE_INDEX] * repeat
    return ids, labels, images


def encode_caption(tokenizer, caption: str, image_token_id: int, image_tokens: int):
    """(input_ids, labels) of a stage-1 example in LLaVA's "plain" template (`preprocess_plain`):
    <s>, the image's placeholders, then the caption and the separator "\\n", tokenized on their own;
    only the caption and its separator are supervised."""
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + [image_token_id] * image_tokens
    answer = tokenizer.encode(caption + "\n", add_bos=False)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


# ---------------------------------------------------------------- the original LLaVA release

ORIGINAL_NAMES = (                        # original prefix -> hub prefix, first match wins
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def original_key(key, tensor):
    """A key of the original LLaVA checkpoint -> its hub-layout name."""
    for old, new in ORIGINAL_NAMES:
        if key.startswith(old):
            return [(new + key[len(old):], tensor)]
    raise WeightsError(f"unexpected key {key} in a LLaVA checkpoint; expected keys under "
                       f"{', '.join(old for old, _ in ORIGINAL_NAMES)}")


def _read_tensors(path) -> dict:
    """safetensors (file, folder or shards) or pickles (a .bin/.pt file, or the shards that
    pytorch_model.bin.index.json lists), read with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors"))):
        return weights.load_safetensors(path)
    if path.is_file():
        return weights.load_pickle(path)
    index = path / "pytorch_model.bin.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["pytorch_model.bin"])
    return {k: t for name in files for k, t in weights.load_pickle(path / name).items()}


def convert_original(src, dst, vision_tower, projector=None, overwrite=False) -> Path:
    """The original LLaVA-1.5 release -> a hub-layout folder that Llava and transformers read.

    src          the original model folder (config.json with the mm_* fields; weights
                 `model.*`, `lm_head.weight`, `model.mm_projector.{0,2}.*`), or, with `projector`,
                 the plain Vicuna folder stage 1 started from
    projector    stage 1's `mm_projector.bin`, when src holds no projector
    vision_tower the CLIP folder named by mm_vision_tower (openai/clip-vit-large-patch14-336)
    Like transformers' converter, <image> and <pad> are added after the vocabulary, which is then
    padded to a multiple of 64; the new rows start at the mean of the old ones (transformers
    samples them around it).
    """
    src, dst, vision_dir = Path(src), Path(dst), weights.resolve(vision_tower)
    if (dst / "model.safetensors").exists() and not overwrite:
        raise FileExistsError(f"{dst / 'model.safetensors'} exists; pass overwrite=True to replace it")
    original = weights.read_config(src)
    if original.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise WeightsError(f"mm_projector_type {original['mm_projector_type']!r}: only LLaVA-1.5's "
                           f"'mlp2x_gelu' projector has the hub layout's linear_1, GELU, linear_2")
    state = dict(kv for k, t in _read_tensors(src).items() for kv in original_key(k, t))
    if projector is not None:
        state.update(kv for k, t in weights.load_pickle(projector).items() for kv in original_key(k, t))
    if not any(k.startswith("vision_tower.") for k in state):
        for key, t in weights.load_safetensors(vision_dir).items():
            state.update((f"vision_tower.{k}", v) for k, v in add_tower_prefix(key, t, "vision_model.")
                         if k.startswith("vision_model."))
    vocab = original.get("vocab_size", HF_LLAMA_DEFAULTS["vocab_size"])
    padded = math.ceil((vocab + 2) / 64) * 64
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in state:
            old = state[key][:vocab]
            state[key] = torch.cat([old, old.float().mean(0, keepdim=True).to(old.dtype).expand(padded - vocab, -1)])
    text = {k: v for k, v in original.items() if not k.startswith("mm_")}
    select = original.get("mm_vision_select_feature", "patch")
    clip_config = weights.read_config(vision_dir)
    vision = _vision(clip_config.get("vision_config") or clip_config)
    config = LlavaConfig(vision_config=vision, text_config=_text({**text, "vocab_size": padded, "pad_token_id": vocab + 1}),
                         image_token_index=vocab, image_seq_length=vision.grid ** 2 + (select != "patch"),
                         vision_feature_layer=original.get("mm_vision_select_layer", -2),
                         vision_feature_select_strategy="default" if select == "patch" else "full")
    weights.check_state_dict(weights.build_on_meta(Llava, config).state_dict(), state, where="Llava")
    weights.save_safetensors(state, dst / "model.safetensors", overwrite=overwrite)
    (dst / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if (src / "tokenizer.json").is_file():
        tok = Tokenizer.from_pretrained(src)
        added = tok.add_special_tokens(["<image>", "<pad>"])
        if added != [vocab, vocab + 1]:
            raise WeightsError(f"{src / 'tokenizer.json'} gives <image>, <pad> the ids {added}, not {vocab}, "
                               f"{vocab + 1}: its vocabulary does not match the model's {vocab} rows")
        tok.save(dst, overwrite=True)
    return dst
