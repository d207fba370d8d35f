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


_SERIES_COLOURS = (_QUERY, (230, 130, 20), _CORRECT, _WRONG, (130, 60, 170))


def line_chart(series: dict, *, title: str, size: tuple = (640, 260)) -> Image.Image:
  """Each named series {name: (x [n], y [n])} as a line with dots, in its own colour, against shared
  axes fitted to all of them; a legend of the names under the title."""
  width, height = size
  left, right, top, bottom = 56, 24, 44, 32
  image = Image.new("RGB", size, _BACKGROUND)
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
  ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
  x_low, x_high = xs.min(), max(xs.max(), xs.min() + 1)
  y_low, y_high = min(ys.min(), 0.0), ys.max() if ys.max() > min(ys.min(), 0.0) else 1.0

  def point(x, y):
    return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
            top + (y_high - y) / (y_high - y_low) * (height - top - bottom))

  for tick in np.linspace(y_low, y_high, 5):
    _, y = point(x_low, tick)
    draw.line([left, y, width - right, y], fill=_GRID_LINE)
    draw.text((left - 6, y), f"{tick:.3g}", fill=_INK, font=font, anchor="rm")
  for tick in np.linspace(x_low, x_high, 5):
    x, _ = point(tick, y_low)
    draw.text((x, height - bottom + 6), f"{tick:.0f}", fill=_INK, font=font, anchor="mt")
  draw.line([left, top, left, height - bottom, width - right, height - bottom], fill=_INK)
  legend_x = left
  for (name, (x, y)), colour in zip(series.items(), _SERIES_COLOURS):
    points = [point(a, b) for a, b in zip(x, y)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for px, py in points:
      draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    draw.rectangle([legend_x, 24, legend_x + 10, 32], fill=colour)
    draw.text((legend_x + 14, 28), name, fill=_INK, font=font, anchor="lm")
    legend_x += 24 + int(draw.textlength(name, font=font))
  draw.text((width / 2, 6), title, fill=_INK, font=font, anchor="mt")
  draw.text((width / 2, height - 4), "step", fill=_INK, font=font, anchor="mb")
  return image
