"""Finding, reading, checking and converting checkpoints.

Everything minignext loads comes through here:
    resolve()              hub repo id or local path -> local folder (only the files loaders read)
    read_config()          config.json -> dict
    load_checkpoint()      a model folder's weights, its pickles converted once; a remap applied
    load_safetensors()     one file, a folder, or a sharded index -> {key: tensor}
    load_into()            strict, assign-style load into a model built on `meta`
    convert_pickle()       a .pt/.pth/.bin pickle -> safetensors, with weights_only=True
    merge_lora()           W + (alpha / r) * B @ A

Loading is strict: any missing, unexpected or mis-shaped key is an error that
names the key and both shapes. A model is built on the meta device and the
memory-mapped tensors are assigned into it, so a checkpoint is never held in
memory twice.
"""

import fnmatch
import json
import logging
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minignext.utils import atomic_write

log = logging.getLogger("minignext")

WEIGHTS_DIR = Path(os.environ.get("MINIGNEXT_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))


class WeightsError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


# ---------------------------------------------------------------- locating

def resolve(path_or_repo_id, folders=()) -> Path:
    """A local folder for `path_or_repo_id`, downloading hub repos into weights/hub/.

    Only the files a loader reads are fetched (`select_files`): those at the root, and in the
    sub-folders named by `folders` (a pipeline's parts; None for all). Honours HF_HUB_OFFLINE:
    offline, only what is already under weights/hub/ is used.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise WeightsError(f"{repo_id}: no such file or folder, and not a hub repo id (owner/name)")
    local = WEIGHTS_DIR / "hub" / repo_id.replace("/", "--")
    if local.is_dir() and any(local.iterdir()) and all((local / f).is_dir() for f in folders or ()):
        return local
    try:
        from huggingface_hub import snapshot_download

        files = select_files(hub_files(repo_id), folders)
        return Path(snapshot_download(repo_id, local_dir=local, allow_patterns=files))
    except Exception as e:  # offline, unknown repo, no network: all end the same way for the user
        raise WeightsError(
            f"{repo_id}: not found locally (looked in {local}) and could not be downloaded: "
            f"{type(e).__name__}: {e}. With internet access, run `minignext download` for the "
            f"preset that needs it, or pass a local folder.") from None


def hub_files(repo_id) -> dict:
    """{file name: size in bytes, or None} of a hub repo (needs the network)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, files_metadata=True)
    return {s.rfilename: s.size for s in info.siblings}


# Read by loaders besides the weights: configs, shard indexes, tokenizers.
CONFIG_PATTERNS = ("*.json", "merges.txt", "vocab.txt", "*.model")
WEIGHT_SUFFIXES = {"safetensors": (".safetensors",), "pickle": (".bin", ".pt", ".pth")}
WEIGHT_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model")   # transformers', diffusers' names


def is_weights_file(name, kind) -> bool:
    """`{stem}.ext` or a shard `{stem}-0000i-of-0000n.ext` of a known stem; not a variant such as
    `.fp16.safetensors`, nor training_args.bin."""
    stem, _, ext = name.rpartition(".")
    return f".{ext}" in WEIGHT_SUFFIXES[kind] and stem.split("-")[0] in WEIGHT_STEMS and "." not in stem


def select_files(files, folders=None) -> list:
    """The files of a hub repo that minignext's loaders read: the configs and tokenizer files, and in
    each folder its weights as safetensors or, only where the folder has none, as a pickle.

    Left out: precision and EMA variants (`*.fp16.safetensors`, `*.non_ema.bin`), the single-file
    checkpoints at the root of a pipeline repo (SD-1.5's multi-gigabyte `.ckpt` and `.safetensors`),
    and sub-folders not in `folders` (None: every sub-folder)."""
    by_folder = {}
    for name in files:
        folder, _, base = name.rpartition("/")
        by_folder.setdefault(folder, []).append(base)
    pipeline = "model_index.json" in by_folder.get("", [])
    chosen = []
    for folder, names in by_folder.items():
        if folder and folders is not None and folder not in folders:
            continue
        prefix = f"{folder}/" if folder else ""
        chosen += [prefix + n for n in names if any(fnmatch.fnmatch(n, p) for p in CONFIG_PATTERNS)]
        if folder == "" and pipeline:
            continue
        weights = [n for n in names if is_weights_file(n, "safetensors")] or \
            [n for n in names if is_weights_file(n, "pickle")]
        chosen += [prefix + n for n in weights]
    return sorted(chosen)


def read_config(folder, name="config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a model folder needs its {name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- reading

def safetensors_files(path, stem="model") -> list[Path]:
    """The safetensors files of a checkpoint: a file, `{stem}.safetensors` in a folder,
    or the shards listed by `{stem}.safetensors.index.json`."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or folder")
    single = path / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = [path / name for name in dict.fromkeys(_weight_map(index).values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise WeightsError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return shards
    raise WeightsError(f"{path}: found neither {single.name} nor {index.name}")


# transformers saved `model` weights as pytorch_model.bin before it wrote model.safetensors
PICKLE_STEMS = {"model": ("model", "pytorch_model")}


def pickle_files(folder, stem="model") -> list:
    """A folder's pickle checkpoint as a list of files (one, or the shards of an index); [] if none."""
    folder = Path(folder)
    for name in PICKLE_STEMS.get(stem, (stem,)):
        for ext in WEIGHT_SUFFIXES["pickle"]:
            if (folder / f"{name}{ext}").is_file():
                return [folder / f"{name}{ext}"]
            index = folder / f"{name}{ext}.index.json"
            if index.is_file():
                return [folder / shard for shard in dict.fromkeys(_weight_map(index).values())]
    return []


def _weight_map(index) -> dict:
    try:
        return json.loads(Path(index).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WeightsError(f"{index}: not a valid shard index ({e})") from None


def convert_folder_pickles(folder, stem="model") -> list:
    """Convert a folder's pickle checkpoint, once, into `{stem}.safetensors` beside it (shards keep
    their numbering, with a new `{stem}.safetensors.index.json`). Returns the files written."""
    folder, pickles = Path(folder), pickle_files(folder, stem)
    if not pickles:
        raise WeightsError(f"{folder}: no {stem}.safetensors and no pickle checkpoint to convert")
    if len(pickles) == 1:
        return [convert_pickle(pickles[0], folder / f"{stem}.safetensors", overwrite=True)]
    out, renamed = [], {}
    for shard in pickles:
        name = stem + shard.name[shard.name.index("-"):].rsplit(".", 1)[0] + ".safetensors"   # model-00001-of-00002
        out.append(convert_pickle(shard, folder / name, overwrite=True))
        renamed[shard.name] = name
    index = next(folder.glob(f"*{pickles[0].suffix}.index.json"))
    weight_map = {k: renamed[v] for k, v in _weight_map(index).items()}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                      indent=2))
    return out


def load_checkpoint(path, stem="model", dtype=None, device="cpu") -> dict:
    """The tensors of a model folder (or file) as published: safetensors, or a pickle
    (.bin / .pt, read with weights_only=True) converted once to safetensors beside it."""
    path = Path(path)
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES["pickle"]:
        target = path.with_suffix(".safetensors")
        if not target.is_file():
            convert_pickle(path, target)
        path = target
    elif path.is_dir() and not has_safetensors(path, stem) and pickle_files(path, stem):
        log.info("%s: converting the pickle checkpoint to safetensors, once", path)
        convert_folder_pickles(path, stem)
    return load_safetensors(path, stem, dtype, device)


def has_safetensors(folder, stem="model") -> bool:
    folder = Path(folder)
    return (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file()


def remap_state_dict(tensors: dict, remap) -> dict:
    """Apply a module's pure remap `(key, tensor) -> [(key, tensor), ...]` to every entry. An empty
    list drops the key; each module's table names the legacy buffers it drops, and each drop is logged."""
    out, source = {}, {}
    for key, t in tensors.items():
        pairs = remap(key, t)
        if not pairs:
            log.info("%s: a legacy buffer the model computes itself; not loaded", key)
        for k, v in pairs:
            if k in out:
                raise WeightsError(f"checkpoint keys {source[k]} and {key} both map to {k}")
            out[k], source[k] = v, key
    return out


def load_safetensors(path, stem="model", dtype=None, device="cpu") -> dict:
    """Read every tensor of a checkpoint (memory-mapped; converted to `dtype` if given)."""
    tensors = {}
    for file in safetensors_files(path, stem):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{file}: cannot read it as safetensors ({e}). The file is truncated "
                               f"or corrupt; delete it and fetch or convert it again.") from None
    return tensors


def check_state_dict(expected: dict, given: dict, where="model") -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key."""
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    for k in missing:
        problems.append(f"missing key {k} (model wants shape {tuple(expected[k].shape)})")
    for k in unexpected:
        problems.append(f"unexpected key {k} (checkpoint has shape {tuple(given[k].shape)})")
    for k in expected.keys() & given.keys():
        if tuple(expected[k].shape) != tuple(given[k].shape):
            problems.append(f"wrong shape for {k}: model wants {tuple(expected[k].shape)}, "
                            f"checkpoint has {tuple(given[k].shape)}")
    if problems:
        shown = "\n  ".join(sorted(problems)[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WeightsError(f"checkpoint does not fit {where}:\n  {shown}{more}")


def load_into(model: torch.nn.Module, state_dict: dict, dtype=None, device=None):
    """Strictly assign `state_dict` into `model` (typically built on meta), then
    let modules that own non-persistent buffers rebuild them via `init_buffers()`."""
    check_state_dict(model.state_dict(), state_dict, where=type(model).__name__)
    if dtype is not None or device is not None:
        state_dict = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device))
                      for k, v in state_dict.items()}
    state_dict = {k: _aligned(v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    device = device or next(iter(state_dict.values())).device
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers(device)
    return model


def _aligned(t):
    """Memory-mapped tensors sit at arbitrary 8-byte offsets in the file, and oneDNN and BLAS
    kernels run a few percent slower on CPU weights that are not 64-byte aligned: copy those."""
    return t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t


def load_model(cls, config, tensors: dict, remap=None, dtype=None, device=None):
    """`cls(config)` built on meta, filled strictly with `tensors` (after the module's `remap`)."""
    model = build_on_meta(cls, config)
    if remap is not None:
        tensors = remap_state_dict(tensors, remap)
    return load_into(model, tensors, dtype=dtype, device=device).eval()


def build_on_meta(cls, config):
    """`cls(config)` with storage-less meta tensors, to be filled by load_into()."""
    with torch.device("meta"), _skip_init():
        return cls(config)


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextmanager
def _skip_init():
    """Make torch.nn.init a no-op: meta weights are about to be replaced anyway, and the
    first random init on meta imports torch's compiler stack, which takes seconds."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


# ---------------------------------------------------------------- writing and converting

def save_safetensors(state_dict: dict, path, overwrite=False, metadata=None) -> Path:
    """Save tensors atomically; shared or non-contiguous storage is copied first. Never overwrites
    by accident, and a failed save leaves no partial file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the name of the .safetensors file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, out = set(), {}
    for k, t in state_dict.items():
        t = t.detach().cpu()
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        if storage in seen or not t.is_contiguous():
            t = t.clone().contiguous()       # safetensors refuses tensors that share memory
        elif storage is not None:
            seen.add(storage)
        out[k] = t
    with atomic_write(path, overwrite) as tmp:
        save_file(out, str(tmp), metadata=metadata)
    return path


def check_finite(tensors: dict, where: str):
    """Raise if a floating-point tensor holds NaN or infinity (a corrupt or diverged checkpoint)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise WeightsError(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values, e.g. {', '.join(bad[:3])}; "
                           f"the checkpoint is corrupt or its training diverged")


def load_pickle(path) -> dict:
    """Open a pickle checkpoint safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:      # files from before torch 1.6 (not zip archives) cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise WeightsError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    for wrapper in ("state_dict", "model", "module", "model_state_dict"):   # the last: training checkpoints
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{path}: expected a flat dict of tensors")
    return obj


def convert_pickle(src, dst, rename=None, dtype=None, overwrite=False) -> Path:
    """Pickle -> safetensors. `rename(key, tensor)` may return [(key, tensor), ...] to remap keys."""
    state = load_pickle(src)
    out = {}
    for k, t in state.items():
        pairs = rename(k, t) if rename else [(k, t)]
        for nk, nt in pairs:
            out[nk] = nt.to(dtype) if dtype is not None and nt.is_floating_point() else nt
    return save_safetensors(out, dst, overwrite=overwrite)


def merge_lora(weight, lora_a, lora_b, alpha, r=None):
    """W' = W + (alpha / r) * B @ A  (Hu et al. 2021, eq. 3). A is (r, in), B is (out, r)."""
    r = r or lora_a.shape[0]
    if lora_a.shape[0] != r or lora_b.shape[1] != r or lora_b.shape[0] != weight.shape[0] \
            or lora_a.shape[1] != weight.shape[1]:
        raise WeightsError(f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
                           f"do not fit weight {tuple(weight.shape)} at rank {r}")
    delta = (lora_b.float() @ lora_a.float()) * (alpha / r)
    return (weight.float() + delta).to(weight.dtype)
