"""Layer tools for editors: compose layers into a sample folder, inspect and reuse sample folders.

``compose`` and ``inspect_sample`` are behind ``layerflow compose`` and ``layerflow inspect``
(:mod:`layerflow.cli`). The file names of a sample folder live in :mod:`layerflow.io.sample_files`
(shared with the writers); the layer-consistency scores (``layerflow score``) in :mod:`layerflow.scores`
and the contact sheet in :mod:`layerflow.io.contact_sheet`, below the batch layer that records both.
"""
