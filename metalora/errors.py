"""The kit's error base class, and the one-line report the command-line entry points give for it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class MetaloraError(Exception):
    """Bad input or state that the user can fix; the message names what is wrong and where."""


def exit_status(prog: str, run: Callable[[], int]) -> int:
    """Call `run`; a MetaloraError or an OSError (a full disk, a read-only or not-a-directory output path)
    becomes one line on stderr naming `prog`, and exit status 2, instead of a traceback."""
    try:
        return run()
    except MetaloraError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
    except OSError as err:
        print(f"{prog}: error: {err.strerror or err}: {err.filename or ''}", file=sys.stderr)
    return 2
