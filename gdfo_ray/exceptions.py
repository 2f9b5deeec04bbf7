"""Exception family of gdfo-ray.

Every error the library raises on purpose is a :class:`GDFOError`, so a caller
(the CLI, a Tune trainable, a campaign) can tell a user mistake from a bug.
Subclasses keep the matching builtin type where one fits.
"""

from __future__ import annotations


class GDFOError(Exception):
    """Base class of every error raised on purpose by gdfo-ray."""


class ConfigError(GDFOError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class DataError(GDFOError, ValueError):
    """Task data is missing, malformed, or inconsistent with the task (columns, labels)."""


class ModelNotFoundError(GDFOError, FileNotFoundError):
    """A model id or path cannot be loaded here; the message says what to install or pass."""


class BudgetExhaustedError(GDFOError, RuntimeError):
    """A caller tried to spend more black-box calls than the budget has left."""


class TeacherError(GDFOError, RuntimeError):
    """The black-box teacher failed or returned unusable scores (NaN, wrong shape)."""


class ResumeError(GDFOError, RuntimeError):
    """An output directory cannot be started fresh or resumed as asked."""
