"""The registry of per-op coupling rules: the one place to teach hfp_fx a new op.

A rule is ``rule(analysis, node) -> value`` where ``value`` is the node's channel labelling: a
:class:`~hfp_fx.spaces.ChannelMap`, ``None`` (no prunable channel axis) or a tuple of those for
ops returning several tensors.  Rules unite elements, fix them with a reason, bind parameters
to channel axes, record MAC terms and gate sites through the ``analysis`` object
(:class:`hfp_fx.passes.channel_analysis.ChannelAnalysis`).

Example: teach hfp_fx that ``fancy_act`` is a per-channel activation.  The function must reach
the graph as one ``call_function`` node, so it is declared a leaf with ``torch.fx.wrap`` (at
module level, in the module that calls it); otherwise FX traces into it and records its ops::

    >>> import torch
    >>> from hfp_fx.passes.registry import register_function
    >>> from hfp_fx.passes.rules_tensor import passthrough
    >>> def fancy_act(x):
    ...     return x.clamp(min=0) + torch.special.erf(x).clamp(max=0)
    >>> _ = register_function(fancy_act)(passthrough)

Module rules match the module's exact class (a subclass may change ``forward``); modules with a
rule are traced as leaves.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["register_module", "register_function", "register_method", "lookup", "is_rule_leaf", "no_macs",
           "counts_no_macs"]

Rule = Callable
_RULES: Dict[Tuple[str, object], Rule] = {}


def _register(kind: str, keys) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for key in keys:
            _RULES[(kind, key)] = fn
        return fn

    return deco


def register_module(*classes: type) -> Callable[[Rule], Rule]:
    """Rule for ``call_module`` nodes whose module is exactly one of ``classes``."""
    return _register("call_module", classes)


def register_function(*functions: Callable) -> Callable[[Rule], Rule]:
    """Rule for ``call_function`` nodes calling one of ``functions``."""
    return _register("call_function", functions)


def register_method(*names: str) -> Callable[[Rule], Rule]:
    """Rule for ``call_method`` nodes calling ``Tensor.<name>``."""
    return _register("call_method", names)


def lookup(node: torch.fx.Node, module: Optional[torch.nn.Module] = None) -> Optional[Rule]:
    if node.op == "call_module":
        return _RULES.get(("call_module", type(module)))
    if node.op in ("call_function", "call_method"):
        try:
            return _RULES.get((node.op, node.target))
        except TypeError:  # unhashable target
            return None
    return None


def is_rule_leaf(module: torch.nn.Module) -> bool:
    """Modules with their own rule are kept as single nodes when tracing."""
    return ("call_module", type(module)) in _RULES


def no_macs(fn: Rule) -> Rule:
    """Mark a rule whose ops do no multiply-accumulates (shape propagation then skips counting them)."""
    fn.no_macs = True
    return fn


def counts_no_macs(node: torch.fx.Node, module: Optional[torch.nn.Module] = None) -> bool:
    rule = lookup(node, module)
    return bool(getattr(rule, "no_macs", False))
