"""Shape shortcuts: results of common ops on ``meta`` tensors, made without running the op.

The shape pass (:func:`hfp_fx.capture.shapes.propagate_shapes`) runs every node on meta tensors.  For
most ops PyTorch's meta kernels are Python code (reference decompositions, stride and type
promotion logic) that costs 0.1-1 ms a call, far more than the answer is worth: on deep CNNs
it was most of the graph-build time.  For the few ops that make up almost every vision model,
this module builds the output directly with ``torch.empty_strided`` from the documented shape
rule, and returns ``None`` (run the op) for anything outside the cases it fully understands:
channels-last or strided inputs, mixed dtypes, in-place writes that change autograd state,
subclasses, hooks and keyword variants.  Strides follow PyTorch's rules: element-wise ops keep a
dense input's layout (channels-last, permuted), layer norm and concatenation return contiguous
tensors.

Each shortcut is the ``shape`` field of the op handlers it serves (``pointwise_shape`` for
activations, ``layer_shape`` for conv/linear, ...; see :mod:`hfp_fx.passes.registry`), and
:func:`meta_result` asks the node's handler.  It returns ``(output, MACs)``; every shortcut
equals what running the op
under ``torch.utils.flop_counter.FlopCounterMode`` gives in shape, dtype and strides of non-unit
dims, which ``tests/test_property.py`` checks against running the op.  Outputs carry no
autograd state (see ``_new``); nothing downstream reads ``requires_grad`` from the shape pass.

Example::

    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(lambda x, y: torch.cat([x + y, x], 1))
    >>> x = torch.empty(2, 3, 4, device="meta")
    >>> add = next(n for n in gm.graph.nodes if n.op == "call_function")
    >>> total, macs = meta_result(add, None, (x, x), {})
    >>> meta_result(add.next, None, ([total, x], 1), {})[0].shape
    torch.Size([2, 6, 4])
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.utils.flop_counter import conv_flop_count

from hfp_fx.passes.registry import DEFAULT_RULES

__all__ = ["meta_result", "tensor_metadata", "in_place", "pointwise_shape", "norm_shape", "arithmetic_shape",
           "cat_shape", "adaptive_avg_pool2d_shape", "layer_shape"]

Result = Optional[Tuple[torch.Tensor, int]]

_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """``torch.fx.passes.shape_prop._extract_tensor_metadata(t)``, without its Python stride checks.

    The tensor's own (C++) contiguity flags answer the memory-format question; quantized and
    sparse tensors go to the torch.fx function.
    """
    if t.is_quantized or t.layout != torch.strided:
        return _extract_tensor_metadata(t)
    memory_format = next((f for f in _MEMORY_FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


def _meta_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta" and x.dtype.is_floating_point


def _plain(x: Any) -> bool:
    """A contiguous meta tensor of a floating dtype: the inputs every shortcut understands."""
    return _meta_float(x) and x.is_contiguous()


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous layout (channels-last, permuted)."""
    dims = sorted((st, size) for st, size in zip(x.stride(), x.shape) if size != 1)
    step = 1
    for st, size in dims:
        if st != step:
            return False
        step *= size
    return True


def _like(x: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``x``'s shape and strides (``x`` dense), as ``torch.empty_like`` makes."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _new(shape, like: torch.Tensor) -> torch.Tensor:
    """A contiguous meta tensor (``torch.empty_like`` on meta runs a Python kernel; this does not).

    It carries no autograd state: a fresh tensor that required grad would be a leaf, and an
    in-place op after it (``ReLU(inplace=True)``) would then refuse to run.
    """
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return torch.empty_strided(tuple(shape), tuple(reversed(stride)), dtype=like.dtype, device="meta")


# -- shape-keeping ops: activations, dropout, norms --------------------------------------------
def _fits(module, x: torch.Tensor) -> bool:
    """Whether a norm layer accepts ``x`` (its parameters match the input's channels)."""
    if isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)):
        features = getattr(module, "num_features", getattr(module, "num_channels", None))
        if x.dim() < 2 or x.shape[1] != features or x.numel() == 0:
            return False
        # what refuses a single value to normalise over, as the shape pass runs it: group norm
        # always (per group), instance norm without running statistics (per instance); batch
        # norm never, since the pass runs copies in eval mode (``copies.shape_only``)
        if isinstance(module, torch.nn.GroupNorm):
            return x.numel() // module.num_groups > 1
        if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) and not module.track_running_stats:
            return x.numel() // (x.shape[0] * x.shape[1]) > 1
        return True
    if isinstance(module, torch.nn.LayerNorm):
        k = len(module.normalized_shape)
        return tuple(x.shape[-k:]) == tuple(module.normalized_shape)
    return True


