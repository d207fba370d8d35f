"""Figures of an evaluation, drawn with PIL: a retrieval grid and the Recall@K curve."""

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_CORRECT = (40, 170, 60)
_WRONG = (210, 40, 40)
_QUERY = (60, 90, 200)
_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)
_GRID_LINE = (225, 225, 225)


def retrieval_grid(query_images: np.ndarray, result_images: np.ndarray, correct: np.ndarray, *,
                   cell: int = 72, border: int = 4) -> Image.Image:
  """One row per query: the query (blue frame), a gap, then its nearest results framed green when they
  share the query's label and red otherwise.

  Args:
    query_images: [Q, H, W, 3] uint8; result_images: [Q, R, H, W, 3] uint8, nearest first;
    correct: [Q, R] bool.
    cell: side in pixels of each framed image; border: frame width.
  """
  num_queries, num_results = correct.shape
  gap = cell // 2
  grid = Image.new("RGB", ((num_results + 1) * cell + gap, num_queries * cell), _BACKGROUND)
  inner = cell - 2 * border - 2

  def paste(image, colour, left, top):
    ImageDraw.Draw(grid).rectangle([left + 1, top + 1, left + cell - 2, top + cell - 2], fill=colour)
    resized = Image.fromarray(np.asarray(image, np.uint8)).resize((inner, inner), Image.NEAREST)
    grid.paste(resized, (left + border + 1, top + border + 1))

  for row in range(num_queries):
    paste(query_images[row], _QUERY, 0, row * cell)
    for col in range(num_results):
      colour = _CORRECT if correct[row, col] else _WRONG
      paste(result_images[row, col], colour, cell + gap + col * cell, row * cell)
  return grid


def recall_curve(ks: Sequence[int], recalls: Sequence[float], *, title: str = "Recall@K",
                 size: tuple = (480, 320)) -> Image.Image:
  """Recall@K [0, 1] against K, the Ks evenly spaced and labelled, each point with its value."""
  width, height = size
  left, right, top, bottom = 48, 24, 32, 40
  image = Image.new("RGB", size, _BACKGROUND)
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()

  def y_of(recall):
    return top + (1 - recall) * (height - top - bottom)

  def x_of(i):
    return left + (i + 0.5) * (width - left - right) / len(ks)

  for tick in np.linspace(0, 1, 6):
    y = y_of(tick)
    draw.line([left, y, width - right, y], fill=_GRID_LINE)
    draw.text((left - 6, y), f"{tick:.1f}", fill=_INK, font=font, anchor="rm")
  draw.line([left, top, left, height - bottom, width - right, height - bottom], fill=_INK)
  points = [(x_of(i), y_of(r)) for i, r in enumerate(recalls)]
  if len(points) > 1:
    draw.line(points, fill=_QUERY, width=2)
  for k, recall, (x, y) in zip(ks, recalls, points):
    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_QUERY)
    draw.text((x, y - 6), f"{recall:.3f}", fill=_INK, font=font, anchor="mb")
    draw.text((x, height - bottom + 6), str(k), fill=_INK, font=font, anchor="mt")
  draw.text((width / 2, 6), title, fill=_INK, font=font, anchor="mt")
  draw.text((width / 2, height - 6), "K", fill=_INK, font=font, anchor="mb")
  return image
