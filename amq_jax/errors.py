"""One family of errors for everything a user can get wrong.

Every error here is a user error: the message names the culprit (field, value, file,
layer), the valid choices, and the fix. The command line prints it as one line and exits
with status 2; anything else is an internal error and keeps its traceback (``--debug``
shows tracebacks for these too).

    AmqError
    |- ConfigError       a config field or override (name, value, valid range)
    |- BudgetError       a budget that cannot be parsed or met (states the feasible range)
    |- BitsError         a bit configuration (unknown layer, width out of range, bad rule)
    |- DataError         missing or damaged data files
    |- StateError        a damaged or foreign file in a work directory (says what to delete)
    |- LayerError        a model whose layers cannot be described or quantized as asked
    |- WorkdirError      a work directory that is locked, not writable, or a path outside it
    |- NonFiniteError    a loss or estimate that became NaN/Inf (names the step / layer)

Warnings (``warnings.warn``; the command line prints each as one line, ``--strict`` turns
them into errors with exit status 2):

    NearChanceWarning    the FP32 model scores near chance: quantizing it measures nothing
"""
from __future__ import annotations

__all__ = ["AmqError", "ConfigError", "BudgetError", "BitsError", "DataError", "StateError",
           "LayerError", "WorkdirError", "NonFiniteError", "NearChanceWarning"]


class AmqError(Exception):
  """Base of every user-facing error of amq-jax (exit status 2 on the command line)."""


class ConfigError(AmqError, ValueError):
  """A config file, field or override is wrong."""


class BudgetError(AmqError, ValueError):
  """A budget that cannot be parsed or met; the message states the feasible range."""


class BitsError(AmqError, ValueError):
  """A bit configuration names unknown layers, widths outside 1..16, or a bad rule."""


class DataError(AmqError, RuntimeError):
  """Data files are missing or damaged; the message names the file and how to fix it."""


class StateError(AmqError, RuntimeError):
  """A file in the work directory is damaged or belongs to another run."""


class LayerError(AmqError, ValueError):
  """The model's quantizable layers cannot be found or used as asked."""


class WorkdirError(AmqError, RuntimeError):
  """The work directory is locked by another process, not writable, or a name escapes it."""


class NonFiniteError(AmqError, FloatingPointError):
  """A loss, a gradient or an estimate became NaN or Inf."""


class NearChanceWarning(UserWarning):
  """The FP32 model's accuracy is near chance (an error under ``amq-jax --strict``)."""


class NearChanceWarning(UserWarning):
  """The float model scores near chance; quantizing it measures nothing useful."""
