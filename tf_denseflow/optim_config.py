"""The optimisation recipe of a training run: `OptimConfig` and its learning-rate schedules.

`train_config` re-exports it (a `TrainConfig` holds one as `optim`); `optim.WarmupSchedule` turns
it into the learning rate at a step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tf_denseflow.checks import FLOAT32_TINY, MAX_STEPS
from tf_denseflow.config_flags import check_fields, hparam
from tf_denseflow.train_errors import ConfigError

__all__ = ['LR_SCHEDULES', 'OptimConfig']

LR_SCHEDULES = ('constant', 'exponential')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimisation recipe (defaults: the official CIFAR-10 command).

  Attributes:
    global_batch_size: images per step over all replicas.
    learning_rate: Adamax learning rate after warm-up.
    adamax_epsilon: Adamax epsilon.
    warmup_steps: linear warm-up steps.
    lr_schedule: 'constant' or 'exponential' after warm-up (see `WarmupSchedule`).
    lr_decay_gamma: decay per epoch of the exponential schedule.
    steps_per_epoch: epoch length for the decay; None = ceil(train examples / global batch).
    train_steps: steps of the main stage.
    finetune_lr: constant learning rate of the fine-tune stage.
    finetune_steps: steps of the fine-tune stage (after `train_steps`).
    max_consecutive_nonfinite: stop after this many skipped (non-finite) steps in a row.
  """

  # Every field is also a flag of `python -m tf_denseflow.train` (config_flags); `hparam` holds
  # its help text and bounds, which `__post_init__` checks too. Learning rates and epsilon meet
  # the weights in float32 (the fused Adamax kernel): they must be finite there, and epsilon a
  # normal float32 (0 gives 0/0 on a zero gradient entry).
  global_batch_size: int = hparam(
    64,
    'Images per step over all replicas; must be divisible by the number of replicas.',
    minimum=1,
  )
  learning_rate: float = hparam(
    1e-3, 'Adamax learning rate after warm-up.', minimum=0.0, exclusive_minimum=True
  )
  adamax_epsilon: float = hparam(
    1e-8,
    'Adamax epsilon (PyTorch default 1e-8; Keras default 1e-7); at least the smallest normal '
    'float32 (1.2e-38): with 0, a zero gradient entry divides 0 by 0.',
    minimum=FLOAT32_TINY,
  )
  warmup_steps: int = hparam(
    5000,
    'Linear learning-rate warm-up, in steps: lr * min(1, (step + 1) / warmup_steps).',
    minimum=0,
    maximum=MAX_STEPS,
  )
  lr_schedule: str = hparam(
    'constant',
    'After warm-up: constant (what the official code effectively runs) or exponential '
    '(lr * lr_decay_gamma ** epoch, what the paper describes).',
    choices=LR_SCHEDULES,
  )
  lr_decay_gamma: float = hparam(
    0.9975,
    'Per-epoch decay factor of --lr_schedule=exponential (official: 0.9975 CIFAR-10, 0.95 others).',
    minimum=0.0,
    exclusive_minimum=True,
    maximum=1.0,
  )
  steps_per_epoch: Optional[int] = hparam(
    None,
    'Steps per epoch for the exponential decay (default: ceil(train examples / '
    'global_batch_size)).',
    minimum=1,
    maximum=MAX_STEPS,
  )
  train_steps: int = hparam(
    312_800,
    'Steps of the main stage (CIFAR-10: 400 epochs of 782 steps).',
    minimum=0,
    maximum=MAX_STEPS,
  )
  finetune_lr: float = hparam(
    2e-5,
    'Constant learning rate of the fine-tune stage that follows the main stage.',
    minimum=0.0,
    exclusive_minimum=True,
  )
  finetune_steps: int = hparam(
    15_640,
    'Steps of the fine-tune stage (CIFAR-10: 20 epochs); 0 = none.',
    minimum=0,
    maximum=MAX_STEPS,
  )
  max_consecutive_nonfinite: int = hparam(
    10,
    'Stop the run after this many steps in a row with a NaN/Inf loss or gradient (each such '
    'step is skipped: no update).',
    minimum=1,
  )

  def __post_init__(self):
    check_fields(self, ConfigError)

  @property
  def total_steps(self) -> int:
    """Main stage plus fine-tune stage."""
    return self.train_steps + self.finetune_steps
