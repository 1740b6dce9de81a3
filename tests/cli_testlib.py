"""Feeds bad command lines to a program's entry point, many in one fresh interpreter.

Each case runs the program's flag parser and `main` exactly as `app.run` calls them (the
parser given to `app.run(main, flags_parser=...)`), with `SystemExit` caught and stderr
captured, so one subprocess (one TensorFlow import) checks every case of a program.
"""

import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = r"""
import contextlib, importlib, io, json, sys, traceback
from absl import flags

spec = json.loads(sys.argv[1])
def load(name):
  module, attr = name.split(':')
  return getattr(importlib.import_module(module), attr)

load(spec['define'])()
parse, main = load(spec['parser']), load(spec['main'])
results = []
for args in spec['cases']:
  flags.FLAGS.unparse_flags()
  err, out = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      main(parse([spec['main'], *args]))
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
      code = 'exception'
      traceback.print_exc()
  results.append({'code': code, 'stderr': err.getvalue(), 'stdout': out.getvalue()})
print(json.dumps(results))
"""


def run_cases(define, parser, main, cases, timeout=240):
  """Runs `main(parser([prog, *args]))` for each `args` in `cases`; returns their results.

  Args:
    define: 'module:function' that defines the program's flags.
    parser: 'module:function', the program's absl flags parser.
    main: 'module:function', the program's main.
    cases: lists of command-line arguments.
    timeout: seconds for the whole subprocess.

  Returns:
    One dict per case: `code` (exit status, or 'exception'), `stderr`, `stdout`.
  """
  spec = {'define': define, 'parser': parser, 'main': main, 'cases': [list(c) for c in cases]}
  proc = subprocess.run(
    [sys.executable, '-c', _DRIVER, json.dumps(spec)],
    cwd=_REPO,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES=''),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if proc.returncode != 0:
    raise AssertionError(f'driver failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_line_error(test, result, needle, code=2):
  """Exit status `code`, no traceback, exactly one `error: ...` line, which contains `needle`."""
  stderr = result['stderr']
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  test.assertEqual(result['code'], code, stderr)
  test.assertNotIn('Traceback', stderr)
  test.assertLen(errors, 1, stderr)
  test.assertIn(needle, errors[0])
