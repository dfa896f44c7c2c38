"""Where weights come from: release checkpoints, safetensors, seeded random weights, the tiny models."""
