"""Step 3, analysis: channel elements (``hfp_fx.spaces``), united by the op handlers' rules
(``hfp_fx.passes.channel_analysis``) into prune groups (:mod:`.graph`, ``DependencyGraph``),
and pictures of them (:mod:`.viz`)."""
