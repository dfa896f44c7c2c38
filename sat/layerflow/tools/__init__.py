"""Layer tools for editors: compose layers, score their consistency, inspect and reuse sample folders.

``folder`` names the files of a sample folder (shared by the writers and every tool);
``score``, ``compose``, ``contact_sheet`` and ``inspect_sample`` are the tools behind the
``layerflow`` command (:mod:`layerflow.console`).
"""
