"""How every command ends: its exit status and the one line it prints when something goes wrong.

=====  ===========================================================================================
0      done
1      ``generate``: some samples failed (each one is listed; the others were written)
2      a usage, configuration or input error: one line on stderr naming the file or key
3      an internal error: one line (``--debug`` shows the traceback)
130    stopped with Ctrl-C; 143: stopped with SIGTERM (nothing half-written is left)
=====  ===========================================================================================

:func:`run_command` is the one wrapper that maps errors to these; each command names the
exceptions that are the user's doing (``user_errors``) and the prefix of its error line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from layerflow.runtime import distributed
from layerflow.runtime.interrupt import (  # noqa: F401  (re-exported: every exit status in one place)
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    exit_status,
    sigterm_as_interrupt,
)

EXIT_OK = 0
EXIT_FAILED_SAMPLES = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

# What the layer tools (compose, score, inspect, demo, convert) report as the user's doing: bad files,
# folders and values (ValueError, OSError) and unusable checkpoints (RuntimeError).
TOOL_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)

log = logging.getLogger("layerflow")


def one_line(error: BaseException) -> str:
    """The first line of an error's message (an OSError as ``file: reason``, not Python's ``[Errno 2] ...``)."""
    text = str(error).strip()
    if isinstance(error, OSError) and error.filename and error.strerror and text.startswith("["):
        return f"{error.filename}: {error.strerror.lower()}"
    return text.splitlines()[0] if text else type(error).__name__


def run_command(
    body: Callable[[], int],
    *,
    user_errors: tuple[type[BaseException], ...],
    prefix: str = "error",
    debug: bool = False,
    interrupted: str | Callable[[], str] = "interrupted: stopped",
) -> int:
    """Run ``body`` and return its exit status, or the status of what stopped it (module docstring).

    A user error prints ``<prefix>: <first line>`` (exit 2), anything else ``<prefix>: internal
    error (...)`` (exit 3); with ``debug`` the traceback is shown too (an internal error is re-raised).
    Ctrl-C and SIGTERM print ``interrupted`` (a line, or a function that makes it when it is needed;
    an empty line prints nothing) and give 130 and 143. Under torchrun the process also stops when
    its launcher dies (:func:`layerflow.runtime.distributed.stop_with_launcher`).
    """
    try:
        with sigterm_as_interrupt():
            distributed.stop_with_launcher()
            return body()
    except KeyboardInterrupt as stop:
        line = interrupted() if callable(interrupted) else interrupted
        if line:
            print(line, file=sys.stderr)
        return exit_status(stop)
    except user_errors as error:
        if debug:
            log.exception("details")
        print(f"{prefix}: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if debug:
            raise
        print(
            f"{prefix}: internal error ({type(error).__name__}: {one_line(error)}); "
            f"rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
