"""The outer training loop: the cadence of logging, evaluation, checkpoints and samples.

`run(trainer, reporter)` calls `Trainer.train(steps_per_loop)` until the schedule ends, and after
each loop (orbit's `Controller`): checks every step's outputs (the non-finite streak: too many
skipped steps in a row stop the run), then logs, checkpoints, evaluates and samples when a
multiple of the interval falls in the loop, calls the callback, and stops on SIGTERM. Ctrl-C saves
a checkpoint first. `Reporter` writes TensorBoard scalars, `metrics.jsonl` and the progress bar.
The run's setup and end are `train_lib.train`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import keras
import tensorflow as tf
from absl import logging

from tf_denseflow import cluster, summaries
from tf_denseflow import train_step as train_step_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.model import DenseFlow
from tf_denseflow.train_config import TrainConfig, TrainingError
from tf_denseflow.trainer import Trainer

__all__ = ['Reporter', 'StopSignal', 'TrainResult', 'run']


# -------------------------------------------------------------------------------------------------
# Results, signals, reporting.


@dataclasses.dataclass
class TrainResult:
  """What a run did.

  Attributes:
    step: the global step at the end.
    start_step: the step the run started (or resumed) at.
    test_bpd: the final test-split ELBO bits/dim (None without evaluation).
    checkpoint: the last checkpoint path.
    samples: the final sample grid PNG (None without samples).
    nonfinite_steps: skipped steps over the whole run (checkpointed).
    stopped_by: None when the schedule finished, else 'SIGTERM', 'SIGTERM (another worker)' or
      'KeyboardInterrupt'.
    losses: `(step, loss in nats)` of every step of this run.
    evals: `(step, seconds since start, test bits/dim)` of every evaluation of this run.
    num_replicas: replicas in sync.
    is_chief: whether this process wrote the run directory (False on the other workers of a
      multi-worker run).
    model: the trained model (its variables are mirrored under the run's strategy).
    optimizer: the optimizer (its `iterations` counts the applied updates).
    timing: where this run's wall-clock time went (`Reporter.timing`: seconds, and the
      training throughput in images/s).
  """

  step: int
  start_step: int
  test_bpd: Optional[float] = None
  checkpoint: Optional[str] = None
  samples: Optional[str] = None
  nonfinite_steps: int = 0
  stopped_by: Optional[str] = None
  losses: List[Tuple[int, float]] = dataclasses.field(default_factory=list)
  evals: List[Tuple[int, float, float]] = dataclasses.field(default_factory=list)
  num_replicas: int = 1
  is_chief: bool = True
  model: Optional[DenseFlow] = None
  optimizer: Optional[keras.optimizers.Optimizer] = None
  timing: Dict[str, float] = dataclasses.field(default_factory=dict)


class StopSignal:
  """Turns SIGTERM into a flag the loop checks between loops (main thread only)."""

  def __init__(self):
    self.received = None
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


class _SkipStreak:
  """Consecutive skipped steps and their causes; too many in a row stop the run."""

  def __init__(self, limit: int):
    self.limit = limit
    self.length = 0
    self.reasons: Dict[str, int] = {}

  def skipped(self, step: int, out: Dict, total: int, last_checkpoint: Optional[str]) -> None:
    """Logs skipped step `step` (`out`: its outputs, Python values).

    Raises:
      TrainingError: `limit` steps in a row were skipped.
    """
    code = int(out['skip_reason'])
    reason = train_step_lib.SKIP_REASONS[code]
    if code == train_step_lib.LOSS_SCALE_OVERFLOW:  # float16's scale search: expected, not a streak
      logging.info('step %d: %s; update skipped.', step, reason)
      return
    self.length += 1
    self.reasons[reason] = self.reasons.get(reason, 0) + 1
    learning_rate = float(out['learning_rate'])
    logging.warning(
      'step %d: %s (loss %s, learning rate %s); update skipped (%d in a row, %d in total).',
      step,
      reason,
      float(out['loss']),
      learning_rate,
      self.length,
      total,
    )
    if self.length >= self.limit:
      causes = ', '.join(f'{n} x {r}' for r, n in self.reasons.items())
      raise TrainingError(
        f'{self.length} consecutive steps skipped (steps {step + 1 - self.length}-{step}: '
        f'{causes}; learning rate {learning_rate:g}); stopping. The last checkpoint '
        f'({last_checkpoint}) holds finite weights; lower --learning_rate or raise '
        '--warmup_steps before resuming.'
      )

  def applied(self) -> None:
    self.length = 0
    self.reasons = {}


class Reporter:
  """TensorBoard scalars, `metrics.jsonl`, the progress bar, the window of train losses, timing.

  Time is booked by kind (`timed`): `setup` (from `started` to the Reporter: strategy, data
  checks, model, restore or ActNorm init), `first_call` (the process's first training loop:
  tracing and graph optimisation), `eval`, `checkpoint` and `sample` (drawing and writing the
  grids); the rest of the run's wall-clock time is training (steps, input pipeline, host syncs,
  logging, the `step_callback`). The logged `images_per_s` is the
  training throughput of the window, without the other kinds' time, so it compares with
  `tf_denseflow.bench`'s step rate (docs/benchmarks.md section 5).

  Only the chief of a multi-worker run writes (`write=False` elsewhere: no files, no bar).
  """

  TIMED = ('setup', 'first_call', 'eval', 'checkpoint', 'sample')

  def __init__(
    self,
    config: TrainConfig,
    workdir: str,
    result: TrainResult,
    write: bool = True,
    started: Optional[float] = None,
  ):
    """`started`: when the run began (`time.time()`; default now): the time until now is `setup`."""
    self.config = config
    self.result = result
    self.write = write
    if write:
      self.writer = tf.summary.create_file_writer(workdir_lib.tensorboard_dir(workdir))
    else:
      self.writer = tf.summary.create_noop_writer()
    self.metrics_path = workdir_lib.metrics_path(workdir)
    now = time.time()
    self.run_start = now if started is None else started
    self.progress = None  # created after the first loop, so that tracing does not skew the ETA
    self.seconds = {kind: 0.0 for kind in self.TIMED}
    self.seconds['setup'] = now - self.run_start
    self.trained_steps = 0  # steps outside the first loop (the throughput's steps)
    self._reset_window()

  def _reset_window(self) -> None:
    self.window = {'loss': 0.0, 'count': 0, 'start': time.time(), 'steps': 0, 'other_s': 0.0}

  @contextlib.contextmanager
  def timed(self, kind: str) -> Iterator[None]:
    """Books the time of the `with` body as `kind`, not as training.

    Raises:
      ValueError: `kind` is not one of `TIMED` (before the body runs).
    """
    if kind not in self.TIMED:
      raise ValueError(f'`kind` must be one of {self.TIMED}, got {kind!r}.')
    start = time.time()
    try:
      yield
    finally:
      seconds = time.time() - start
      self.seconds[kind] += seconds
      self.window['other_s'] += seconds

  def step(self, loss: float, finite: bool, timed: bool = True) -> None:
    """Adds a step to the window (its loss only if the update was applied).

    `timed=False`: a step of the first loop, whose time is booked as `first_call`; it counts
    for the loss but not for the throughput.
    """
    if finite:
      self.window['loss'] += loss
      self.window['count'] += 1
    if timed:
      self.window['steps'] += 1
      self.trained_steps += 1

  def timing(self) -> Dict[str, float]:
    """Seconds since the start by kind, and the training throughput (images/s).

    `wall_s` = `train_s` + `setup_s` + `first_call_s` + `eval_s` + `checkpoint_s` + `sample_s`;
    `train_images_per_s` = images of the steps after the first loop / `train_s` (None when every
    step of this process was in the first loop).
    """
    wall = time.time() - self.run_start
    train = max(wall - sum(self.seconds.values()), 1e-9)
    images = self.trained_steps * self.config.optim.global_batch_size
    return {
      'wall_s': round(wall, 3),
      'train_s': round(train, 3),
      **{f'{kind}_s': round(seconds, 3) for kind, seconds in self.seconds.items()},
      'train_images_per_s': round(images / train, 3) if self.trained_steps else None,
    }

  def advance(self, current: int, num_steps: int) -> None:
    """Moves the progress bar to `current` after a loop of `num_steps`."""
    if self.progress is None:
      if self.write:
        self.progress = _progress_bar(self.config, current, self.config.optim.total_steps)
    else:
      self.progress.update(num_steps)

  def _append(self, record: Dict) -> None:
    if self.write:
      summaries.append_json_line(self.metrics_path, record)

  def log_train(self, current: int, metrics: Dict[str, float]) -> None:
    """Writes the window's train bits/dim, training throughput and the last step's metrics."""
    elapsed = max(time.time() - self.window['start'] - self.window['other_s'], 1e-9)
    steps = self.window['steps']
    images_per_s = steps * self.config.optim.global_batch_size / elapsed if steps else None
    scale = self.config.model.bits_per_dim_scale
    count = self.window['count']
    train_bpd = self.window['loss'] / count * scale if count else math.nan
    values = {
      'bits_per_dim': train_bpd,
      'learning_rate': metrics['learning_rate'],
      'grad_norm': metrics['grad_norm'],
      'images_per_s': images_per_s,
      'skipped_steps': self.result.nonfinite_steps,
    }
    if images_per_s is None:  # a window of first-loop steps only: their time is tracing
      del values['images_per_s']
    summaries.write_scalars(self.writer, {f'train/{k}': v for k, v in values.items()}, current)
    elapsed_s = round(time.time() - self.run_start, 3)
    record = {f'train_{k}' if k == 'bits_per_dim' else k: v for k, v in values.items()}
    self._append({'step': current, 'elapsed_s': elapsed_s, **record})
    if self.progress is not None:
      postfix = {'bpd': f'{train_bpd:.3f}'}
      if images_per_s is not None:
        postfix['img_s'] = f'{images_per_s:.1f}'
      self.progress.set_postfix(postfix)
    self._reset_window()

  def log_eval(self, current: int, bits_per_dim: float) -> None:
    """Records an evaluation (TensorBoard, `metrics.jsonl`, the result, the console)."""
    elapsed = time.time() - self.run_start
    self.result.evals.append((current, elapsed, bits_per_dim))
    summaries.write_scalars(self.writer, {'eval/bits_per_dim': bits_per_dim}, current)
    self._append(
      {'step': current, 'elapsed_s': round(elapsed, 3), 'eval_bits_per_dim': bits_per_dim}
    )
    logging.info('step %d: test ELBO %.4f bits/dim', current, bits_per_dim)
    if self.progress is not None:
      self.progress.write(f'step {current}: test bits/dim {bits_per_dim:.4f}')

  def log_timing(self, current: int) -> Dict[str, float]:
    """Records where the run's time went (`timing()`) in the result and `metrics.jsonl`."""
    self.result.timing = self.timing()
    self._append({'step': current, 'timing': self.result.timing})
    return self.result.timing

  def close(self) -> None:
    if self.progress is not None:
      self.progress.close()


