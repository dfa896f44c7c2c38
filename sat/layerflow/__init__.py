"""LayerFlow: layer-aware video generation on the SAT version of CogVideoX-2B.

The package lives under ``sat/`` of the repository as ``layerflow``; it never shadows the
installed SwissArmyTransformer package, which is imported as ``sat``. It reads from the top down:
``cli`` (the commands) over ``tools``, ``batch``, ``pipeline``/``training``, ``weights``, ``config``,
``models``/``sampling``/``scores``, ``runtime``, ``io``, ``tasks`` and ``geometry``/``errors``; each
imports only from the ones after it (the order is ``LAYERS`` in ``tests/test_import_layers.py``).
"""

import os

__version__ = "0.1.0"

# SwissArmyTransformer and DeepSpeed log INFO lines and an accelerator guess when they are imported
# (before any of our code runs). Their own switches, set only where the user has not: SAT logs
# warnings and up, and without CUDA DeepSpeed is told it runs on the CPU instead of guessing aloud.
os.environ.setdefault("SAT_LOGLEVEL", "WARNING")
if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
