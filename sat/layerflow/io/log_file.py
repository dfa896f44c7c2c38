"""A run's log file: appended without following links, and quiet when the disk is full.

``logging.FileHandler`` opens its path as given (through a link someone left there) and, when a
write fails, prints a traceback to stderr for every record. This handler opens the file below the
run's folder with :func:`layerflow.io.links.open_append` (a link there stops the run with one line)
and, once the disk is full, drops records after a one-line warning: the run's own error line then
says what is wrong and how much space it needs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from layerflow.io import links
from layerflow.io.atomic import is_disk_full


class LogFileHandler(logging.StreamHandler):
    """Append records to ``root / relative`` (folders made as needed, no link followed below ``root``)."""

    def __init__(self, root: Path, relative: str | Path, where: str):
        self.path = Path(root) / relative
        super().__init__(links.open_append(Path(root), relative, where))
        self.dropping = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.dropping and self.stream is not None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not is_disk_full(sys.exc_info()[1]):
            super().handleError(record)
            return
        self.dropping = True
        print(f"warning: {self.path}: no space left on device; log records are dropped from here on", file=sys.stderr)

    def close(self) -> None:
        with self.lock:
            stream, self.stream = self.stream, None
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass  # a full disk: the buffered records are lost; the run reports the full disk itself
        super().close()