def _progress_bar(config: TrainConfig, start: int, total: int):
  if not config.progress_bar:
    return None
  from tqdm import tqdm

  return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, smoothing=0.05)


def _crossed(previous: int, current: int, every: Optional[int]) -> bool:
  """Whether a multiple of `every` lies in `(previous, current]` (never for 0 or None)."""
  return bool(every) and current // every > previous // every


# -------------------------------------------------------------------------------------------------
# The loop.


def run(
  trainer: Trainer,
  reporter: Reporter,
  step_callback: Optional[Callable[[int, Dict[str, float], DenseFlow], None]],
) -> None:
  """Runs loops of `steps_per_loop` steps to the end of the schedule, or until stopped.

  After each loop, in this order: log, checkpoint, evaluate, sample (each when its interval's
  multiple falls in the loop), callback, SIGTERM check.
  """
  config, result = trainer.config, reporter.result
  total = config.optim.total_steps
  streak = _SkipStreak(config.optim.max_consecutive_nonfinite)
  current = result.start_step
  first_loop = True  # its time (tracing) is booked as first_call
  with StopSignal() as stop:
    try:
      while current < total:
        num_steps = min(config.steps_per_loop, total - current)
        with reporter.timed('first_call') if first_loop else contextlib.nullcontext():
          outputs = trainer.train(num_steps)
        previous, current = current, current + num_steps
        for i, step in enumerate(range(previous, current)):
          out = {k: v[i].item() for k, v in outputs.items()}
          result.losses.append((step, float(out['loss'])))
          if out['finite']:
            streak.applied()
          else:
            result.nonfinite_steps += 1
            streak.skipped(step, out, result.nonfinite_steps, trainer.latest_checkpoint)
          reporter.step(float(out['loss']), bool(out['finite']), timed=not first_loop)
        first_loop = False
        metrics = {
          'loss': float(out['loss']),
          'bits_per_dim': float(out['loss']) * config.model.bits_per_dim_scale,
          'grad_norm': float(out['grad_norm']),
          'learning_rate': float(out['learning_rate']),
          'finite': bool(out['finite']),
        }
        reporter.advance(current, num_steps)
        if _crossed(previous, current, config.log_every) or current == total:
          reporter.log_train(current, metrics)
        if _crossed(previous, current, config.checkpoint_every):
          with reporter.timed('checkpoint'):
            trainer.save(current)
        if (
          current < total
          and trainer.can_evaluate
          and _crossed(previous, current, config.eval_every)
        ):
          with reporter.timed('eval'):
            bits_per_dim = trainer.evaluate()
          reporter.log_eval(current, bits_per_dim)
        if (
          current < total
          and config.num_grid_samples
          and trainer.worker.is_chief
          and _crossed(previous, current, config.sample_every)
        ):
          with reporter.timed('sample'):
            summaries.write_image_grid(reporter.writer, 'samples', trainer.draw_samples(), current)
        if step_callback is not None:
          step_callback(current, metrics, trainer.model)
        # A signal on any worker stops every worker after the same step (one all-reduce).
        if cluster.any_worker(trainer.strategy, stop.received is not None):
          result.stopped_by = stop.received or 'SIGTERM (another worker)'
          logging.warning('%s received: stopping at step %d.', result.stopped_by, current)
          break
    except KeyboardInterrupt:
      result.stopped_by = 'KeyboardInterrupt'
      reporter.close()
      step = int(trainer.step.numpy())
      path = trainer.save(step)
      print(f'interrupted at step {step}; checkpoint: {path}', file=sys.stderr)
      raise
    finally:
      reporter.close()
