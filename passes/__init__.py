"""FX graph passes of hfp_fx (installed as ``hfp_fx.passes``).

* :mod:`~hfp_fx.passes.registry` - the per-op rule registry;
* :mod:`~hfp_fx.passes.channel_analysis` - the analysis that runs the rules;
* :mod:`~hfp_fx.passes.rules_layers`, :mod:`~hfp_fx.passes.rules_pointwise`,
  :mod:`~hfp_fx.passes.rules_views`, :mod:`~hfp_fx.passes.rules_matmul`,
  :mod:`~hfp_fx.passes.rules_swin` - the rules;
* :mod:`~hfp_fx.passes.mask` - reference masking; :mod:`~hfp_fx.passes.shrink` - the rewrite.
"""
