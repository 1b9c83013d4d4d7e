"""Back to Hugging Face: a pruned Llama-style model as a ``PreTrainedModel`` with a smaller config.

A pruned model from ``hfp_fx.prune`` / ``finalize`` (captured with ``torch.export``) computes its
RMSNorms over the kept hidden channels ``d'`` with the statistics of the original width ``d``:
``x * rsqrt(sum(x^2) / d + eps) * w``.  A standard RMSNorm over ``d'`` computes the same with
``eps' = eps * d / d'`` and ``w' = w * sqrt(d / d')``, so the pruned weights fit the model's own
class with ``hidden_size = d'``, ``rms_norm_eps = eps'``, the kept ``intermediate_size``,
``num_attention_heads`` and ``num_key_value_heads``, and ``head_dim`` written out (it does not
change).  One configuration needs one width per kind of layer: prune with ``uniform_blocks=True``.

transformers' configs also want ``hidden_size`` to be a multiple of ``num_attention_heads``.
:func:`config_fit` turns that into a :data:`~hfp_fx.projection.Fit` for the budget projection:
``prune(..., uniform_blocks=True)`` and ``prepare(..., uniform_blocks=True)`` -> ``finalize`` pass
it for such a model, so the pruned hidden size is always one the config accepts.

Example (needs ``transformers``)::

    >>> import torch, transformers, hfp_fx
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=6, num_key_value_heads=2)
    >>> model, ids = transformers.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (1, 8))
    >>> dg = hfp_fx.dependency_graph(model, ids, capture="export")
    >>> keep = {g.id: range(g.channels // 2) for g in dg.prunable_groups}  # the same half everywhere
    >>> small = hfp_fx.shrink(dg, keep=keep)
    >>> hf = hfp_fx.to_pretrained(small, like=model)
    >>> torch.allclose(hf(ids).logits, small(ids), atol=1e-4)
    True
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from hfp_fx.export_capture import is_hugging_face

__all__ = ["to_pretrained", "config_fit", "ConfigFit"]

#: RMSNorms over the hidden size (the residual stream) in Llama-style decoders
_STREAM_NORMS = re.compile(r"(^|\.)(input_layernorm|post_attention_layernorm|norm)\.weight$")


@dataclass(frozen=True)
class ConfigFit:
    """The widths a Llama-style config can express: ``hidden_size`` a multiple of the kept query heads.

    A :data:`~hfp_fx.projection.Fit`: called with the planned count of every prunable group, it
    lowers the residual stream group ``hidden`` to the largest multiple of ``kv x queries_per_kv``
    (``kv``: the kept key/value heads, equal in every layer), and only if no such width is
    allowed (fewer hidden channels than heads, ``min_channels``, ``round_to``) keeps fewer
    key/value groups.  Groups not in ``kept`` are fixed at their dense size.  Plain data, so a
    prepared model can carry it to ``finalize``.

        >>> fit = ConfigFit(hidden="g0", hidden_size=48, kv_groups=("g1", "g3"), kv_heads=2, queries_per_kv=3)
        >>> fit({"g0": 25, "g1": 2, "g3": 2, "g2": 40}, lambda gid, n: n >= 1)
        {'g1': 2, 'g3': 2, 'g0': 24}
        >>> fit({"g0": 5, "g1": 2, "g3": 2}, lambda gid, n: n >= 1)  # fewer channels than 6 heads
        {'g1': 1, 'g3': 1, 'g0': 3}
    """

    hidden: Optional[str]  #: group id of the residual stream (``None``: none found)
    hidden_size: int  #: its dense width
    kv_groups: Tuple[str, ...]  #: per layer, the group id of its key/value heads
    kv_heads: int  #: their dense count
    queries_per_kv: int  #: query heads per key/value head

    def raise_floors(self, min_kept: Mapping[str, int]) -> Dict[str, int]:
        """``min_kept`` with the stream's floor raised to a multiple of the dense query heads.

        The fit only lowers the hidden size to a multiple of the kept heads; a floor just above
        such a multiple (``max_prune``) would leave it no width but one with fewer key/value heads.

            >>> ConfigFit("g0", 256, ("g1",), 2, 2).raise_floors({"g0": 154, "g2": 10})
            {'g0': 156, 'g2': 10}
        """
        out = dict(min_kept)
        if self.hidden in out:
            heads = self.kv_heads * self.queries_per_kv
            out[self.hidden] = min(self.hidden_size, -(-out[self.hidden] // heads) * heads)
        return out

    def __call__(self, kept: Dict[str, int], allowed: Callable[[str, int], bool]) -> Mapping[str, int]:
        hidden = kept.get(self.hidden, self.hidden_size)
        counts = {kept.get(g, self.kv_heads) for g in self.kv_groups} or {self.kv_heads}
        if len(counts) != 1:
            return {}  # layers with different heads: no config fits (to_pretrained says why)
        kv = counts.pop()
        for k in range(kv, 0, -1):
            if k < kv and not all(g in kept and allowed(g, k) for g in self.kv_groups):
                continue
            heads = k * self.queries_per_kv
            for n in range(hidden - hidden % heads, 0, -heads):
                if n == hidden or self.hidden in kept and allowed(self.hidden, n):
                    out = {g: k for g in self.kv_groups if g in kept}
                    if self.hidden in kept:
                        out[self.hidden] = n
                    return out
        return {}


def config_fit(model: torch.nn.Module, dg) -> Optional[ConfigFit]:
    """The :class:`ConfigFit` of a Llama-style Hugging Face ``model`` (the decoders
    :func:`to_pretrained` supports) analysed as ``dg``; ``None`` for any other model.

    Recognised by class and config attributes (transformers is never imported): a
    ``PreTrainedModel`` whose config has ``rms_norm_eps``, and groups holding ``model.norm.weight``
    (the residual stream) and every layer's ``self_attn.k_proj.weight`` rows (its key/value heads).
    """
    config = getattr(model, "config", None)
    if not is_hugging_face(model) or getattr(config, "rms_norm_eps", None) is None:
        return None
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    hidden_size = getattr(config, "hidden_size", None)
    if not (heads and layers and hidden_size):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    def owner(param: str, dim: int):
        return next((g for g in dg.groups if any(m.target == param and m.dim == dim for m in g.members)), None)

    stream = owner("model.norm.weight", 0)
    kv = [owner(f"model.layers.{i}.self_attn.k_proj.weight", 0) for i in range(layers)]
    if stream is None or stream.channels != hidden_size or any(g is None or g.channels != kv_heads for g in kv):
        return None
    return ConfigFit(stream.id, hidden_size, tuple(g.id for g in kv), kv_heads, heads // kv_heads)


def to_pretrained(small: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    """A model of ``like``'s class and configuration, resized to ``small``'s widths, holding its weights.

    ``like`` is the dense model that was pruned; ``small`` the pruned GraphModule.  Supported:
    decoders whose config has ``rms_norm_eps`` and Llama's layer names (Llama, Qwen2, Mistral, ...).
    LayerNorm models (GPT-2, BERT) raise: a pruned LayerNorm keeps the original width's mean and
    variance, which no LayerNorm of the smaller width computes.  A hidden size that is not a
    multiple of the kept heads warns: the model runs, but transformers refuses to save its config.
    """
    if not is_hugging_face(like):
        raise TypeError(f"to_pretrained expects the dense transformers model as `like`, got {type(like).__name__}")
    config = like.config
    if getattr(config, "rms_norm_eps", None) is None:
        raise ValueError(f"{type(like).__name__} normalises with LayerNorm: its pruned norms keep the statistics of "
                         f"the original hidden size {config.hidden_size}, which its config cannot express")
    if str(getattr(config, "model_type", "")).startswith("gemma"):
        raise ValueError(f"{type(like).__name__} scales its RMSNorm by (1 + weight); not supported yet")
    state = small.state_dict()
    dense_state = like.state_dict()
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def width(key: str, dim: int) -> int:
        sizes = {tuple(state[key.format(i)].shape)[dim] for i in range(layers)}
        if len(sizes) != 1:
            raise ValueError(f"the layers of the pruned model have different widths for {key.format('#')} "
                             f"({sorted(sizes)}); prune with uniform_blocks=True to fit one configuration")
        return sizes.pop()

    prefix = "model.layers.{}."
    hidden = state["model.norm.weight"].shape[0]
    new_config = copy.deepcopy(config)
    new_config.hidden_size = hidden
    new_config.intermediate_size = width(prefix + "mlp.gate_proj.weight", 0)
    new_config.num_attention_heads = width(prefix + "self_attn.q_proj.weight", 0) // head_dim
    new_config.num_key_value_heads = width(prefix + "self_attn.k_proj.weight", 0) // head_dim
    new_config.head_dim = head_dim
    new_config.rms_norm_eps = config.rms_norm_eps * config.hidden_size / hidden
    factor = math.sqrt(config.hidden_size / hidden)
    try:  # transformers 5 validates a config when it is built or saved, not when a field is set
        validate = getattr(new_config, "validate", None)
        if callable(validate):
            validate()
        model = type(like)(new_config)
    except Exception as exc:  # e.g. the check that hidden_size is a multiple of the heads
        raise ValueError(f"{type(like).__name__}'s config refuses the pruned widths (hidden_size {hidden}, "
                         f"{new_config.num_attention_heads} heads): {exc}. Prune with uniform_blocks=True "
                         "(prune, or prepare -> finalize), which keeps hidden_size a multiple of the kept "
                         "heads (hfp_fx.hf.config_fit), or shrink with a keep that does") from exc
    weights: Dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        value = state.get(key)
        if value is None:  # a tied tensor the pruned graph holds under its other name
            target = dense_state.get(key)
            alias = next((k for k, v in dense_state.items() if k in state and target is not None
                          and v.data_ptr() == target.data_ptr()), None)
            if alias is None:
                raise ValueError(f"the pruned model has no tensor for {key}")
            value = state[alias]
        weights[key] = value * factor if _STREAM_NORMS.search(key) else value
    model.load_state_dict(weights, strict=True)
    return model.train(small.training)
