"""The user-error base class. Imports nothing from vlp, so every module may import it.

A :class:`UserError` is a mistake of the user's or of their input (a bad config, a missing file, a folder that is
not what the command needs, feature sets that do not fit together). The CLI prints its message without a
traceback and exits non-zero; anything else that escapes is a bug in vlp and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; ``str(e)`` says what is wrong and, where it can, what to do."""

    exit_code = 2


class NotAnExport(UserError, FileNotFoundError):
    """A ``--model`` / ``model=`` folder is missing or is not a model export (it has no ``vlp_model.json``)."""


def not_an_export(path: str, exists: bool) -> NotAnExport:
    """The error for a model path that is missing (``exists`` False) or holds no ``vlp_model.json``."""
    what = "is not a model export (it has no vlp_model.json)" if exists else "does not exist"
    return NotAnExport(f"model {path} {what}; a model export is the export/ folder a training run writes "
                       "(e.g. runs/demo/train/stage2/export)")


class OutputNotWritable(UserError):
    """An output folder cannot be created (its parent is a file, the place is read-only, ...)."""