def _one_input(n: torch.fx.Node, module, args, kwargs) -> bool:
    """A floating meta input, and a module called with it alone (keywords may change the op)."""
    if not args or not _meta_float(args[0]):
        return False
    return n.op != "call_module" or (len(args) == 1 and not kwargs)


def pointwise_shape(n: torch.fx.Node, module, args, kwargs) -> Result:
    """Element-wise activations and dropout: the output keeps the input's strides."""
    if not _one_input(n, module, args, kwargs) or not _dense(args[0]):
        return None
    x = args[0]
    if in_place(module if module is not None else n.target, args, kwargs):
        # the result is the input itself; a leaf that requires grad makes the real op raise
        return (x, 0) if not (x.requires_grad and x.grad_fn is None) else None
    return _like(x), 0


def norm_shape(n: torch.fx.Node, module, args, kwargs) -> Result:
    """Normalisations: contiguous in, contiguous out (layer norm: any dense input, contiguous out)."""
    if not _one_input(n, module, args, kwargs) or (module is not None and not _fits(module, args[0])):
        return None  # a mismatched norm is run, so that it raises its own error
    x = args[0]
    layer_norm = isinstance(module, torch.nn.LayerNorm) or n.target is F.layer_norm
    if not (x.is_contiguous() or layer_norm and _dense(x)):
        return None
    return _new(x.shape, x), 0


