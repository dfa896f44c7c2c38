"""The networks: the LayerFlow DiT with its dual LoRA, the CogVideoX 3D causal VAE and the T5 text encoder."""
