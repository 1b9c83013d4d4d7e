"""Back to Hugging Face: a pruned Llama-style model as a ``PreTrainedModel`` with a smaller config.

A pruned model from ``hfp_fx.prune`` / ``finalize`` (captured with ``torch.export``) computes its
RMSNorms over the kept hidden channels ``d'`` with the statistics of the original width ``d``:
``x * rsqrt(sum(x^2) / d + eps) * w``.  A standard RMSNorm over ``d'`` computes the same with
``eps' = eps * d / d'`` and ``w' = w * sqrt(d / d')``, so the pruned weights fit the model's own
class with ``hidden_size = d'``, ``rms_norm_eps = eps'``, the kept ``intermediate_size``,
``num_attention_heads`` and ``num_key_value_heads``, and ``head_dim`` written out (it does not
change).  One configuration needs one width per kind of layer: prune with ``uniform_blocks=True``.

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
import warnings
from typing import Dict

import torch

from hfp_fx.export_capture import is_hugging_face

__all__ = ["to_pretrained"]

#: RMSNorms over the hidden size (the residual stream) in Llama-style decoders
_STREAM_NORMS = re.compile(r"(^|\.)(input_layernorm|post_attention_layernorm|norm)\.weight$")


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
    if hidden % new_config.num_attention_heads:
        # transformers 5 validates a config when it is built or loaded, not when its attributes are
        # set: the model below builds and runs (head_dim is explicit), save_pretrained refuses it
        warnings.warn(f"the pruned hidden size {hidden} is not a multiple of the {new_config.num_attention_heads} "
                      f"kept attention heads: the {type(like).__name__} runs, but transformers' config validation "
                      "refuses it in save_pretrained / from_pretrained. To save it, keep a hidden size that is a "
                      "multiple of the heads (shrink with an explicit keep)", stacklevel=2)
    try:
        model = type(like)(new_config)
    except ValueError as exc:  # e.g. transformers' check that hidden_size is a multiple of the heads
        raise ValueError(f"{type(like).__name__}'s config refuses the pruned widths (hidden_size {hidden}, "
                         f"{new_config.num_attention_heads} heads): {exc}. Keep a hidden size that the config "
                         "accepts (e.g. a multiple of the kept heads: shrink with an explicit keep)") from exc
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
