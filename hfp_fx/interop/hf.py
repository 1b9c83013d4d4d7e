"""Back to Hugging Face: a pruned decoder as a ``PreTrainedModel`` of its own class, smaller config.

A pruned model from ``hfp_fx.prune`` / ``finalize`` (captured with ``torch.export``) computes its
RMSNorms over the kept hidden channels ``d'`` with the statistics of the original width ``d``:
``x * rsqrt(sum(x^2) / d + eps) * w``.  A standard RMSNorm over ``d'`` computes the same with
``eps' = eps * d / d'`` and ``w' = w * sqrt(d / d')`` (Gemma's ``1 + w`` scale: ``1 + w' =
(1 + w) * sqrt(d / d')``), so the pruned weights fit the model's own class with ``hidden_size =
d'``, ``rms_norm_eps = eps'``, the kept ``intermediate_size``, ``num_attention_heads`` and
``num_key_value_heads``, and ``head_dim`` written out (it does not change).  Gemma, which scales
its embeddings by ``sqrt(hidden_size)``, takes another exact route (see ``_rescaler``).  One configuration
needs one width per kind of layer: prune with ``uniform_blocks=True``.

A LayerNorm over pruned channels keeps the original width's mean and variance, which no LayerNorm
of the smaller width computes: on LayerNorm decoders (GPT-2, GPT-NeoX, OPT, Phi, StableLM)
``uniform_blocks=True`` keeps the residual stream whole, and the heads too where the config
derives the head dim from the hidden size, so the result always loads.

Every family is described by a :class:`~hfp_fx.plan.hf_layouts.DecoderLayout`
(:data:`~hfp_fx.plan.hf_layouts.LAYOUTS`): where its norms, heads
and MLP live and which config fields hold their widths.  :func:`to_pretrained` runs the model it
returns against the pruned graph and raises if they differ.

Example (needs ``transformers``)::

    >>> import torch, transformers, hfp_fx
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=6, num_key_value_heads=2)
    >>> model, ids = transformers.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (1, 8))
    >>> dg = hfp_fx.dependency_graph(model, ids)
    >>> keep = {g.id: range(g.channels // 2) for g in dg.prunable_groups}  # the same half everywhere
    >>> small = hfp_fx.shrink(dg, keep=keep)
    >>> hf = hfp_fx.to_pretrained(small, like=model)  # checks hf against small on random ids
    >>> torch.allclose(hf(ids).logits, small(ids), atol=1e-4)
    True
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Callable, Dict, Mapping

import torch

from hfp_fx.capture.export_capture import is_hugging_face

from hfp_fx.plan.hf_layouts import LAYOUTS, DecoderLayout, layout_of

__all__ = ["to_pretrained"]


# --------------------------------------------------------------------------------- to_pretrained
def _width(state: Mapping[str, torch.Tensor], key: str, dim: int, layers: int) -> int:
    sizes = {tuple(state[key.format(i)].shape)[dim] for i in range(layers)}
    if len(sizes) != 1:
        raise ValueError(f"the layers of the pruned model have different widths for {key.format('#')} "
                         f"({sorted(sizes)}); prune with uniform_blocks=True to fit one configuration")
    return sizes.pop()


def _pruned_config(config, layout: DecoderLayout, state, dense_state):
    """``config`` with the pruned widths, the kept stream's share ``d'/d`` and the kept heads' share."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden_size = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    hidden = state[layout.final_norm].shape[0]
    if layout.norm == "layer" and hidden != hidden_size:
        raise ValueError(f"the pruned {config.model_type} model keeps {hidden} of {hidden_size} residual-stream "
                         "channels under LayerNorm, which keeps the original width's mean and variance and no "
                         "config of the smaller width computes; prune with uniform_blocks=True, which keeps the "
                         "stream whole on LayerNorm models")
    new = copy.deepcopy(config)
    layer = layout.layer
    for mlp_name, mlp_dim, parts, config_field in layout.mlps:
        setattr(new, config_field, _width(state, layer + mlp_name, mlp_dim, layers) // parts)
    if layout.router is not None:  # whole experts: the router's rows
        setattr(new, layout.router[1], _width(state, layer + layout.router[0], 0, layers))
    attention, attention_dim = layout.attention
    rows = _width(state, layer + attention, attention_dim, layers)
    dense_rows = dense_state[layer.format(0) + attention].shape[attention_dim]
    head_share = rows / dense_rows  # kept heads / heads (whole GQA groups go)
    if not layout.head_dim_in_config:
        if rows != dense_rows:
            raise ValueError(f"{config.model_type}'s config derives the head dim from hidden_size / heads, so it "
                             "cannot express fewer heads; prune with uniform_blocks=True, which keeps them whole")
    else:
        head_dim = getattr(config, "head_dim", None) or hidden_size // heads
        kv_kept = kv_heads * rows // dense_rows
        new.num_attention_heads = heads * rows // dense_rows
        if hasattr(config, "num_key_value_heads"):
            new.num_key_value_heads = kv_kept
        if layout.kv is not None:
            k_rows = _width(state, layer + layout.kv[0], layout.kv[1], layers)
            if k_rows != kv_kept * head_dim:
                raise ValueError(f"the pruned key projections keep {k_rows} rows, not {kv_kept} whole heads")
        new.head_dim = head_dim
    if layout.norm != "layer":
        new.hidden_size = hidden
        if not layout.embed_scale:  # a stream at sqrt(d'/d) of the scale needs the original eps
            new.rms_norm_eps = config.rms_norm_eps * hidden_size / hidden
    return new, hidden_size / hidden, head_share


def _rescaler(layout: DecoderLayout, stream_factor: float, head_share: float) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The function ``(state-dict key, pruned tensor) -> tensor of the smaller config``: the norms
    (and the projections some norms read) rescaled, every other tensor as it is.

    The pruned graph's RMSNorms over the stream compute ``x * rsqrt(sum(x^2) / d + eps) * w`` over
    ``d'`` channels.  Two exact ways to get that from a standard RMSNorm over ``d'``:

    * eps ``eps * d / d'`` and weight ``w * sqrt(d / d')`` (every family but Gemma);
    * Gemma scales its embeddings by ``sqrt(hidden_size)`` of the config, ``sqrt(d')`` now: the
      smaller model carries the stream divided by ``c = sqrt(d / d')``, which makes
      ``sum(u^2) / d' = sum(x^2) / d`` so the eps stays and the norms that read the stream take
      ``1 + w' = (1 + w) * c``; the projections that write into the stream are divided by ``c``
      (a post-norm's input with them, so its weight stays).  The embedding stays tied.

    One config ``rms_norm_eps`` serves every norm.  A q/k norm needs its own eps (its width's
    dense / kept share ``r`` times the original, ``r = 1`` per head); an RMSNorm is blind to its
    input's scale but for eps, so scaling the projection it normalises by ``sqrt(e / r)``
    (``e``: the config eps over the original) turns the config's eps into the one it needs.
    """
    c = math.sqrt(stream_factor)
    eps_factor = 1.0 if layout.embed_scale else stream_factor
    factors: Dict[str, float] = {}  # parameter name suffix -> factor
    for norm, proj, over_heads in layout.qk_norms:
        r = 1 / head_share if over_heads else 1.0
        factors[norm] = math.sqrt(r)
        factors[proj + ".weight"] = factors[proj + ".bias"] = math.sqrt(eps_factor / r)
    if layout.embed_scale:
        factors.update({f"{w}.{p}": 1 / c for w in layout.writers for p in ("weight", "bias")})

    def rescale(key: str, value: torch.Tensor) -> torch.Tensor:
        if layout.norm != "layer" and (key == layout.final_norm or key.endswith(layout.stream_norms)):
            factor = c
        else:
            factor = next((f for suffix, f in factors.items() if key.endswith(suffix)), 1.0)
        if factor == 1.0:
            return value
        if key.endswith("norm.weight") and layout.norm == "rms_1p":
            return (1 + value) * factor - 1
        return value * factor
    return rescale


def _weights(model, state, dense_state, rescale) -> Dict[str, torch.Tensor]:
    """``model``'s state dict from the pruned graph's tensors, rescaled (:func:`_rescaler`)."""
    out: Dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        value = state.get(key)
        if value is None:  # a tied tensor the pruned graph holds under its other name
            target = dense_state.get(key)
            alias = next((k for k, v in dense_state.items() if k in state and target is not None
                          and v.data_ptr() == target.data_ptr()), None)
            if alias is None:
                raise ValueError(f"the pruned model has no tensor for {key}")
            value = state[alias]
        out[key] = rescale(key, value)
    return out


def _without_removed_layers(config, layout: DecoderLayout, state, dense_state):
    """Decoder layers removed whole (both residual branches, ``prune(..., depth=True)``): the
    config with fewer layers (and its per-layer lists cut to the kept ones) and both state dicts
    with the kept layers renumbered.  A layer that lost one branch only has no configuration."""
    field = "num_hidden_layers" if hasattr(config, "num_hidden_layers") else "n_layer"
    layers = getattr(config, field)
    attention, mlp = layout.attention[0], layout.mlps[0][0]
    kept = []
    for i in range(layers):
        has = [layout.layer.format(i) + part in state for part in (attention, mlp)]
        if has == [True, True]:
            kept.append(i)
        elif any(has):
            gone = "attention" if not has[0] else "MLP"
            raise ValueError(f"decoder layer {i} lost its {gone} branch only: a {type(config).__name__} has no "
                             "layer without it, so the pruned model stays a GraphModule (exact; hfp_fx.save "
                             "keeps it); remove whole layers (both branches) to get a smaller config")
    if len(kept) == layers:
        return config, state, dense_state
    if not kept:
        raise ValueError("the pruned model removed every decoder layer")
    prefixes = [layout.layer.format(i) for i in range(layers)]

    def renumbered(sd):
        out = {}
        for key, value in sd.items():
            i = next((j for j, p in enumerate(prefixes) if key.startswith(p)), None)
            if i is None:
                out[key] = value
            elif i in kept:
                out[prefixes[kept.index(i)] + key[len(prefixes[i]):]] = value
        return out

    new = copy.deepcopy(config)
    setattr(new, field, len(kept))
    for name in ("layer_types",):  # per-layer attention kinds (sliding / full)
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == layers:
            setattr(new, name, [values[i] for i in kept])
    dense_kept = {k: v for k, v in renumbered(dense_state).items()}
    return new, renumbered(state), dense_kept


def _example_for(small: torch.fx.GraphModule, vocab_size: int, seed: int = 0):
    """Random inputs of the shapes the (shape-specialised) pruned graph was captured with."""
    gen = torch.Generator().manual_seed(seed)
    names, values = [], []
    for node in small.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"cannot check the pruned graph: its input {node.name} has no recorded shape; pass "
                             "example_inputs=")
        # a dynamic size (a SymInt of the capture) at the size export saw
        shape = tuple(d if isinstance(d, int) else int(d.node.hint) for d in val.shape)
        if val.dtype.is_floating_point:
            values.append(torch.randn(shape, generator=gen).to(val.dtype))
        elif "mask" in node.name:
            values.append(torch.ones(shape, dtype=val.dtype))
        else:
            values.append(torch.randint(0, vocab_size, shape, generator=gen, dtype=val.dtype))
        names.append(node.name)
    return names, values


def _check(hf, small, example_inputs, vocab_size: int) -> None:
    if example_inputs is None:
        names, values = _example_for(small, vocab_size)
    elif isinstance(example_inputs, Mapping):
        names, values = list(example_inputs), list(example_inputs.values())
    else:
        values = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
        names = list(inspect.signature(hf.forward).parameters)[:len(values)]
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            expected = small(*values)
            got = hf(**dict(zip(names, values)), use_cache=False).logits
    except RuntimeError as exc:  # e.g. torch._grouped_mm's alignment on odd expert widths
        raise ValueError(f"the {type(hf).__name__} that to_pretrained built does not run: {exc}. Prune with "
                         "uniform_blocks=True, which picks widths its config and kernels accept "
                         "(hfp_fx.plan.hf_layouts.config_fit)") from exc
    finally:
        hf.train(was_training)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    tol = 1e-4 if got.dtype in (torch.float32, torch.float64) else 2e-2
    err = float((got.float() - expected.float()).abs().max() / (expected.float().abs().max() + 1e-12))
    if not err <= tol:
        raise ValueError(f"to_pretrained built a {type(hf).__name__} whose logits differ from the pruned graph's by "
                         f"{err:.1e} of their scale (tolerance {tol:.0e}): its config cannot express this pruned "
                         "model. Please report it with the family and widths; the pruned GraphModule itself is exact")


def _match_dtypes(model: torch.nn.Module, like: torch.nn.Module) -> None:
    """Give every tensor of ``model`` the dtype of its namesake in ``like``: a bf16 model loaded
    with ``from_pretrained`` keeps its rotary frequencies in float32, and so must its pruned twin
    (casting the whole model would round them and change its outputs)."""
    dtypes = {n: t.dtype for n, t in list(like.named_parameters()) + list(like.named_buffers())}
    default = next(like.parameters()).dtype
    done: Dict[int, torch.Tensor] = {}  # one conversion per tensor, so tied weights stay tied
    with torch.no_grad():
        for prefix, module in model.named_modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    want = dtypes.get(f"{prefix}.{name}" if prefix else name, default if t is not None
                                      and t.is_floating_point() else None)
                    if t is not None and want is not None and t.dtype != want:
                        if id(t) not in done:
                            done[id(t)] = (torch.nn.Parameter(t.to(want), requires_grad=t.requires_grad)
                                           if isinstance(t, torch.nn.Parameter) else t.to(want))
                        store[name] = done[id(t)]


def check_layout(like: torch.nn.Module) -> DecoderLayout:
    """``like``'s :class:`DecoderLayout`, or an error naming the families :func:`to_pretrained` knows."""
    if not is_hugging_face(like):
        raise TypeError(f"to_pretrained expects the dense transformers model as `like`, got {type(like).__name__}")
    layout = layout_of(like)
    if layout is None:
        raise ValueError(f"{type(like).__name__} (model_type {getattr(like.config, 'model_type', None)!r}) is not a "
                         f"decoder family to_pretrained knows ({', '.join(sorted(LAYOUTS))}); its pruned GraphModule "
                         "is exact and can be saved with hfp_fx.save, or add a DecoderLayout to hfp_fx.plan.hf_layouts.LAYOUTS")
    return layout


def pretrained_config(like: torch.nn.Module, config, layout: DecoderLayout, state, dense_state):
    """The smaller config of ``like``'s class that holds the pruned ``state`` (only shapes are read,
    so meta tensors do), validated, the :func:`_rescaler` of its tensors, and the model of that
    config on the meta device (built to validate it)."""
    missing = [k for k in (layout.final_norm, layout.layer.format(0) + layout.mlps[0][0]) if k not in state]
    if missing:
        raise ValueError(f"the pruned model has no {missing[0]}: pass the GraphModule that hfp_fx pruned from `like`")
    new_config, stream_factor, head_share = _pruned_config(config, layout, state, dense_state)
    try:  # transformers 5 validates a config when it is built or saved, not when a field is set
        validate = getattr(new_config, "validate", None)
        if callable(validate):
            validate()
        with torch.device("meta"):
            smaller = type(like)(new_config)
    except Exception as exc:  # e.g. the check that hidden_size is a multiple of the heads
        widths = (f"hidden_size {getattr(new_config, 'hidden_size', None)}, "
                  f"{getattr(new_config, 'num_attention_heads', None)} heads")
        raise ValueError(f"{type(like).__name__}'s config refuses the pruned widths ({widths}): {exc}. Prune with "
                         "uniform_blocks=True (prune, or prepare -> finalize), which "
                         "keeps hidden_size a multiple of the kept heads (hfp_fx.plan.hf_layouts.config_fit), or shrink with a "
                         "keep that does") from exc
    return new_config, _rescaler(layout, stream_factor, head_share), smaller


def to_pretrained(small: torch.nn.Module, like: torch.nn.Module, *, example_inputs=None,
                  check: bool = True) -> torch.nn.Module:
    """A model of ``like``'s class and configuration, resized to ``small``'s widths, holding its weights.

    ``like`` is the dense model that was pruned; ``small`` the pruned GraphModule.  Supported: the
    decoder families of :data:`LAYOUTS` (Llama, Mistral, Qwen2/3, Granite, Gemma 1/2/3, OLMo2,
    Phi-3, the mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE, and with the residual stream
    whole Phi, StableLM, GPT-NeoX, GPT-2, OPT, Falcon).  Widths a
    config cannot hold (layers of different widths, a hidden size that is no multiple of the
    heads, a pruned LayerNorm stream) raise a ``ValueError`` naming ``uniform_blocks=True``.

    ``check`` (default): run the returned model and ``small`` on ``example_inputs`` (default: random
    token ids of the shape ``small`` was captured with) and raise ``ValueError`` if their logits
    differ by more than 1e-4 of their scale (2e-2 in half precision): never a silently different
    model.  The per-head q/k norms of Qwen3 and Gemma3 and OLMo2's over all heads stay exact
    under the one config ``rms_norm_eps`` by rescaling their projections (see ``_rescaler``).
    """
    config = like.config
    layout = check_layout(like)
    state = small.state_dict()
    dense_state = like.state_dict()
    config, state, dense_state = _without_removed_layers(config, layout, state, dense_state)
    new_config, rescale, _ = pretrained_config(like, config, layout, state, dense_state)
    model = type(like)(new_config)
    model.load_state_dict(_weights(model, state, dense_state, rescale), strict=True)
    _match_dtypes(model, like)
    model.train(small.training)
    if check:
        _check(model, small, example_inputs, config.vocab_size)
    return model
