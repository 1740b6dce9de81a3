"""Command-line flags of the tf_denseflow programs: the one place where flags are defined.

Only the entry points call the `define_*` functions (`train.py` calls `define_flags`,
`evaluate.py` calls `define_evaluate_flags`, `sample.py` calls `define_sample_flags`); library
code never reads `FLAGS`, it takes the frozen configs that `train_lib.TrainConfig.from_flags`
builds. Every flag is optional, so tests can parse any subset. The defaults of `define_flags` are
the CIFAR-10 values of the paper's official code (DenseFlow-74-10, Adamax 1e-3, 5000 warm-up
steps, batch 64, 400 + 20 epochs, `eta` augmentation); experiment flagfiles in `configs/` state
every result-affecting value anyway.

Each `define_*` function may be called more than once, and together in one process (tests):
a flag that is already defined is left as it is, so the programs share `--workdir`, `--seed`
and `--data_dir` with the same meaning and default.

Every numeric flag is checked when it is parsed, and the error names it (docs/input_checks.md):
integers against their range (counts >= 0 or >= 1, all within the int32/int64 the graphs use),
floats with `define_float` (finite, in range, and representable in float32, the dtype they are
used in). Programs parse with `parse_flags`, so a bad value ends them with one `error: ...`
line and exit status 2 (`fail`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
from absl import flags

from tf_denseflow import checks

__all__ = [
  'ATTENTION_TOKENS',
  'AUGMENTATIONS',
  'COUPLING_DTYPES',
  'DEQUANTIZATIONS',
  'LR_SCHEDULES',
  'MODEL_FLAGS',
  'MODEL_PRESETS',
  'NOISE_SEEDINGS',
  'SQUEEZE_ORDERS',
  'FLOAT32_MAX',
  'FLOAT32_TINY',
  'INT32_MAX',
  'INT64_MAX',
  'INT64_MIN',
  'MAX_STEPS',
  'define',
  'define_evaluate_flags',
  'define_flags',
  'define_float',
  'define_sample_flags',
  'explicitly_set',
  'fail',
  'optional_value',
  'parse_flags',
]

MODEL_PRESETS = ('denseflow_74_10', 'small', 'tiny', 'custom')
AUGMENTATIONS = ('eta', 'hflip', 'none')
LR_SCHEDULES = ('constant', 'exponential')
NOISE_SEEDINGS = ('global_batch', 'per_replica')
DEQUANTIZATIONS = ('variational', 'uniform')
SQUEEZE_ORDERS = ('channel_major', 'space_to_depth')
ATTENTION_TOKENS = ('official', 'pixel')
COUPLING_DTYPES = ('float32', 'bfloat16')

# Ranges of the numeric flags: the dtypes their values meet in the graphs.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STEPS = 2**31 - 1  # step counts and intervals (a run of 2e9 steps is far beyond any recipe)
MAX_CPU_DEVICES = 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32 (epsilons)

# Flags that map one-to-one onto a `DenseFlowConfig` field (flag name -> field name). With a
# named `--model_preset`, only those given explicitly override the preset.
MODEL_FLAGS = {
  'num_bits': 'num_bits',
  'units_per_block': 'units_per_block',
  'steps_per_unit': 'steps_per_unit',
  'coupling_channels': 'coupling_channels',
  'growth_rate': 'growth_rate',
  'dense_depth': 'dense_depth',
  'dense_growth': 'dense_growth',
  'attention_landmarks': 'attention_landmarks',
  'use_attention': 'use_attention',
  'attention_tokens': 'attention_tokens',
  'use_cross_unit_coupling': 'use_cross_unit_coupling',
  'cross_unit_include_previous': 'cross_unit_include_previous',
  'squeeze_order': 'squeeze_order',
  'dequantization': 'dequantization',
  'dequant_steps': 'dequant_steps',
  'dequant_context_channels': 'dequant_context_channels',
  'dequant_mid_channels': 'dequant_mid_channels',
  'dequant_depth': 'dequant_depth',
  'dequant_growth': 'dequant_growth',
  'dequant_context_depth': 'dequant_context_depth',
  'dequant_context_growth': 'dequant_context_growth',
  'coupling_dtype': 'coupling_dtype',
  'recompute_grad': 'use_recompute_grad',
}


def define(definer: Callable[..., Any], name: str, *args, **kwargs) -> None:
  """Defines a flag unless a flag of that name exists already (shared between programs)."""
  if name not in flags.FLAGS:
    definer(name, *args, **kwargs)


def define_float(
  name: str,
  default: Optional[float],
  help_text: str,
  *,
  minimum: Optional[float] = None,
  exclusive_minimum: bool = False,
  maximum: float = FLOAT32_MAX,
  flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
  """Defines a float flag whose value must be finite and in range (absl's bounds let NaN pass).

  The default `maximum` is the largest float32: the values are used in float32, where a larger
  one is Inf. A flag that is already defined is left as it is.
  """
  if name in flag_values:
    return
  flags.DEFINE_float(name, default, help_text, flag_values=flag_values)

  def validate(value) -> bool:
    if value is None:
      return True
    try:
      checks.check_float(f'--{name}', value, minimum, exclusive_minimum, maximum)
    except (TypeError, ValueError) as e:
      raise flags.ValidationError(str(e)) from None
    return True

  flags.register_validator(name, validate, flag_values=flag_values)


def _define_common() -> None:
  define(
    flags.DEFINE_string,
    'workdir',
    None,
    'Run directory: model_config.json, train_config.json, checkpoints/, tb/, samples. Required.',
  )
  define(
    flags.DEFINE_integer,
    'seed',
    0,
    'Seed of the weights, the data order and every noise draw (stateless, so runs repeat).',
    lower_bound=INT64_MIN,
    upper_bound=INT64_MAX,
  )
  define(
    flags.DEFINE_string,
    'data_dir',
    None,
    'TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets; for the embedded '
    'dataset ~/.cache/tf_denseflow/tfds).',
  )


def define_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.train` (defaults: the CIFAR-10 recipe)."""
  _define_common()

  # Data.
  define(
    flags.DEFINE_string,
    'dataset',
    'cifar10',
    'TFDS name (cifar10, imagenet_resized/32x32, imagenet_resized/64x64, celeb_a), embedded '
    '(32x32 patches of the photos shipped in scikit-learn, built locally), image_dir, or the '
    'path of a prepared TFDS dataset directory.',
  )
  define(
    flags.DEFINE_string,
    'image_dir',
    None,
    'With --dataset=image_dir: a folder holding train/ and test/ image subfolders.',
  )
  define(
    flags.DEFINE_integer,
    'image_size',
    None,
    'Image height = width in pixels (default: the dataset native size); a multiple of '
    '2**len(units_per_block), i.e. of 8 for three blocks.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(flags.DEFINE_bool, 'download', False, 'Let TFDS download and prepare a missing dataset.')
  define(
    flags.DEFINE_bool,
    'skip_bad_images',
    False,
    'With --dataset=image_dir: leave out image files that cannot be decoded (a warning names '
    'each) instead of refusing to start with an error that lists them.',
  )
  define(
    flags.DEFINE_enum,
    'augmentation',
    'eta',
    list(AUGMENTATIONS),
    'Training augmentation: eta = random flip + integer shift (1 px at 32x32, 3 px at 64x64, '
    'edge padding), as the official code; hflip = flip only (CelebA); none.',
  )
  define(
    flags.DEFINE_integer,
    'shuffle_buffer',
    10_000,
    'Shuffle buffer of the training stream, in examples.',
    lower_bound=0,
    upper_bound=INT64_MAX,
  )
  define(
    flags.DEFINE_bool,
    'celeba_center_crop',
    False,
    'CelebA: resize the RealNVP 148x148 centre crop instead of the whole image (official).',
  )
  define(
    flags.DEFINE_integer,
    'embedded_num_train',
    20_000,
    'Training patches of the embedded dataset.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'embedded_num_test',
    2_000,
    'Test patches of the embedded dataset.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )

  # Model.
  define(
    flags.DEFINE_enum,
    'model_preset',
    'denseflow_74_10',
    list(MODEL_PRESETS),
    'Architecture preset of DenseFlowConfig. With a named preset, the model flags given '
    'explicitly (command line or flagfile) override the preset; with custom, every model flag '
    'is used as it stands (their defaults are DenseFlow-74-10).',
  )
  define(
    flags.DEFINE_integer,
    'num_bits',
    8,
    'Bits per sub-pixel the model sees (Glow n_bits_x): the uint8 inputs keep their num_bits '
    'high bits; 8 = the images as they are.',
    lower_bound=1,
    upper_bound=8,
  )
  define(
    flags.DEFINE_list,
    'units_per_block',
    ['6', '4', '1'],
    'Units per dense block (paper: 6,4,1); its length is the number of blocks.',
  )
  define(
    flags.DEFINE_list,
    'steps_per_unit',
    ['5', '6', '20'],
    'Glow steps per unit, per block (paper: 5,6,20).',
  )
  define(
    flags.DEFINE_list,
    'coupling_channels',
    ['48', '48', '48'],
    'Width of the coupling networks, per block (paper: 48).',
  )
  define(
    flags.DEFINE_integer,
    'growth_rate',
    10,
    'Growth rate k: noise channels added per unit (paper: 10).',
    lower_bound=0,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dense_depth',
    7,
    'Conv layers in the dense block of each coupling network (official: 7).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dense_growth',
    64,
    'Channels each dense layer of a coupling network adds (official: 64).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'attention_landmarks',
    4,
    'Nystrom landmarks m of the coupling networks attention (official: 4).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_bool,
    'use_attention',
    True,
    'Include the Nystrom self-attention branch in the coupling networks.',
  )
  define(
    flags.DEFINE_enum,
    'attention_tokens',
    'official',
    list(ATTENTION_TOKENS),
    'official: the raw reshape of the official NCHW buffer (tokens are not pixels); pixel: one '
    'token per pixel.',
  )
  define(
    flags.DEFINE_bool,
    'use_cross_unit_coupling',
    True,
    'Condition the augmentation noise on earlier latents (False: unconditional N(0, I) noise).',
  )
  define(
    flags.DEFINE_bool,
    'cross_unit_include_previous',
    False,
    'Also feed the immediately preceding unit output to the cross-unit coupling (paper text); '
    'False = official code.',
  )
  define(
    flags.DEFINE_enum,
    'squeeze_order',
    'channel_major',
    list(SQUEEZE_ORDERS),
    'Channel order of the 2x2 squeeze: channel_major (official) or space_to_depth (TF).',
  )
  define(
    flags.DEFINE_enum,
    'dequantization',
    'variational',
    list(DEQUANTIZATIONS),
    'Dequantization: variational (the official conditional flow) or uniform.',
  )
  define(
    flags.DEFINE_integer,
    'dequant_steps',
    4,
    'Coupling steps of the variational dequantization flow.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dequant_context_channels',
    64,
    'Context feature channels of the variational dequantization.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dequant_mid_channels',
    64,
    'Coupling network width of the variational dequantization.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dequant_depth',
    4,
    'Dense layers per coupling network of the variational dequantization.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dequant_growth',
    64,
    'Growth of those dense layers.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dequant_context_depth',
    4,
    'Dense layers per context-network dense block of the variational dequantization.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'dequant_context_growth',
    16,
    'Growth of the context-network dense layers.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_enum,
    'coupling_dtype',
    'float32',
    list(COUPLING_DTYPES),
    'Compute dtype of the coupling networks; the bijector math stays float32.',
  )
  define(
    flags.DEFINE_bool,
    'recompute_grad',
    False,
    'Gradient checkpointing of the coupling networks (recompute activations in the backward '
    'pass): less memory, about one more forward pass of compute.',
  )

  # Optimization.
  define(
    flags.DEFINE_integer,
    'global_batch_size',
    64,
    'Images per step over all replicas; must be divisible by the number of replicas.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define_float(
    'learning_rate',
    1e-3,
    'Adamax learning rate after warm-up.',
    exclusive_minimum=True,
    minimum=0.0,
  )
  define_float(
    'adamax_epsilon',
    1e-8,
    'Adamax epsilon (PyTorch default 1e-8; Keras default 1e-7); at least the smallest normal '
    'float32 (1.2e-38): with 0, a zero gradient entry divides 0 by 0.',
    minimum=FLOAT32_TINY,
  )
  define(
    flags.DEFINE_integer,
    'warmup_steps',
    5000,
    'Linear learning-rate warm-up, in steps: lr * min(1, (step + 1) / warmup_steps).',
    lower_bound=0,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_enum,
    'lr_schedule',
    'constant',
    list(LR_SCHEDULES),
    'After warm-up: constant (what the official code effectively runs) or exponential '
    '(lr * lr_decay_gamma ** epoch, what the paper describes).',
  )
  define_float(
    'lr_decay_gamma',
    0.9975,
    'Per-epoch decay factor of --lr_schedule=exponential (official: 0.9975 CIFAR-10, 0.95 others).',
    exclusive_minimum=True,
    minimum=0.0,
    maximum=1.0,
  )
  define(
    flags.DEFINE_integer,
    'steps_per_epoch',
    None,
    'Steps per epoch for the exponential decay (default: ceil(train examples / '
    'global_batch_size)).',
    lower_bound=1,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_integer,
    'train_steps',
    312_800,
    'Steps of the main stage (CIFAR-10: 400 epochs of 782 steps).',
    lower_bound=0,
    upper_bound=MAX_STEPS,
  )
  define_float(
    'finetune_lr',
    2e-5,
    'Constant learning rate of the fine-tune stage that follows the main stage.',
    exclusive_minimum=True,
    minimum=0.0,
  )
  define(
    flags.DEFINE_integer,
    'finetune_steps',
    15_640,
    'Steps of the fine-tune stage (CIFAR-10: 20 epochs); 0 = none.',
    lower_bound=0,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_integer,
    'max_consecutive_nonfinite',
    10,
    'Stop the run after this many steps in a row with a NaN/Inf loss or gradient (each such '
    'step is skipped: no update).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )

  # Devices and compilation.
  define(
    flags.DEFINE_enum,
    'noise_seeding',
    'global_batch',
    list(NOISE_SEEDINGS),
    'global_batch: every replica draws the noise of the whole global batch from (seed, step) '
    'and keeps its slice, so the run does not depend on the number of replicas; per_replica: '
    'fold the replica id into the step seed (cheaper, depends on the replica count).',
  )
  define(
    flags.DEFINE_bool,
    'jit_compile',
    False,
    'XLA-compile the per-replica loss-and-gradient function (GPU or CPU devices; see '
    'docs/benchmarks.md for when it pays off).',
  )
  define(
    flags.DEFINE_integer,
    'steps_per_loop',
    1,
    "Training steps per tf.function call (orbit's inner loop): one host sync per loop, so an "
    'accelerator is not idled by the host every step; intervals are rounded to whole loops.',
    lower_bound=1,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_integer,
    'num_cpu_devices',
    0,
    'Split the CPU into this many logical devices and train on them with MirroredStrategy '
    '(multi-replica runs without GPUs); 0 = all GPUs, or the CPU when there is none.',
    lower_bound=0,
    upper_bound=MAX_CPU_DEVICES,
  )

  # Eval, samples and checkpoints.
  define(
    flags.DEFINE_integer,
    'checkpoint_every',
    2000,
    'Save a checkpoint every this many steps (and always at the end or on interruption).',
    lower_bound=1,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_integer,
    'keep_checkpoints',
    3,
    'Number of most recent checkpoints to keep.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'eval_every',
    7820,
    'Test-split ELBO bits/dim every this many steps (and at the end); 0 = only at the end.',
    lower_bound=0,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_integer,
    'eval_examples',
    None,
    'Test examples per evaluation (default: the whole split; 0 = no evaluation).',
    lower_bound=0,
    upper_bound=INT64_MAX,
  )
  define(
    flags.DEFINE_integer,
    'eval_batch_size',
    None,
    'Global batch of the evaluation (default: --global_batch_size).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'log_every',
    100,
    'Write training scalars (TensorBoard, metrics.jsonl) every this many steps.',
    lower_bound=1,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_integer,
    'sample_every',
    7820,
    'Write a sample grid to TensorBoard every this many steps (and a PNG at the end); 0 = '
    'only at the end.',
    lower_bound=0,
    upper_bound=MAX_STEPS,
  )
  define(
    flags.DEFINE_integer,
    'num_grid_samples',
    64,
    'Samples per grid; 0 = no samples.',
    lower_bound=0,
    upper_bound=INT32_MAX,
  )
  define_float(
    'sample_temperature',
    1.0,
    'Temperature of the sample grids (std of the latents; the official sampler uses 1).',
    minimum=0.0,
  )
  define(
    flags.DEFINE_bool,
    'export',
    False,
    'After training, export a SavedModel for TF Serving to --export_dir (default: WORKDIR/export).',
  )
  define(
    flags.DEFINE_string,
    'export_dir',
    None,
    'Export a SavedModel here after training (implies --export); versions are EXPORT_DIR/N.',
  )
  define(flags.DEFINE_bool, 'progress_bar', True, 'Show a tqdm progress bar.')


def define_evaluate_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.evaluate`."""
  _define_common()
  define(
    flags.DEFINE_integer,
    'num_samples',
    1000,
    'Importance samples K of the IWBO (official: 1000 CIFAR-10, 200 others); 1 = the ELBO.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'batch_size',
    64,
    'Test images per batch (official: 64).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'chunk_size',
    50,
    'Importance samples evaluated together: the batch is tiled this many times (official kbs: '
    '50 at 32x32, 25 at 64x64).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'max_examples',
    None,
    'Evaluate only the first this many examples of the split (default: all).',
    lower_bound=1,
    upper_bound=INT64_MAX,
  )
  define(flags.DEFINE_enum, 'split', 'test', ['test', 'train'], 'Split to evaluate.')
  define(
    flags.DEFINE_string,
    'dataset',
    None,
    'Dataset to evaluate on (default: the one in WORKDIR/train_config.json).',
  )
  define(
    flags.DEFINE_integer,
    'image_size',
    None,
    'Image size of --dataset (default: the run or dataset size).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_string,
    'checkpoint',
    None,
    'Checkpoint prefix (default: the latest in WORKDIR/checkpoints).',
  )
  define(
    flags.DEFINE_string,
    'output',
    None,
    'JSON result file (default: WORKDIR/eval_<split>_k<K>.json).',
  )
  define(flags.DEFINE_bool, 'progress_bar', True, 'Show a tqdm progress bar.')


def define_sample_flags() -> None:
  """Defines the flags of `python -m tf_denseflow.sample`."""
  _define_common()
  define(
    flags.DEFINE_integer,
    'num',
    64,
    'Number of samples in the grid.',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define_float(
    'temperature',
    1.0,
    'Std of the latents (paper samples reportedly at 0.8).',
    minimum=0.0,
  )
  define(
    flags.DEFINE_integer,
    'columns',
    None,
    'Images per grid row (default: about sqrt(num)).',
    lower_bound=1,
    upper_bound=INT32_MAX,
  )
  define(
    flags.DEFINE_string,
    'out',
    None,
    'PNG path of the grid (default: WORKDIR/samples_t<T>_seed<S>.png).',
  )
  define(
    flags.DEFINE_string,
    'checkpoint',
    None,
    'Checkpoint prefix (default: the latest in WORKDIR/checkpoints).',
  )


def fail(message: str, code: int = 2) -> None:
  """Ends an entry point with one `error: ...` line on stderr (exit 2: bad flags or input).

  Every program (train, evaluate, sample, export, convert_torch, bench) ends this way on bad
  input; the message is folded onto one line.
  """
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> List[str]:
  """absl's flags parser for `app.run(..., flags_parser=...)`: `fail` on a bad flag."""
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    fail(str(e))


def explicitly_set(flag_values: flags.FlagValues, name: str) -> bool:
  """Whether `name` was given on the command line, in a flagfile or set by a test."""
  return name in flag_values and not flag_values[name].using_default_value


def optional_value(flag_values: flags.FlagValues, name: str, default: Optional[Any] = None) -> Any:
  """The flag's value if it is defined, else `default`."""
  return flag_values[name].value if name in flag_values else default
