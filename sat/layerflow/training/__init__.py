"""Training LayerFlow on layered clips: data and cache, loss, parameter groups, loop, checkpoints.

``sat/train_video.py`` is the entry point (:mod:`layerflow.cli.train`).
"""
