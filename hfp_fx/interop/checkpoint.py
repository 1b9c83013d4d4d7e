"""Prune a Hugging Face checkpoint on disk into a smaller checkpoint, one tensor in memory at a time.

An 8B model in bf16 (16 GB) plus its pruned copy does not fit a 24 GB machine, yet planning
needs no weights: the graph, the cost model and the projection run on the meta device.  So
:func:`prune_checkpoint`

1. builds the model from its ``config.json`` on the meta device and captures it (``torch.export``);
2. ranks channels by weight magnitude read tensor by tensor from the safetensors files
   (:class:`~hfp_fx.interop.safetensors_stream.SafetensorsCheckpoint`; a mapping that reads on
   lookup), through the same :func:`hfp_fx.plan.saliency.magnitude_saliency` as in memory;
3. plans with :func:`hfp_fx.prune` (the same exact projection, ``uniform_blocks`` so one config
   holds the result);
4. writes each tensor sliced to the kept channels and rescaled as :func:`hfp_fx.to_pretrained`
   rescales it (the norms of a pruned residual stream), shard by shard, with the smaller config.

Peak memory is the plan plus the largest tensor (twice, read and sliced), not the model.  The
result loads with ``from_pretrained`` and equals ``to_pretrained(prune(model, ...))`` of the same
checkpoint loaded in memory, tensor for tensor (``tests/test_checkpoint.py``).  From the command
line: ``hfp-fx prune hf:PATH --params 50% --uniform-blocks --out DIR``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from hfp_fx.analysis.graph import DependencyGraph
from hfp_fx.interop.hf import check_layout, pretrained_config
from hfp_fx.passes.shrink import kept_indices
from hfp_fx.interop.safetensors_stream import INDEX_NAME, SafetensorsCheckpoint, write_safetensors
from hfp_fx.plan.projection import MaxPrune
from hfp_fx.plan.report import PruneReport
from hfp_fx.plan.saliency import IMPORTANCE_KINDS, magnitude_saliency
from hfp_fx.train.hfp import prune

__all__ = ["prune_checkpoint", "meta_model"]

PLAN_NAME = "hfp_prune_plan.json"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("prune_checkpoint reads Hugging Face checkpoints: pip install transformers") from None
    return transformers


def meta_model(directory) -> torch.nn.Module:
    """The model a Hugging Face checkpoint directory describes, built from its config on the meta device
    (its class from ``config.architectures`` where transformers has it, else ``AutoModelForCausalLM``)."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = next((getattr(transformers, a) for a in getattr(config, "architectures", None) or ()
                if hasattr(transformers, a)), None)
    with torch.device("meta"):
        model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


class _CheckpointTensors(Mapping):
    """The model's tensors by any of their names, read from the checkpoint on lookup.  A tied
    weight has several names (the captured graph may keep ``lm_head.weight`` where the checkpoint
    stores ``model.embed_tokens.weight``); the dense model's aliases connect them."""

    def __init__(self, model: torch.nn.Module, checkpoint: SafetensorsCheckpoint) -> None:
        self.checkpoint = checkpoint
        by_tensor: Dict[int, list] = {}
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        for name, t in named:
            by_tensor.setdefault(id(t), []).append(name)
        self.aliases = {name: by_tensor[id(t)] for name, t in named}

    def key_of(self, name: str) -> Optional[str]:
        return next((a for a in self.aliases.get(name, [name]) if a in self.checkpoint.entries), None)

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.key_of(name)
        if key is None:
            raise KeyError(name)
        return self.checkpoint.read(key)

    def __iter__(self):
        return iter(self.aliases)

    def __len__(self) -> int:
        return len(self.aliases)


