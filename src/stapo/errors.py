"""One exception type for mistakes the user can fix (config, data, run directory, checkpoint).

The `stapo` command prints such an error as one line and exits with status 2; ``--debug`` shows the
traceback. Everything else is a bug in stapo and keeps its traceback.
"""

from __future__ import annotations

import warnings


class UserError(Exception):
    """Bad input: the message names the key, file or directory and what to do about it."""


class InputWarning(UserWarning):
    """Input used with something left out (rows without an answer, say): shown as one line,
    ``stapo: warning: ...``, without the file:line of the code that warned."""


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    if issubclass(category, InputWarning):
        return f"stapo: warning: {message}\n"
    return _default(message, category, filename, lineno, line)


warnings.formatwarning = _format_warning
