"""What a user sees when something they gave is wrong: one line, never a traceback.

This module owns the line between a user's mistake and a bug. Every error class that means
"what you gave cannot be used" (a config, a dataset, a checkpoint, a plan, a path) derives from
:class:`UserError`; an ``OSError`` (a path that is a file, read-only, a full disk) is one too,
and so is running out of host memory (a size asked for that this host cannot hold).
:func:`guarded` runs an entry point (a ``recsys`` sub-command, a stage, the launcher) and turns
those into one line on stderr, starting on a line of its own, and a non-zero exit code. Any
other exception is a bug and keeps its traceback. ``RECSYS_DEBUG=1`` shows the traceback of a
user error too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Callable

EXIT_USER_ERROR = 2
"""Exit code of a command or stage stopped by a user error."""


class UserError(Exception):
    """Something the user gave cannot be used; the message names it and what would be right."""


def debug() -> bool:
    """Whether ``RECSYS_DEBUG`` asks for tracebacks of user errors too."""
    return os.environ.get("RECSYS_DEBUG", "") not in ("", "0")


def os_reason(err: OSError) -> str:
    """The OS's reason for ``err`` as it reads inside a sentence (``no space left on device``)."""
    reason = err.strerror or (errno.errorcode.get(err.errno, "") if err.errno else "") or str(err)
    return reason[:1].lower() + reason[1:]


def describe_os_error(err: OSError) -> str:
    """``PATH: reason`` of an OS error (``no space left on device``), whoever raised it."""
    reason = os_reason(err)
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return f"{' → '.join(names)}: {reason}" if names else reason


def one_line(err: BaseException) -> str:
    """The message of a user error (an OSError as its path and reason). An error raised in a
    data-loader worker comes back from torch as the same type whose message is "Caught X in
    DataLoader worker process N." and the worker's traceback: its own message is the last
    line, after "X: "."""
    if isinstance(err, OSError) and not isinstance(err, UserError):
        return describe_os_error(err)
    if _out_of_memory(err):
        said = " ".join(str(err).split())
        return (
            f"out of memory ({type(err).__name__}: {said[:160]}): a size asked for (rows, "
            "batch, negatives, users, items) is more than this host holds"
        )
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        for name in (prefix, f"{type(err).__qualname__}: "):
            if last.startswith(name):
                return last[len(name) :]
        return last
    return text or type(err).__name__


def _out_of_memory(err: BaseException) -> bool:
    """The host has not the memory a setting asks for: Python's MemoryError, or torch's CPU
    allocator refusing (a RuntimeError: "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, UserError | OSError) or _out_of_memory(err)


def fresh_line() -> None:
    """End a progress bar's line on stderr so the error starts on a line of its own."""
    from recsys.train import log as run_log

    if run_log.close_bars():
        return
    if sys.stderr.isatty():
        sys.stderr.write("\n")


def report(err: BaseException, prefix: str = "error") -> None:
    """Print a user error as one line on stderr (its traceback too with RECSYS_DEBUG=1)."""
    fresh_line()
    if debug():
        traceback.print_exception(err, file=sys.stderr)
    print(f"{prefix}: {one_line(err)}", file=sys.stderr, flush=True)


def guarded(run: Callable[[], int | None], prefix: str = "error") -> int:
    """Run an entry point; a user error becomes one line and exit code 2 (see the module doc)."""
    try:
        return int(run() or 0)
    except KeyboardInterrupt:
        fresh_line()
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`recsys plan ... | head`): nothing left to tell.
        # Point stdout at /dev/null so that Python's flush at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports a command ended by SIGPIPE
    except BaseException as err:  # sorted below: user errors vs bugs
        if not is_user_error(err):
            raise
        report(err, prefix)
        return EXIT_USER_ERROR
