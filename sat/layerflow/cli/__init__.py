"""The front door: every command-line entry point of LayerFlow, one module per command.

* :mod:`.command`   the ``layerflow`` command (``python -m layerflow.cli``): its subcommand table;
* :mod:`.generate`  ``layerflow generate`` = ``sat/sample_video.py``: a task over prompts and given layers;
* :mod:`.train`     ``sat/train_video.py``: prepare the encoded dataset, then train a stage;
* :mod:`.convert`, :mod:`.export`, :mod:`.demo`, :mod:`.compose`, :mod:`.score`, :mod:`.inspect`: the other subcommands;
* :mod:`.arguments` the options every command shares (``--base``, ``--set``, ``--seed``, ``--debug``);
* :mod:`.exits`     the exit statuses and the one wrapper that maps errors to them.

The commands only parse, check and hand over: the work is done by the layers below (``batch``,
``training``, ``tools``, ``weights``; see ``tests/test_import_layers.py`` for the order).
"""
