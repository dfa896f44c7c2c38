"""Layer tools for editors: compose layers, score their consistency, inspect and reuse sample folders.

The file names of a sample folder live in :mod:`layerflow.io.sample_files` (shared with the writers);
``score``, ``compose``, ``contact_sheet`` and ``inspect_sample`` are the tools behind the
``layerflow`` command (:mod:`layerflow.console`).
"""
