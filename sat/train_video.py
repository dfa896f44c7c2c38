"""LayerFlow training entry point: ``python sat/train_video.py --help`` (or under torchrun)."""

import sys

from layerflow.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