@functools.lru_cache(maxsize=None)
def _inplace_position(target: Any) -> Optional[int]:
    """Where a function takes its ``inplace`` flag among its positional parameters (from its
    signature: ``F.relu(input, inplace)`` 1, ``F.dropout(input, p, training, inplace)`` 3)."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    return params.index("inplace") if "inplace" in params else None


def in_place(target: Any, args, kwargs) -> bool:
    """Whether calling ``target`` (a module or a function) with these arguments is asked to write
    its result into its input: the module's ``inplace`` flag, or the functional's, by keyword or
    by position."""
    if isinstance(target, torch.nn.Module):
        return bool(getattr(target, "inplace", False))
    try:
        position = _inplace_position(target)
    except TypeError:  # an unhashable target
        position = None
    return bool(kwargs.get("inplace", False) or (position is not None and len(args) > position and args[position]))


# -- element-wise arithmetic ------------------------------------------------------------------
def arithmetic_shape(n: torch.fx.Node, module, args, kwargs) -> Result:
    """``a (+ - * /) b`` on same-dtype contiguous floating tensors and Python numbers (broadcasting)."""
    if kwargs or len(args) != 2:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    numbers = [a for a in args if not isinstance(a, torch.Tensor)]
    if not tensors or any(not _meta_float(t) or t.dtype != tensors[0].dtype for t in tensors):
        return None
    if any(type(a) not in (int, float, bool) for a in numbers):
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return None  # run it: the op raises its own error
    if all(t.is_contiguous() for t in tensors):
        return _new(shape, tensors[0]), 0
    # Otherwise the full-size operands set the layout (channels-last, permuted), provided they
    # agree and no broadcast operand has two non-unit dims whose order it could impose.
    full = [t for t in tensors if t.shape == shape]
    if not full or not _dense(full[0]) or any(t.stride() != full[0].stride() for t in full):
        return None
    if any(sum(size != 1 for size in t.shape) > 1 for t in tensors if t.shape != shape):
        return None
    return _like(full[0]), 0


# -- concatenation ----------------------------------------------------------------------------
def cat_shape(n: torch.fx.Node, module, args, kwargs) -> Result:
    """``torch.cat`` of same-dtype contiguous floating tensors."""
    if not args:
        return None
    if set(kwargs) - {"dim"} or len(args) > 2:
        return None
    tensors, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", 0))
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return None
    first = tensors[0]
    if any(not _plain(t) or t.dtype != first.dtype or t.dim() != first.dim() or t.numel() == 0 for t in tensors):
        return None  # (empty tensors have legacy rules in cat)
    rank = first.dim()
    if not -rank <= dim < rank:
        return None
    dim %= rank
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:] for t in tensors):
        return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return _new(shape, first), 0


# -- adaptive average pooling -----------------------------------------------------------------
def adaptive_avg_pool2d_shape(n: torch.fx.Node, module, args, kwargs) -> Result:
    """``AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` on a contiguous 3-d or 4-d input."""
    if n.op == "call_module":
        if len(args) != 1 or kwargs:
            return None
        size = module.output_size
    else:
        if len(args) != 2 or kwargs:
            return None
        size = args[1]
    x = args[0]
    if not _plain(x) or x.dim() not in (3, 4) or 0 in x.shape[-3:]:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or any(s is not None and (not isinstance(s, int) or s < 1) for s in size):
        return None
    out = [s if s is not None else x.shape[-2 + i] for i, s in enumerate(size)]
    return _new((*x.shape[:-2], *out), x), 0


# -- convolution and linear layers ------------------------------------------------------------
def layer_shape(n: torch.fx.Node, module, args, kwargs) -> Result:
    """(output, MACs) of a plain ``ConvNd``/``Linear`` module (transposed convs are run).

    Meta convolutions go through Python shape checks; the output shape is the documented
    formula and the MACs come from ``torch.utils.flop_counter``'s own counting function.
    """
    plain_conv = isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed
    if not (plain_conv or isinstance(module, torch.nn.Linear)) or len(args) != 1 or kwargs:
        return None
    # (the weight's device is not read: with a meta input, what would run is a meta copy)
    x, weight = args[0], getattr(module, "weight", None)
    if not _plain(x) or not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype:
        return None
    if isinstance(module, torch.nn.Linear):
        if x.dim() < 2 or x.shape[-1] != module.in_features or weight.shape != (module.out_features, x.shape[-1]):
            return None
        rows = x.numel() // module.in_features
        macs = rows * module.in_features * module.out_features  # an (rows x in) @ (in x out) mm
        return _new((*x.shape[:-1], module.out_features), x), macs
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros" or x.dim() != nd + 2 or x.shape[1] != module.in_channels:
        return None
    if weight.shape != (module.out_channels, module.in_channels // module.groups, *module.kernel_size):
        return None
    spatial = []
    for i in range(nd):
        size, kernel, dilation = x.shape[2 + i], module.kernel_size[i], module.dilation[i]
        if module.padding == "same":
            out_size = size
        else:
            pad = 0 if module.padding == "valid" else module.padding[i]
            out_size = (size + 2 * pad - dilation * (kernel - 1) - 1) // module.stride[i] + 1
        if out_size < 1:
            return None  # the layer raises its own error
        spatial.append(out_size)
    out_shape = [x.shape[0], module.out_channels, *spatial]
    macs = conv_flop_count(list(x.shape), list(weight.shape), out_shape) // 2
    return _new(out_shape, x), macs


def meta_result(n: torch.fx.Node, module: Optional[torch.nn.Module], args: Tuple[Any, ...],
                kwargs: Dict[str, Any], rules=None) -> Result:
    """``(output, MACs)`` of node ``n`` from its op handler's shape shortcut, or ``None`` (run it).

    ``args`` and ``kwargs`` are the values of ``n``'s arguments (``Interpreter.fetch_args_kwargs_from_env``);
    ``module`` is the called module for ``call_module`` nodes; ``rules`` the op handlers
    (``hfp_fx.passes.registry.DEFAULT_RULES`` by default).
    """
    if n.op not in ("call_module", "call_function", "call_method"):
        return None
    if module is not None and (module._forward_hooks or module._forward_pre_hooks):
        return None  # a hook may change the output or count MACs of its own: run the module
    handler = (rules if rules is not None else DEFAULT_RULES).lookup(n, module)
    if handler is None or handler.shape is None:
        return None
    return handler.shape(n, module, args, kwargs)
