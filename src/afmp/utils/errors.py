"""The one error type the command line shows as a single line.

``afmp`` prints a ``UsageError`` as ``afmp COMMAND: error: ...`` and exits with code 2;
any other exception is a bug and keeps its traceback. Code that reads the user's input
(options, config files, run directories, data files) raises ``UsageError`` or runs
inside ``usage_errors()``.
"""

from __future__ import annotations

import contextlib


class UsageError(ValueError):
    """Input the user can fix; the message names the option or file and what was expected."""


@contextlib.contextmanager
def usage_errors():
    """Turn the ValueError and OSError of a block that only reads and checks input into UsageError.

    Wrap the checking phase of a command, never its computation: there a ValueError is a bug.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as err:
        raise UsageError(str(err) or type(err).__name__) from err
