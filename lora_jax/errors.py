"""The project's error types for bad user input, as opposed to bugs.

Raise these (never a bare ``ValueError``) when the input is at fault and the user can fix it;
the message names the problem and the fix in one sentence or two. ``experiments.run`` shows a
:class:`UserError` as one ``error: ...`` line and lets every other exception keep its traceback,
so a ``KeyError`` or ``ValueError`` from a bug is never mistaken for a user mistake.

Each type also derives from the builtin a caller would expect (``ValueError``,
``FileNotFoundError``, ``KeyError``), so ``except ValueError`` keeps working.

Example:
  >>> from lora_jax.errors import ConfigError, UserError
  >>> err = ConfigError("TrainConfig.steps must be >= 1, got 0.")
  >>> isinstance(err, UserError), isinstance(err, ValueError)
  (True, True)
  >>> user_message(err)
  'TrainConfig.steps must be >= 1, got 0.'
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InputFileError",
    "MissingFileError",
    "UserError",
    "user_message",
]


class UserError(Exception):
    """Bad input that the user can fix; its message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value or argument that is out of range, unknown or inconsistent."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or that a run needs) does not exist."""


class InputFileError(UserError, ValueError):
    """A file exists but cannot be used (truncated, corrupt, not writable, wrong format)."""


def user_message(err: BaseException) -> str:
    """The message of ``err`` on one line (its first argument: KeyError's ``str`` adds quotes;
    line breaks, e.g. from a third-party cause quoted in it, become spaces)."""
    text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    return " ".join(text.split())
