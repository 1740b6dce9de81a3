"""The patch recipe of the embedded dataset: squares cut from the scikit-learn sample photos.

Each photo is cut into a 4x5 grid of blocks; 5 blocks (one per column) give test patches, the
other 15 train patches, so no test patch shares a pixel with a train patch. Patch positions and
zooms are drawn from a seeded NumPy generator, so the same arguments give the same patches.
`tf_denseflow.data.embedded` stores them as a TFDS dataset.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ['embedded_patch_boxes', 'embedded_patches', 'embedded_regions']

_MAX_ZOOM = 3.0  # patches are crops of 1x..3x the patch side, area-downscaled
_GRID = (4, 5)  # blocks per photo (rows, columns); see embedded_regions


def embedded_regions(height: int, width: int) -> dict[str, list[tuple[int, int, int, int]]]:
  """The disjoint blocks of a photo that train and test patches are cut from.

  The photo is cut into a 4x5 grid (rows x columns) of blocks. One block per column, on the
  diagonal `row = column % 4`, is a test block (5 of 20, spread over every row and column so
  that test patches show the same kinds of content as train patches); the others are train
  blocks. Every patch lies inside a single block.

  Args:
    height: photo height.
    width: photo width.

  Returns:
    `{'train': boxes, 'test': boxes}`, lists of half-open boxes `(top, left, bottom, right)`.
  """
  num_rows, num_cols = _GRID
  rows = np.linspace(0, height, num_rows + 1).round().astype(int).tolist()
  cols = np.linspace(0, width, num_cols + 1).round().astype(int).tolist()
  regions = {'train': [], 'test': []}
  for c in range(num_cols):
    for r in range(num_rows):
      split = 'test' if r == c % num_rows else 'train'
      regions[split].append((rows[r], cols[c], rows[r + 1], cols[c + 1]))
  return regions


def embedded_patch_boxes(
  image_size: int = 32,
  num_train: int = 20_000,
  num_test: int = 2_000,
  seed: int = 0,
  photo_shapes: list[tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
  """Source squares of the embedded patches (deterministic in the arguments).

  Patch `i` of a split comes from photo `i % num_photos`, from a block of its split
  (`embedded_regions`) drawn uniformly, at a uniform position inside that block. Its square has
  side `round(image_size * zoom)`, `zoom` log-uniform in `[1, max_zoom]`, `max_zoom <= 3` chosen
  so that the square fits every block (train and test see the same zooms).

  Args:
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: seed of the blocks, positions and zooms (train and test draw independent streams).
    photo_shapes: `(height, width)` per photo; default: the scikit-learn sample photos.

  Returns:
    `{'train': boxes, 'test': boxes}`, int64 `[N, 4]` rows `(photo, top, left, side)`.

  Raises:
    ValueError: non-positive sizes, or patches larger than the smallest block.
  """
  if image_size <= 0 or num_train <= 0 or num_test <= 0:
    raise ValueError(
      'embedded dataset: image_size, num_train and num_test must be positive, got '
      f'{image_size}, {num_train}, {num_test}.'
    )
  if photo_shapes is None:
    photo_shapes = [photo.shape[:2] for photo in _sample_photos()]
  regions = [embedded_regions(h, w) for h, w in photo_shapes]
  max_side = min(
    min(bottom - top, right - left)
    for photo_regions in regions
    for blocks in photo_regions.values()
    for top, left, bottom, right in blocks
  )
  if image_size > max_side:
    raise ValueError(
      f'embedded dataset: image_size={image_size} is larger than the photo blocks allow '
      f'(at most {max_side}).'
    )
  max_zoom = min(_MAX_ZOOM, max_side / image_size)
  boxes = {}
  for split_index, (split, count) in enumerate((('train', num_train), ('test', num_test))):
    rng = np.random.default_rng([seed, split_index])
    blocks = np.array([photo_regions[split] for photo_regions in regions])  # [P, blocks, 4]
    photo = np.arange(count) % len(photo_shapes)
    bounds = blocks[photo, rng.integers(0, blocks.shape[1], count)]  # [N, 4]
    zoom = np.exp(rng.uniform(0.0, math.log(max_zoom), count))
    side = np.clip(np.round(image_size * zoom), image_size, max_side).astype(np.int64)
    free = bounds[:, 2:] - bounds[:, :2] - side[:, None] + 1  # positions per axis
    corner = bounds[:, :2] + np.floor(rng.uniform(size=[count, 2]) * free).astype(np.int64)
    boxes[split] = np.stack([photo, corner[:, 0], corner[:, 1], side], axis=1).astype(np.int64)
  return boxes


def embedded_patches(
  image_size: int = 32, num_train: int = 20_000, num_test: int = 2_000, seed: int = 0
) -> dict[str, np.ndarray]:
  """Cuts the embedded dataset's patches (see `embedded_patch_boxes`) from the photos.

  Each square is cropped, then area-downscaled (PIL box filter) to `image_size`, so a patch only
  ever sees pixels of its own region.

  Args:
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: seed of the positions and zooms.

  Returns:
    `{'train': images, 'test': images}`, uint8 `[N, image_size, image_size, 3]`.

  Raises:
    ValueError: as `embedded_patch_boxes`.
  """
  from PIL import Image

  photos = _sample_photos()
  boxes = embedded_patch_boxes(
    image_size, num_train, num_test, seed, photo_shapes=[p.shape[:2] for p in photos]
  )
  patches = {}
  for split, split_boxes in boxes.items():
    out = np.empty([len(split_boxes), image_size, image_size, 3], np.uint8)
    for i, (photo, top, left, side) in enumerate(split_boxes):
      crop = photos[photo][top : top + side, left : left + side]
      if side != image_size:
        crop = np.asarray(Image.fromarray(crop).resize((image_size, image_size), Image.BOX))
      out[i] = crop
    patches[split] = out
  return patches


def _sample_photos() -> list[np.ndarray]:
  """The scikit-learn sample photos (china.jpg, flower.jpg), uint8 `[427, 640, 3]`."""
  from sklearn.datasets import load_sample_images

  return [np.asarray(photo, np.uint8) for photo in load_sample_images().images]
