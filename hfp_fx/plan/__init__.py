"""Steps 4-5, plan: the cost model (:mod:`.cost`, measured latency in :mod:`.latency`), the
target (:mod:`.target`), channel saliency (:mod:`.saliency` by weight magnitude,
:mod:`.calibration` on data) and the exact budget projection (:mod:`.projection`) that turns
them into the channels to keep; :mod:`.report` describes the result."""
