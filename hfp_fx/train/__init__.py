"""Holistic Filter Pruning's training: gates (:mod:`.gates`), ``prepare`` / ``complexity_loss``
/ ``finalize`` (:mod:`.hfp`), distillation (:mod:`.distill`) and a complexity log (:mod:`.log`)."""
