"""LayerFlow sampling entry point: ``python sat/sample_video.py --help`` (or under torchrun)."""

import sys

from layerflow.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
