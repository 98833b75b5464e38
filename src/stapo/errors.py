"""One exception type for mistakes the user can fix (config, data, run directory, checkpoint).

The `stapo` command prints such an error as one line and exits with status 2; ``--debug`` shows the
traceback. Everything else is a bug in stapo and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the key, file or directory and what to do about it."""
