"""LayerFlow for diffusers users: export to a diffusers folder, and a ``DiffusionPipeline`` that runs it.

The only package of layerflow that imports diffusers and peft (the optional extra ``pip install .[diffusers]``).
"""
