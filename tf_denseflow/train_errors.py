"""The errors of a training run: a setting that cannot work, and a run that cannot go on.

`train_config` and `train_lib` re-export them; they live here so that the config modules
(`train_config`, `optim_config`) can raise them without importing each other.
"""

from __future__ import annotations

__all__ = ['ConfigError', 'TrainingError', 'WorkerLostError']


class ConfigError(ValueError):
  """A setting cannot work (bad flag combination, wrong workdir); the message says which."""


class TrainingError(RuntimeError):
  """Training cannot continue (too many non-finite steps, non-finite weights)."""


class WorkerLostError(TrainingError):
  """A multi-worker run lost a worker (it died, hung, or cannot be reached); restart them all."""
