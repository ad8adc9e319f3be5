"""Reference implementations for parity tests (test-only).

`imagebind_model()` imports the official ImageBind model code from the `imagebind-unofficial`
package, which is installed with --no-deps: its package `__init__` and `data.py` need
torchvision, and its model code imports `DropPath` and `trunc_normal_` from timm. So we
register a bare `imagebind` package that points at the installed folder (skipping `__init__`)
and a tiny stand-in for `timm.layers`, then import only `imagebind.models.imagebind_model`.

`open_flamingo_module()` imports the official OpenFlamingo blocks the same way, around a package
`__init__` that needs open_clip.
"""

import importlib
import importlib.util
import sys
import types

import pytest
import torch


class DropPath(torch.nn.Module):
    """Stochastic depth: drop the whole residual branch per sample in training."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


@torch.no_grad()
def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _stub_timm():
    if "timm.layers" in sys.modules:
        return
    try:
        importlib.import_module("timm.layers")
        return
    except ImportError:
        pass
    timm = types.ModuleType("timm")
    timm.__path__ = []
    layers = types.ModuleType("timm.layers")
    layers.DropPath, layers.trunc_normal_ = DropPath, trunc_normal_
    models = types.ModuleType("timm.models")
    models.__path__ = []
    models.layers = layers
    timm.layers, timm.models = layers, models
    sys.modules.update({"timm": timm, "timm.layers": layers, "timm.models": models,
                        "timm.models.layers": layers})


def imagebind_model():
    """The official `imagebind.models.imagebind_model` module (skips the test if not installed)."""
    if "imagebind.models.imagebind_model" in sys.modules:
        return sys.modules["imagebind.models.imagebind_model"]
    spec = importlib.util.find_spec("imagebind")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("imagebind-unofficial is not installed (pip install --no-deps imagebind-unofficial)")
    _stub_timm()
    if "imagebind" not in sys.modules:
        package = types.ModuleType("imagebind")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["imagebind"] = package
    return importlib.import_module("imagebind.models.imagebind_model")


def open_flamingo_module(name="helpers"):
    """`open_flamingo.src.<name>` from the open-flamingo package (installed with --no-deps plus
    einops-exts). Its package `__init__` imports the factory, which needs open_clip; bare packages
    pointing at the installed folders skip it. helpers and flamingo_lm need only torch and einops."""
    full = f"open_flamingo.src.{name}"
    if full in sys.modules:
        return sys.modules[full]
    pytest.importorskip("einops_exts", reason="einops-exts is not installed (pip install --no-deps einops-exts)")
    if "open_flamingo" in sys.modules:          # the bare package from an earlier call
        root = sys.modules["open_flamingo"].__path__[0]
    else:
        spec = importlib.util.find_spec("open_flamingo")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("open-flamingo is not installed (pip install --no-deps open-flamingo einops-exts)")
        root = list(spec.submodule_search_locations)[0]
    for package, path in (("open_flamingo", root), ("open_flamingo.src", f"{root}/src")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [path]
            sys.modules[package] = module
    return importlib.import_module(full)


__all__ = ["imagebind_model", "open_flamingo_module", "DropPath", "trunc_normal_"]
