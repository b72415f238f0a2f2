"""The user-error base class. Imports nothing from vlp, so every module may import it.

A :class:`UserError` is a mistake of the user's or of their input (a bad config, a missing file, a folder that is
not what the command needs, feature sets that do not fit together). The CLI prints its message without a
traceback and exits non-zero; anything else that escapes is a bug in vlp and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; ``str(e)`` says what is wrong and, where it can, what to do."""

    exit_code = 2
