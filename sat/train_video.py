"""LayerFlow training entry point: ``python sat/train_video.py --help`` (or under torchrun)."""

import sys

from layerflow.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
