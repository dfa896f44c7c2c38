"""``python -m layerflow.cli SUBCOMMAND ...``: the ``layerflow`` command without its installed script."""

import sys

from layerflow.cli.command import main

if __name__ == "__main__":
    sys.exit(main())
