"""Flags generated from config dataclasses: every hyper-parameter is written once, in its config.

A config field declared with `hparam(default, help, ...)` carries its flag in its metadata: the
help text, the choices of a string, the bounds of a number. `define_from_dataclass` turns such
fields into absl flags (the flag default is the field default, so the two cannot drift),
`values_from_flags` reads them back as the config's keyword arguments, and `check_fields` checks a
config instance against the same bounds (the error names `--flag`):

```
field type           flag                     checked
bool                 DEFINE_bool              -
str with choices     DEFINE_enum              one of the choices
str, Optional[str]   DEFINE_string            -
int, Optional[int]   DEFINE_integer           minimum .. maximum (default INT32_MAX)
float                define_float             finite, minimum .. maximum (default FLOAT32_MAX)
Tuple[int, ...]      DEFINE_list              a comma-separated list of ints
```
Only entry points call `define_from_dataclass` (through `flags.py`); library code never reads
`FLAGS`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from absl import flags

from tf_denseflow import checks
from tf_denseflow.checks import FLOAT32_MAX, INT32_MAX

__all__ = [
  'check_fields',
  'define_float',
  'define_from_dataclass',
  'field_kind',
  'flag_fields',
  'hparam',
  'values_from_flags',
]


def hparam(
  default: Any,
  help: str,  # noqa: A002 -- the flag's help text, named as absl names it
  *,
  choices: Optional[Sequence[str]] = None,
  minimum: Optional[float] = None,
  maximum: Optional[float] = None,
  exclusive_minimum: bool = False,
) -> Any:
  """A dataclass field that is also a flag of the same name (see the module docstring).

  Args:
    default: the field default, and so the flag default (a tuple default becomes a list flag).
    help: the flag's help text.
    choices: the allowed strings (an enum flag).
    minimum: smallest allowed number (`exclusive_minimum`: strictly larger).
    maximum: largest allowed number (default: INT32_MAX for an int flag, FLOAT32_MAX for a
      float one; a config's own check may leave an int unbounded, `None`).
  """
  metadata = {
    'help': help,
    'choices': tuple(choices) if choices is not None else None,
    'minimum': minimum,
    'maximum': maximum,
    'exclusive_minimum': exclusive_minimum,
  }
  return dataclasses.field(default=default, metadata=metadata)


def _is_hparam(field: dataclasses.Field) -> bool:
  return 'help' in field.metadata


def field_kind(cls: type, field: dataclasses.Field) -> str:
  """The flag kind of an `hparam` field: one of 'bool', 'enum', 'string', 'integer', 'float',
  'int_list' (from its type annotation, `Optional[...]` unwrapped)."""
  hint = typing.get_type_hints(cls)[field.name]
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1:
      hint = args[0]
  if hint is bool:
    return 'bool'
  if hint is str:
    return 'enum' if field.metadata.get('choices') else 'string'
  if hint is int:
    return 'integer'
  if hint is float:
    return 'float'
  if typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (int,):
    return 'int_list'
  raise TypeError(f'{cls.__name__}.{field.name}: no flag for the type {hint!r}.')


def flag_fields(
  cls: type, renames: Optional[Mapping[str, str]] = None, exclude: Iterable[str] = ()
) -> Dict[str, str]:
  """`{flag name: field name}` of the `hparam` fields of `cls`, in field order.

  Args:
    cls: a dataclass.
    renames: `{field name: flag name}` where the two differ.
    exclude: field names that get no flag (e.g. one defined elsewhere with another meaning).
  """
  renames = dict(renames or {})
  exclude = set(exclude)
  return {
    renames.get(f.name, f.name): f.name
    for f in dataclasses.fields(cls)
    if _is_hparam(f) and f.name not in exclude
  }


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


def define_from_dataclass(
  cls: type,
  *,
  renames: Optional[Mapping[str, str]] = None,
  exclude: Iterable[str] = (),
  only: Optional[Iterable[str]] = None,
  flag_values: flags.FlagValues = flags.FLAGS,
) -> List[str]:
  """Defines a flag for every `hparam` field of `cls`; returns the flag names.

  A flag that is already defined is left as it is (programs share flags; tests define several
  programs' flags in one process).

  Args:
    cls: a dataclass whose flag fields are declared with `hparam`.
    renames: `{field name: flag name}` where the two differ.
    exclude: field names that get no flag.
    only: if given, just these field names.
    flag_values: where to define them.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  names = flag_fields(cls, renames, exclude)
  if only is not None:
    only = set(only)
    names = {flag: field for flag, field in names.items() if field in only}
  for flag_name, field_name in names.items():
    if flag_name in flag_values:
      continue
    field = fields[field_name]
    meta = field.metadata
    kind = field_kind(cls, field)
    default = field.default
    if kind == 'bool':
      flags.DEFINE_bool(flag_name, default, meta['help'], flag_values=flag_values)
    elif kind == 'enum':
      flags.DEFINE_enum(
        flag_name, default, list(meta['choices']), meta['help'], flag_values=flag_values
      )
    elif kind == 'string':
      flags.DEFINE_string(flag_name, default, meta['help'], flag_values=flag_values)
    elif kind == 'integer':
      maximum = INT32_MAX if meta['maximum'] is None else meta['maximum']
      flags.DEFINE_integer(
        flag_name,
        default,
        meta['help'],
        lower_bound=meta['minimum'],
        upper_bound=maximum,
        flag_values=flag_values,
      )
    elif kind == 'float':
      define_float(
        flag_name,
        default,
        meta['help'],
        minimum=meta['minimum'],
        exclusive_minimum=meta['exclusive_minimum'],
        maximum=FLOAT32_MAX if meta['maximum'] is None else meta['maximum'],
        flag_values=flag_values,
      )
    else:  # int_list
      flags.DEFINE_list(flag_name, [str(v) for v in default], meta['help'], flag_values=flag_values)
  return list(names)


def values_from_flags(
  cls: type,
  flag_values: flags.FlagValues,
  *,
  renames: Optional[Mapping[str, str]] = None,
  exclude: Iterable[str] = (),
  explicit_only: bool = False,
) -> Dict[str, Any]:
  """The `hparam` fields of `cls` read from parsed flags, as keyword arguments of `cls`.

  Fields whose flag is not defined in `flag_values` are left out (the dataclass default holds).

  Args:
    cls: the dataclass.
    flag_values: parsed flags.
    renames: `{field name: flag name}` where the two differ.
    exclude: field names to leave out.
    explicit_only: only the flags given explicitly (command line, flagfile, or set by a test).

  Raises:
    ValueError: a list flag holds something other than ints (the message names the flag).
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  values = {}
  for flag_name, field_name in flag_fields(cls, renames, exclude).items():
    if flag_name not in flag_values:
      continue
    if explicit_only and flag_values[flag_name].using_default_value:
      continue
    value = flag_values[flag_name].value
    if field_kind(cls, fields[field_name]) == 'int_list' and value is not None:
      try:
        value = tuple(int(v) for v in value)
      except ValueError:
        raise ValueError(f'--{flag_name} must be a comma-separated list of ints.') from None
    values[field_name] = value
  return values


def check_fields(config: Any, error: type = ValueError) -> None:
  """Checks the `hparam` fields of a dataclass instance against their choices and bounds.

  `None` passes for a field whose default is `None`; an int without a `maximum` is bounded by
  INT32_MAX, a float by FLOAT32_MAX (the flags' ranges). Messages name `--field`.

  Raises:
    error: the first bad value (a `ValueError` subclass, e.g. a config's `ConfigError`).
  """
  cls = type(config)
  for field in dataclasses.fields(cls):
    if not _is_hparam(field):
      continue
    meta, name = field.metadata, f'--{field.name}'
    value = getattr(config, field.name)
    if value is None and field.default is None:
      continue
    kind = field_kind(cls, field)
    try:
      if kind == 'enum' and value not in meta['choices']:
        raise ValueError(f'{name} must be one of {meta["choices"]}, got {value!r}.')
      if kind == 'integer':
        maximum = INT32_MAX if meta['maximum'] is None else meta['maximum']
        checks.check_int(name, value, meta['minimum'], maximum)
      if kind == 'float':
        maximum = FLOAT32_MAX if meta['maximum'] is None else meta['maximum']
        checks.check_float(name, value, meta['minimum'], meta['exclusive_minimum'], maximum)
    except (TypeError, ValueError) as e:
      raise error(str(e)) from None
