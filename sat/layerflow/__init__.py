"""LayerFlow: layer-aware video generation on the SAT version of CogVideoX-2B.

The package lives under ``sat/`` of the repository as ``layerflow``; it never shadows the
installed SwissArmyTransformer package, which is imported as ``sat``.
"""

__version__ = "0.1.0"
