"""Load a model from a command-line SPEC.

* ``torchvision:resnet50`` - any name in ``torchvision.models.list_models()`` (random weights);
* ``timm:convnext_tiny`` - a timm architecture (``pretrained=False``; needs ``timm``);
* ``path/to/file.py:factory`` or ``package.module:factory`` - a callable returning a module.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Tuple

import torch

__all__ = ["SpecError", "load_spec", "portable_spec"]


class SpecError(ValueError):
    pass


def load_spec(spec: str) -> Tuple[torch.nn.Module, Tuple[int, ...]]:
    """Return ``(model, default input shape)`` for ``spec``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise SpecError(f"bad model spec {spec!r}: use torchvision:NAME, timm:NAME or path/to/file.py:factory")
    if source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            close = [n for n in names if name.split("_")[0] in n][:5]
            raise SpecError(f"torchvision has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        model = torchvision.models.get_model(name, weights=None)
        size = 299 if name == "inception_v3" else 224
        return model.eval(), (1, 3, size, size)
    if source == "timm":
        try:
            import timm
        except ImportError as exc:
            raise SpecError("timm is not installed: pip install timm") from exc
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as exc:
            raise SpecError(f"timm has no model {name!r}: {exc}") from exc
        return model.eval(), (1,) + tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if source.endswith(".py"):
        if not os.path.exists(source):
            raise SpecError(f"no such file: {source}")
        mod_spec = importlib.util.spec_from_file_location("_hfp_user_model", source)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise SpecError(f"cannot import {source!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SpecError(f"{source} has no callable {name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), tuple(getattr(model, "example_input_shape", (1, 3, 224, 224)))


def portable_spec(spec: str) -> str:
    """``spec`` with a ``path/to/file.py`` source made absolute, so it loads from any directory."""
    source, sep, name = spec.rpartition(":")
    if sep and source.endswith(".py"):
        return f"{os.path.abspath(source)}:{name}"
    return spec
