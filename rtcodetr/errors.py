"""What counts as bad input, and how every stage reports it.

Exit codes of every ``rtcodetr`` stage (``rtcodetr <stage>`` and ``python -m rtcodetr.<stage>``):

- 0: done.
- 1: the command ran but its outcome is not OK (``cache-teacher verify`` found the teacher or the values differ, a
  run stopped on a failure outside its inputs such as a full disk -- with a message that says how to resume).
- 2: bad input: a file, record, field, option or config value is unusable. One line names it (and, where there is
  one, the fix); no traceback; nothing already written is lost.

An error is bad input iff it is an ``InputError`` (the stages' own error types derive from it: ``ConfigError``,
``DatasetError``, ``PreparedDataError``, ``ImageDecodeError``, ``ModelLoadError``, ``CacheMismatchError``,
``CacheCorruptError``, ``CacheNotFoundError``) or one of the OS errors that name a path the user gave
(``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``). Set ``RTCODETR_TRACEBACK=1`` to get the
traceback instead (for bug reports).

This module imports nothing heavy: ``rtcodetr data`` must not pull in torch to report a bad JSON file.
"""
from __future__ import annotations

import os
import sys

BAD_INPUT_EXIT = 2


class InputError(Exception):
    """Base of every error meaning "an input the user gave is unusable"; the message names the file/record/field."""


BAD_INPUT: tuple[type[BaseException], ...] = (InputError, FileNotFoundError, NotADirectoryError, PermissionError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An error re-raised by a DataLoader worker carries the worker's traceback
    in its message ("Caught X in DataLoader worker process 0. Original Traceback ..."): keep only the original
    message, its last line."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name = f"{type(error).__module__}.{type(error).__qualname__}: "
        text = last[len(name):] if last.startswith(name) else last.split(": ", 1)[-1]
    return " ".join(text.split("\n"))


def report_bad_input(prog: str, error: BaseException) -> int:
    """Print ``PROG: error: MESSAGE`` to stderr and return ``BAD_INPUT_EXIT`` (call it from ``except BAD_INPUT``).

    Under torchrun every process that meets the error prints it, prefixed with its rank: an error that only one rank
    sees (a damaged chunk read mid-epoch) must not go unreported."""
    if os.environ.get("RTCODETR_TRACEBACK", "") not in ("", "0"):
        raise error
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
    print(f"{prefix}{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    return BAD_INPUT_EXIT
