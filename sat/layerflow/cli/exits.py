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


def report(code: int, line: str = "", **facts) -> int:
    """A command's last word: ``line`` on stderr, or, under ``layerflow.cli.launch``, to the launcher, which
    prints one line for all ranks (:func:`layerflow.runtime.distributed.tell_launcher`); returns ``code``."""
    told = distributed.tell_launcher(exit=code, error=line, **facts)
    if line and not told:
        print(line, file=sys.stderr)
    return code


def run_command(
    body: Callable[[], int],
    *,
    user_errors: tuple[type[BaseException], ...],
    prefix: str = "error",
    debug: bool = False,
    interrupted: str | Callable[[], str] = "interrupted: stopped",
    partner_lost: tuple[type[BaseException], ...] = (),
    log_traceback: bool = False,
) -> int:
    """Run ``body`` and return its exit status, or the status of what stopped it (module docstring).

    A user error prints ``<prefix>: <first line>`` (exit 2), anything else ``<prefix>: internal
    error (...)`` (exit 3, naming the rank when there are several; with ``log_traceback`` the
    traceback goes to the rank log); with ``debug`` the traceback is shown too (an internal error is
    re-raised). ``partner_lost`` errors (a video partner that died or hung) are exit 3 with their
    line. Ctrl-C and SIGTERM print ``interrupted`` (a line, or a function that makes it when it is
    needed; an empty line prints nothing) and give 130 and 143. Every line goes through
    :func:`report`. Under torchrun the process also stops when its launcher dies
    (:func:`layerflow.runtime.distributed.stop_with_launcher`).
    """
    try:
        with sigterm_as_interrupt():
            distributed.stop_with_launcher()
            return report(body())
    except KeyboardInterrupt as stop:
        return report(exit_status(stop), interrupted() if callable(interrupted) else interrupted)
    except user_errors as error:
        if debug:
            log.exception("details")
        return report(EXIT_USAGE, f"{prefix}: {one_line(error)}")
    except partner_lost as error:
        return report(EXIT_INTERNAL, f"{prefix}: {one_line(error)}", partner_lost=True)
    except Exception as error:
        if debug:
            raise
        if log_traceback:
            log.error("internal error", exc_info=True, extra={"file_only": True})
        where = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
        return report(
            EXIT_INTERNAL,
            f"{prefix}: {where}internal error ({type(error).__name__}: {one_line(error)}); "
            f"rerun with --debug for the traceback",
        )
