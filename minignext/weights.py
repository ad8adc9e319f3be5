"""Finding, reading, checking and converting checkpoints.

Everything minignext loads comes through here:
    resolve()              hub repo id or local path -> local folder
    read_config()          config.json -> dict
    load_safetensors()     one file, a folder, or a sharded index -> {key: tensor}
    load_into()            strict, assign-style load into a model built on `meta`
    convert_pickle()       a .pt/.pth/.bin pickle -> safetensors, with weights_only=True
    merge_lora()           W + (alpha / r) * B @ A

Loading is strict: any missing, unexpected or mis-shaped key is an error that
names the key and both shapes. A model is built on the meta device and the
memory-mapped tensors are assigned into it, so a checkpoint is never held in
memory twice.
"""

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minignext.utils import atomic_write

WEIGHTS_DIR = Path(os.environ.get("MINIGNEXT_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))


class WeightsError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


# ---------------------------------------------------------------- locating

def resolve(path_or_repo_id, allow_patterns=None) -> Path:
    """A local folder for `path_or_repo_id`, downloading hub repos into weights/hub/.

    Honours HF_HUB_OFFLINE: offline, only what is already under weights/hub/ is used.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise WeightsError(f"{repo_id}: no such file or folder, and not a hub repo id (owner/name)")
    local = WEIGHTS_DIR / "hub" / repo_id.replace("/", "--")
    if local.is_dir() and any(local.iterdir()):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_dir=local, allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown repo, no network: all end the same way for the user
        raise WeightsError(
            f"{repo_id}: not found locally (looked in {local}) and could not be downloaded: "
            f"{type(e).__name__}: {e}. With internet access, run `minignext download` for the "
            f"preset that needs it, or pass a local folder.") from None


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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index}: not a valid shard index ({e})") from None
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise WeightsError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return shards
    raise WeightsError(f"{path}: found neither {single.name} nor {index.name}")


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
