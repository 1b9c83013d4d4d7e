"""What a Hugging Face decoder's configuration can hold: one :class:`DecoderLayout` per family
(:data:`LAYOUTS`: where its norms, heads and MLP live and which config fields hold their widths)
and the constraints they put on a plan (:func:`config_fit`: one width per kind of layer, whole
query groups, aligned expert widths), which ``prune(..., uniform_blocks=True)`` and ``prepare``
honour so that :func:`hfp_fx.to_pretrained` can write the result as the model's own class.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from hfp_fx.capture.export_capture import is_hugging_face

__all__ = ["config_fit", "ConfigFit", "DecoderLayout", "LAYOUTS", "layout_of"]


@dataclass(frozen=True)
class DecoderLayout:
    """Where a decoder family keeps the tensors whose widths its config records.

    Parameter names are relative to ``layer`` (``"model.layers.{}."``) except ``final_norm``;
    the experts of a mixture-of-experts layer are one 3-d parameter each for their fused
    gate/up and down projections, with one width for all, and whole experts go with the rows of
    the ``router`` (top-k unchanged).
    ``attention``: the parameter whose ``attention_dim`` holds every kept head's rows (a separate
    ``q_proj`` or a fused q/k/v projection) and ``kv``: the key projection's (``None`` when fused:
    the kept key/value heads are then computed from the fused rows).
    """

    norm: str  #: "rms" (``x * w``), "rms_1p" (Gemma's ``x * (1 + w)``) or "layer" (LayerNorm)
    final_norm: str  #: the norm over the residual stream at the end, e.g. ``"model.norm.weight"``
    layer: str = "model.layers.{}."
    attention: Tuple[str, int] = ("self_attn.q_proj.weight", 0)
    kv: Optional[Tuple[str, int]] = ("self_attn.k_proj.weight", 0)
    #: per MLP width the config holds: (parameter, dim, parts (a fused gate/up: 2), config field);
    #: mixture-of-experts models have the experts' width and a shared expert's
    mlps: Tuple[Tuple[str, int, int, str], ...] = (("mlp.gate_proj.weight", 0, 1, "intermediate_size"),)
    head_dim_in_config: bool = True  #: the config sets ``head_dim`` (else hidden_size / heads: heads stay whole)
    fused_qkv: bool = False  #: ``attention`` holds q, k and v rows (Phi-3)
    #: embeddings times sqrt(hidden_size) taken from the config (Gemma): the smaller model runs
    #: the whole residual stream at ``sqrt(d' / d)`` of the pruned graph's scale (see ``_weights``)
    embed_scale: bool = False
    #: norms that read the residual stream (rescaled with it), matched on the parameter name's end
    stream_norms: Tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")
    #: norms of a sublayer's output before it is added to the stream (Gemma2/3's post-norms)
    post_norms: Tuple[str, ...] = ()
    #: the projections that write into the residual stream (weights and biases)
    writers: Tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    #: the widths of the stream and the MLPs are multiples of this (experts: ``torch._grouped_mm``)
    align: int = 1
    #: a mixture-of-experts router: (its weight, one row per expert; the config field of the count)
    router: Optional[Tuple[str, str]] = None
    #: RMSNorms of the queries / keys: (norm weight, the projection it normalises, whether it
    #: spans all heads' rows as OLMo2's does, not one head's as Qwen3's and Gemma3's)
    qk_norms: Tuple[Tuple[str, str, bool], ...] = ()


_LLAMA = DecoderLayout("rms", "model.norm.weight")
_PER_HEAD_QK = (("self_attn.q_norm.weight", "self_attn.q_proj", False), ("self_attn.k_norm.weight", "self_attn.k_proj",
                                                                         False))
_GEMMA2_NORMS = dict(stream_norms=("input_layernorm.weight", "pre_feedforward_layernorm.weight"),
                     post_norms=("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"))

#: ``config.model_type`` -> layout; a family missing here is refused by name
LAYOUTS: Dict[str, DecoderLayout] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "granite": _LLAMA,
    "qwen3": DecoderLayout("rms", "model.norm.weight", qk_norms=_PER_HEAD_QK),
    "gemma": DecoderLayout("rms_1p", "model.norm.weight", embed_scale=True),
    "gemma2": DecoderLayout("rms_1p", "model.norm.weight", embed_scale=True, **_GEMMA2_NORMS),
    "gemma3_text": DecoderLayout("rms_1p", "model.norm.weight", embed_scale=True, qk_norms=_PER_HEAD_QK,
                                 **_GEMMA2_NORMS),
    "olmo2": DecoderLayout("rms", "model.norm.weight", stream_norms=(
        "post_attention_layernorm.weight", "post_feedforward_layernorm.weight"),
        qk_norms=tuple((norm, proj, True) for norm, proj, _ in _PER_HEAD_QK)),
    "phi3": DecoderLayout("rms", "model.norm.weight", attention=("self_attn.qkv_proj.weight", 0), kv=None,
                          fused_qkv=True, mlps=(("mlp.gate_up_proj.weight", 0, 2, "intermediate_size"),)),
    "phi": DecoderLayout("layer", "model.final_layernorm.weight",
                         mlps=(("mlp.fc1.weight", 0, 1, "intermediate_size"),)),
    "stablelm": DecoderLayout("layer", "model.norm.weight", head_dim_in_config=False),
    "gpt_neox": DecoderLayout("layer", "gpt_neox.final_layer_norm.weight", layer="gpt_neox.layers.{}.",
                              attention=("attention.query_key_value.weight", 0), kv=None,
                              mlps=(("mlp.dense_h_to_4h.weight", 0, 1, "intermediate_size"),),
                              head_dim_in_config=False),
    "gpt2": DecoderLayout("layer", "transformer.ln_f.weight", layer="transformer.h.{}.",
                          attention=("attn.c_attn.weight", 1), kv=None, mlps=(("mlp.c_fc.weight", 1, 1, "n_inner"),),
                          head_dim_in_config=False),
    "opt": DecoderLayout("layer", "model.decoder.final_layer_norm.weight", layer="model.decoder.layers.{}.",
                         mlps=(("fc1.weight", 0, 1, "ffn_dim"),), head_dim_in_config=False),
    "falcon": DecoderLayout("layer", "transformer.ln_f.weight", layer="transformer.h.{}.",
                            attention=("self_attention.query_key_value.weight", 0), kv=None,
                            mlps=(("mlp.dense_h_to_4h.weight", 0, 1, "ffn_hidden_size"),), head_dim_in_config=False),
    "mixtral": DecoderLayout("rms", "model.norm.weight", align=8, router=("mlp.gate.weight", "num_local_experts"),
                             mlps=(("mlp.experts.gate_up_proj", 1, 2, "intermediate_size"),)),
    "qwen2_moe": DecoderLayout("rms", "model.norm.weight", align=8, router=("mlp.gate.weight", "num_experts"), mlps=(
        ("mlp.experts.gate_up_proj", 1, 2, "moe_intermediate_size"),
        ("mlp.shared_expert.gate_proj.weight", 0, 1, "shared_expert_intermediate_size"))),
    "qwen3_moe": DecoderLayout("rms", "model.norm.weight", qk_norms=_PER_HEAD_QK, align=8,
                               router=("mlp.gate.weight", "num_experts"), mlps=(
        ("mlp.experts.gate_up_proj", 1, 2, "moe_intermediate_size"),)),
}


def layout_of(model: torch.nn.Module) -> Optional[DecoderLayout]:
    """The :class:`DecoderLayout` of a Hugging Face decoder, ``None`` for any other model."""
    config = getattr(model, "config", None)
    if not is_hugging_face(model) or config is None:
        return None
    return LAYOUTS.get(str(getattr(config, "model_type", "")))


@dataclass(frozen=True)
class ConfigFit:
    """The widths a decoder's config can express: ``hidden_size`` a multiple of the kept query heads.

    A :data:`~hfp_fx.plan.projection.Fit`: called with the planned count of every prunable group, it
    lowers the residual stream group ``hidden`` to the largest multiple of ``kv x queries_per_kv``
    (``kv``: the kept key/value heads, equal in every layer), and only if no such width is
    allowed (fewer hidden channels than heads, ``min_channels``, ``round_to``) keeps fewer
    key/value groups.  Groups not in ``kept`` are fixed at their dense size.  ``whole``: groups
    the config cannot shrink at all (a LayerNorm model's stream), held at their dense size by
    :meth:`raise_floors`.  Plain data, so a prepared model can carry it to ``finalize``.

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
    whole: Tuple[Tuple[str, int], ...] = ()  #: (group id, dense channels) that must stay whole
    why_whole: str = ""  #: what ``whole`` is for, for messages
    #: groups whose counts must be multiples of ``align`` (the stream and the experts' widths of a
    #: mixture-of-experts model: ``torch._grouped_mm`` wants 16-byte strides)
    aligned: Tuple[str, ...] = ()
    align: int = 1

    @property
    def round_to_of(self) -> Dict[str, int]:
        """Per group id, the multiple its count must be (read by the projection from the start)."""
        return {g: self.align for g in self.aligned}

    def raise_floors(self, min_kept: Mapping[str, int]) -> Dict[str, int]:
        """``min_kept`` with the stream's floor raised to a multiple of the dense query heads, and
        the ``whole`` groups at their dense size.

        The fit only lowers the hidden size to a multiple of the kept heads; a floor just above
        such a multiple (``max_prune``) would leave it no width but one with fewer key/value heads.

            >>> ConfigFit("g0", 256, ("g1",), 2, 2).raise_floors({"g0": 154, "g2": 10})
            {'g0': 156, 'g2': 10}
            >>> ConfigFit("g0", 256, ("g1",), 2, 2, whole=(("g0", 256),)).raise_floors({})
            {'g0': 256}
        """
        out = dict(min_kept)
        if self.hidden in out:
            heads = self.kv_heads * self.queries_per_kv
            out[self.hidden] = min(self.hidden_size, -(-out[self.hidden] // heads) * heads)
        out.update(dict(self.whole))
        return out

    def __call__(self, kept: Dict[str, int], allowed: Callable[[str, int], bool]) -> Mapping[str, int]:
        out = self._fit_heads(kept, allowed)
        if out is None:
            return {}
        for g in self.aligned:
            if g == self.hidden or g not in kept:
                continue
            n = kept[g] - kept[g] % self.align
            while n > 0 and not allowed(g, n):
                n -= self.align
            if n <= 0:
                return {}
            if n != kept[g]:
                out[g] = n
        return out

    def _fit_heads(self, kept: Dict[str, int], allowed: Callable[[str, int], bool]) -> Optional[Dict[str, int]]:
        hidden = kept.get(self.hidden, self.hidden_size)
        counts = {kept.get(g, self.kv_heads) for g in self.kv_groups} or {self.kv_heads}
        if len(counts) != 1:
            return None  # layers with different heads: no config fits (to_pretrained says why)
        kv = counts.pop()
        for k in range(kv, 0, -1):
            if k < kv and not all(g in kept and allowed(g, k) for g in self.kv_groups):
                continue
            heads = k * self.queries_per_kv
            step = math.lcm(heads, self.align) if self.hidden in self.aligned else heads
            for n in range(hidden - hidden % step, 0, -step):
                if n == hidden or self.hidden in kept and allowed(self.hidden, n):
                    out = {g: k for g in self.kv_groups if g in kept}
                    if self.hidden in kept:
                        out[self.hidden] = n
                    return out
        return None


def config_fit(model: torch.nn.Module, dg) -> Optional[ConfigFit]:
    """The :class:`ConfigFit` of a Hugging Face decoder with a known :class:`DecoderLayout`
    (:data:`LAYOUTS`) analysed as ``dg``; ``None`` for any other model.

    Found from the layout's names (transformers is never imported): the group holding the final
    norm's channels is the residual stream, and each layer's attention rows belong to its
    key/value group.  On a LayerNorm model the stream is held whole, and so are the heads where
    the config derives the head dim from the hidden size; a warning says so.
    """
    layout = layout_of(model)
    config = getattr(model, "config", None)
    if layout is None:
        return None
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    hidden_size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (heads and layers and hidden_size):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "multi_query", False):
        kv_heads = 1

    def owners(param: str, dim: int):
        return [g for g in dg.groups if any(m.target == param and m.dim == dim for m in g.members)]

    stream = next(iter(owners(layout.final_norm, 0)), None)
    name, dim = layout.attention
    per_layer = [owners(layout.layer.format(i) + name, dim) for i in range(layers)]
    if stream is None or stream.channels != hidden_size or not all(per_layer):
        return None
    kv = [gs[0] for gs in per_layer]
    whole = []
    if layout.norm == "layer":
        whole.append((stream.id, hidden_size))
        if not layout.head_dim_in_config:  # the heads stay whole too: no count of them to fit
            whole += sorted({(g.id, g.channels) for gs in per_layer for g in gs if g.prunable})
            kv = []
        warnings.warn(f"{type(model).__name__} normalises with LayerNorm, which no smaller config reproduces: "
                      f"uniform_blocks=True keeps its residual stream{' whole' if kv else ' and heads whole'} and "
                      f"prunes {'the heads and ' if kv else ''}the MLP, so hfp_fx.to_pretrained can load the result",
                      stacklevel=3)
    if any(len(gs) != 1 or gs[0].channels != kv_heads for gs in per_layer[:len(kv)]):
        return None
    aligned: Tuple[str, ...] = ()
    if layout.align > 1:
        experts = [g.id for name, dim, _, _ in layout.mlps for i in range(layers)
                   for g in owners(layout.layer.format(i) + name, dim)]
        aligned = (stream.id, *dict.fromkeys(experts))
    return ConfigFit(stream.id, hidden_size, tuple(g.id for g in kv), kv_heads, heads // kv_heads, tuple(whole),
                     "LayerNorm" if whole else "", aligned, layout.align)
