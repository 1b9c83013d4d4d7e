"""Step 1, capture: a copy of the user's model as a shape-annotated ``torch.fx.GraphModule``.

:mod:`.tracing` (symbolic tracing, or ``torch.export`` through :mod:`.export_capture`) on a
:mod:`.copies` copy; :mod:`.shapes` puts shapes and MACs on every node, on ``meta`` tensors,
with :mod:`.meta_memo` (each distinct call run once) and :mod:`.meta_shortcuts` (common ops'
results built without running them).  Imports only ``hfp_fx.passes.registry`` of the layers above.
"""
