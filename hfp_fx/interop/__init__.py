"""The outside world: saving and loading pruned models (:mod:`.io`), Hugging Face round trips
(:mod:`.hf`), the ``hfp-fx`` command line (:mod:`.cli`, models named by :mod:`.specs`)."""