def prune_checkpoint(src, dst, target: Any, *, importance: str = "l1", uniform_blocks: bool = True,
                     example_inputs: Any = None, max_prune: MaxPrune = None, round_to: int = 1,
                     min_channels: int = 1, exclude: Sequence[str] = ()) -> PruneReport:
    """Prune the Hugging Face safetensors checkpoint in directory ``src`` to ``target`` and write the
    smaller checkpoint (shards, index, config, the other files copied) to ``dst``.

    ``target``, ``max_prune``, ``round_to``, ``min_channels``, ``exclude``: as :func:`hfp_fx.prune`;
    ``importance``: ``"l1"``, ``"l2"`` (weight magnitude, read tensor by tensor) or ``"uniform"``.
    ``uniform_blocks`` (default True) gives every decoder layer the same widths, which a config
    needs.  ``example_inputs``: the token ids the graph is captured with (default: 16 random ids).
    Returns the plan's :class:`~hfp_fx.plan.report.PruneReport`, also written to
    ``dst/hfp_prune_plan.json``.

    Example (needs ``transformers``)::

        report = hfp_fx.prune_checkpoint("llama-8b/", "llama-4b/", {"params": 0.5})
        small = transformers.AutoModelForCausalLM.from_pretrained("llama-4b/")
    """
    if importance not in IMPORTANCE_KINDS:
        raise ValueError(f"prune_checkpoint ranks channels by {IMPORTANCE_KINDS} (read from the checkpoint); "
                         f"got {importance!r}. Data-aware importance needs the model in memory: load it and use "
                         "hfp_fx.prune(..., importance=..., calibration=...) with hfp_fx.to_pretrained")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError("prune_checkpoint writes a new checkpoint: give a dst directory other than src")
    checkpoint = SafetensorsCheckpoint(src)
    like = meta_model(src)
    layout = check_layout(like)
    config = like.config
    if example_inputs is None:
        example_inputs = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    graphs, tensors = [], _CheckpointTensors(like, checkpoint)

    def scores(dg: DependencyGraph):
        graphs.append(dg)
        return magnitude_saliency(dg, importance, tensors=tensors)

    small = prune(like, example_inputs, target, importance=scores, uniform_blocks=uniform_blocks, capture="export",
                  max_prune=max_prune, round_to=round_to, min_channels=min_channels, exclude=exclude)
    dg, report = graphs[-1], small.meta["hfp"]
    new_config, rescale, smaller = pretrained_config(like, config, layout, small.state_dict(), like.state_dict())
    new_shapes = {k: tuple(v.shape) for k, v in smaller.state_dict().items()}
    alive = dg.alive(report.keep)
    names_of = {}  # checkpoint key -> the names of that tensor
    for name, aliases in tensors.aliases.items():
        key = tensors.key_of(name)
        if key is not None:
            names_of.setdefault(key, aliases)
    # per checkpoint key, the indices each sliced dim keeps (the dims of whichever of its names the graph binds)
    cuts = {key: kept_indices(next((d for d in map(dg.param_dims, names_of.get(key, [key])) if d), {}), alive)
            for key in checkpoint.entries}

    def pruned(key: str) -> torch.Tensor:
        value = checkpoint.read(key)
        for dim, idx in cuts[key].items():
            value = value.index_select(dim, idx)
        return rescale(key, value)

    def pruned_shape(key: str):
        shape = list(checkpoint.entries[key].shape)
        for dim, idx in cuts[key].items():
            shape[dim] = idx.numel()
        if key in new_shapes and tuple(shape) != new_shapes[key]:
            raise ValueError(f"{key}: the plan gives shape {tuple(shape)}, the smaller {type(like).__name__} config "
                             f"expects {new_shapes[key]}")
        return tuple(shape)

    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard in checkpoint.files:
        keys = [k for k, e in checkpoint.entries.items() if e.file == shard]
        shapes = {k: (pruned_shape(k), checkpoint.entries[k].dtype) for k in keys}
        total += write_safetensors(dst / shard.name, shapes, pruned)
        weight_map.update({k: shard.name for k in keys})
    if (src / INDEX_NAME).exists():
        (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    for path in src.iterdir():  # tokenizer, generation config, ...: unchanged by pruning
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_NAME, "config.json", PLAN_NAME):
            shutil.copy2(path, dst / path.name)
    new_config.save_pretrained(dst)
    plan = {"target": target if isinstance(target, (dict, str, float, int)) else str(target),
            "dense": dataclasses.asdict(report.dense), "achieved": dataclasses.asdict(report.achieved),
            "keep": report.keep, "groups": {gid: [g.dense, g.kept] for gid, g in report.groups.items()}}
    (dst / PLAN_NAME).write_text(json.dumps(plan))
    return report
