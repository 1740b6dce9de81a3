"""Image folders (`dataset='image_dir'`): listing the files of each split and checking them.

Every `.png`/`.jpg`/`.jpeg` file of both splits is read and fully decoded once, with the decoder
the pipeline uses (`tf.io.decode_image`), in parallel threads (about a millisecond per small
image; the result is cached per file, path + size + mtime, so the pipelines built afterwards do
not decode again). Unreadable, empty (0-byte), truncated or corrupt files and files that are not
images at all are listed (the first 10 and a count, with the reason for each);
`skip_bad_images=True` leaves them out instead, with a warning naming each. An empty split (or
one left empty by skipping) is refused too.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from concurrent import futures

import tensorflow as tf
from absl import logging

from tf_denseflow.data.config import IMAGE_EXTENSIONS, SPLITS, BadDataError, DatasetNotFoundError

__all__ = ['check_image_dir', 'first_image_size', 'list_image_dir']

_MAX_LISTED = 10  # bad files named in the error message (all are logged)
_FILE_CHECKS: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime) -> why bad
_WARNED: set[str] = set()  # warnings already given (skipped files, ignored files)


def list_image_dir(image_dir: str) -> dict[str, tuple[str, ...]]:
  """The sorted image files (by extension) of each split of an image folder.

  Args:
    image_dir: folder with `train/` and `test/` subfolders.

  Returns:
    `{'train': paths, 'test': paths}`.

  Raises:
    DatasetNotFoundError: a missing folder or split folder, or a split without image files.
  """
  root = os.path.expanduser(image_dir)
  if not tf.io.gfile.isdir(root):
    raise DatasetNotFoundError(f'`image_dir` {image_dir!r} is not an existing directory.')
  files = {}
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
      raise DatasetNotFoundError(
        f'`image_dir` {image_dir!r} has no {split}/ subfolder; expected {split}/ with PNG or '
        'JPEG files (any nesting) for each of train/ and test/.'
      )
    found, others = [], []
    for dirpath, _, filenames in tf.io.gfile.walk(split_dir):
      for filename in filenames:
        path = os.path.join(dirpath, filename)
        (found if filename.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
    others.sort()
    if not found:
      held = f' (it holds {len(others)} other files, e.g. {others[0]!r})' if others else ''
      raise DatasetNotFoundError(
        f'`image_dir` {image_dir!r}: {split}/ contains no image files {IMAGE_EXTENSIONS}{held}.'
      )
    if others and _warn_once(f'ignored:{split_dir}'):
      logging.warning(
        'Ignoring %d files of %s without an image extension %s, e.g. %s.',
        len(others),
        split_dir,
        IMAGE_EXTENSIONS,
        others[0],
      )
    files[split] = tuple(sorted(found))
  return files


def check_image_dir(
  image_dir: str, files: dict[str, tuple[str, ...]], skip_bad: bool
) -> dict[str, tuple[str, ...]]:
  """The files of `files` that decode into images; refuses (or skips) the others, named.

  Args:
    image_dir: the folder (for messages).
    files: `list_image_dir(image_dir)`.
    skip_bad: leave bad files out (a warning names each) instead of refusing them.

  Returns:
    `files` without the bad files.

  Raises:
    BadDataError: bad files (the first 10 named, and a count) unless `skip_bad`, or a split
      with no decodable file.
  """
  paths = [path for split in SPLITS for path in files[split]]
  results = _check_image_files(paths)
  bad = [(path, results[path]) for path in paths if results[path] is not None]
  root = os.path.expanduser(image_dir)
  if bad and not skip_bad:
    if len(bad) > _MAX_LISTED:  # the message names the first ones; the log names them all
      for path, reason in bad:
        logging.error('Bad image file %s: %s', path, reason)
    listed = '; '.join(f'{_relative(path, root)}: {reason}' for path, reason in bad[:_MAX_LISTED])
    more = len(bad) - _MAX_LISTED
    listed += f'; and {more} more (all in the log)' if more > 0 else ''
    raise BadDataError(
      f'{len(bad)} of the {len(paths)} image files in image_dir {image_dir!r} cannot be decoded '
      f'into images: {listed}. Fix or remove them, or pass --skip_bad_images '
      '(`skip_bad_images=True`) to leave them out.'
    )
  for path, reason in bad:
    if _warn_once(f'skip:{path}:{reason}'):
      logging.warning('Skipping bad image file %s: %s', path, reason)
  good = {}
  for split in SPLITS:
    good[split] = tuple(path for path in files[split] if results[path] is None)
    if not good[split]:
      first = files[split][0]
      raise BadDataError(
        f'`image_dir` {image_dir!r}: none of the {len(files[split])} image files of {split}/ '
        f'can be decoded, so skip_bad_images leaves none; first: {_relative(first, root)}: '
        f'{results[first]}.'
      )
  return good


def first_image_size(paths: Sequence[str]) -> int:
  """Side of the first image whose header Pillow reads (`image_size=None` for `image_dir`).

  Args:
    paths: image files, in order.

  Returns:
    The side of the first readable image.

  Raises:
    BadDataError: no readable header, or a non-square first image.
  """
  from PIL import Image

  for path in paths:
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        width, height = Image.open(f).size
      break
    except (OSError, ValueError, Image.DecompressionBombError, tf.errors.OpError):
      continue
  else:
    raise BadDataError(
      f'`image_size` is None and none of the {len(paths)} train images of image_dir has a '
      f'readable header (first: {paths[0]!r}); set `image_size`, and see data.check_data.'
    )
  if width != height:
    raise BadDataError(
      f'`image_size` is None but the images in image_dir are not square (first one, {path!r}, '
      f'is {width}x{height}); set `image_size`.'
    )
  return width


def _check_image_files(paths: Sequence[str]) -> dict[str, str | None]:
  """`{path: why it is bad, or None}`, from the cache or a full decode."""
  keys = {}
  for path in paths:
    try:
      stat = tf.io.gfile.stat(path)
      keys[path] = (path, stat.length, stat.mtime_nsec)
    except tf.errors.OpError:
      keys[path] = (path, -1, -1)  # unreadable or a dangling link: _check_image_file says why
  todo = [path for path in paths if keys[path] not in _FILE_CHECKS]
  if todo:
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
      for path, result in zip(todo, pool.map(_check_image_file, todo)):
        _FILE_CHECKS[keys[path]] = result
    logging.info('Decoded %d image files in %.1f s.', len(todo), time.perf_counter() - start)
  return {path: _FILE_CHECKS[keys[path]] for path in paths}


def _check_image_file(path: str) -> str | None:
  """Reads and decodes one file as the pipeline does: why it is bad, or None."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      contents = f.read()
  except (tf.errors.OpError, OSError) as e:
    return f'cannot be read ({_error_text(e)})'
  if not contents:
    return 'empty file (0 bytes)'
  try:
    with tf.device('/CPU:0'):
      image = tf.io.decode_image(contents, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    kind = _image_format(contents)
    if kind is None:
      return f'not an image (not JPEG, PNG, GIF, BMP or WebP; it starts with {contents[:8]!r})'
    return f'truncated or corrupt {kind} ({_error_text(e)})'
  height, width, channels = image.shape
  if image.dtype != tf.uint8 or channels != 3 or not height or not width:
    return f'decodes to {image.dtype.name} {image.shape}, not an RGB image'
  return None


def _image_format(contents: bytes) -> str | None:
  """The image format named by the file's first bytes (for the message of a failed decode)."""
  if contents.startswith(b'\xff\xd8\xff'):
    return 'JPEG'
  if contents.startswith(b'\x89PNG'):
    return 'PNG'
  if contents.startswith((b'GIF87a', b'GIF89a')):
    return 'GIF'
  if contents.startswith(b'BM'):
    return 'BMP'
  if contents.startswith(b'RIFF') and contents[8:12] == b'WEBP':
    return 'WebP'
  return None


def _error_text(error: Exception) -> str:
  """A TF or OS error as one short line (without TF's function-node and op decorations)."""
  text = error.message if isinstance(error, tf.errors.OpError) else str(error)
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]', '', text)
  return ' '.join(text.split()) or type(error).__name__


def _relative(path: str, root: str) -> str:
  return path[len(root) :].lstrip('/') if path.startswith(root) else path


def _warn_once(key: str) -> bool:
  """True the first time `key` is seen in this process."""
  if key in _WARNED:
    return False
  _WARNED.add(key)
  return True
