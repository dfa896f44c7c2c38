"""Where weights come from (release checkpoints, safetensors, seeded random weights, the tiny models),
and the one place every model is built with them (:mod:`layerflow.weights.build`)."""
