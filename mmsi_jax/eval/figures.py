"""Figures: the retrieval grid of an evaluation (PIL), its Recall@K curve and the comparison of several
runs (matplotlib figures, saved with `figure.savefig(path)`)."""

from typing import Sequence

import matplotlib
from matplotlib.figure import Figure
import numpy as np
from PIL import Image, ImageDraw, ImageFont

_CORRECT = (40, 170, 60)
_WRONG = (210, 40, 40)
_QUERY = (60, 90, 200)
_BACKGROUND = (255, 255, 255)


_LINE = 14  # Height in pixels of a line of text in the grid's header.
_LEGEND = (("query", _QUERY), ("same class", _CORRECT), ("other class", _WRONG))


def retrieval_grid(query_images: np.ndarray, result_images: np.ndarray, correct: np.ndarray, *,
                   title: str = "", cell: int = 72, border: int = 4) -> Image.Image:
  """A header (the title, then a legend of the frame colours) over one row per query: the query (blue
  frame), a gap, then its nearest results framed green when they share the query's label and red
  otherwise.

  Args:
    query_images: [Q, H, W, 3] uint8; result_images: [Q, R, H, W, 3] uint8, nearest first;
    correct: [Q, R] bool.
    title: the header's first line (e.g. the run and the step); "": the legend alone.
    cell: side in pixels of each framed image; border: frame width.
  """
  num_queries, num_results = correct.shape
  gap = cell // 2
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  legend_width = sum(_LINE + 4 + measure.textlength(name, font=font) + 12 for name, _ in _LEGEND)
  header = _LINE * (2 if title else 1) + 6
  width = max((num_results + 1) * cell + gap, int(legend_width) + 8,
              int(measure.textlength(title, font=font)) + 8)
  grid = Image.new("RGB", (width, header + num_queries * cell), _BACKGROUND)
  draw = ImageDraw.Draw(grid)
  if title:
    draw.text((4, 3), title, fill=(0, 0, 0), font=font)
  left, top = 4, header - _LINE - 1
  for name, colour in _LEGEND:
    draw.rectangle([left, top + 2, left + _LINE - 4, top + _LINE - 2], fill=colour)
    draw.text((left + _LINE, top + 1), name, fill=(0, 0, 0), font=font)
    left += _LINE + 4 + int(measure.textlength(name, font=font)) + 12
  inner = cell - 2 * border - 2

  def paste(image, colour, left, top):
    ImageDraw.Draw(grid).rectangle([left + 1, top + 1, left + cell - 2, top + cell - 2], fill=colour)
    resized = Image.fromarray(np.asarray(image, np.uint8)).resize((inner, inner), Image.NEAREST)
    grid.paste(resized, (left + border + 1, top + border + 1))

  for row in range(num_queries):
    paste(query_images[row], _QUERY, 0, header + row * cell)
    for col in range(num_results):
      colour = _CORRECT if correct[row, col] else _WRONG
      paste(result_images[row, col], colour, cell + gap + col * cell, header + row * cell)
  return grid


def recall_curve(ks: Sequence[int], recalls: Sequence[float], *, title: str = "Recall@K") -> Figure:
  """Recall@K [0, 1] against K, the Ks evenly spaced and labelled, each point with its value."""
  figure = Figure(figsize=(4.8, 3.2), dpi=100)
  ax = figure.subplots()
  positions = np.arange(len(ks))
  ax.plot(positions, recalls, marker="o", color=_colour(_QUERY))
  for x, recall in zip(positions, recalls):
    ax.annotate(f"{recall:.3f}", (x, recall), textcoords="offset points", xytext=(0, 5), ha="center",
                fontsize=8)
  ax.set_xticks(positions, [str(k) for k in ks])
  ax.set(xlim=(-0.5, len(ks) - 0.5), ylim=(0, 1.05), xlabel="K", ylabel="Recall@K", title=title)
  ax.grid(alpha=0.3)
  figure.tight_layout()
  return figure


def training_curves(curves: dict[str, tuple], *, metric: str) -> Figure:
  """One line per name: the mean of `metric` over seeds against the training step, in a +-sd band.

  Args:
    curves: name -> (steps [T], mean [T], sd [T]).
  """
  figure = Figure(figsize=(8, 5), dpi=120)
  ax = figure.subplots()
  for colour, (name, (steps, mean, sd)) in zip(_palette(len(curves)), curves.items()):
    mean, sd = np.asarray(mean), np.asarray(sd)
    ax.plot(steps, mean, marker="o", markersize=3, color=colour, label=name)
    ax.fill_between(steps, mean - sd, mean + sd, color=colour, alpha=0.2)
  ax.set(xlabel="training step", ylabel=f"test {metric}", title=f"{metric} during training (mean ± sd "
         "over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  figure.tight_layout()
  return figure


def final_bars(finals: dict[str, tuple[float, float]], *, metric: str) -> Figure:
  """One bar per name: the mean of the final `metric` over seeds, with +-sd error bars (sd NaN: none).

  Args:
    finals: name -> (mean, sd).
  """
  names = list(finals)
  means = np.array([finals[n][0] for n in names])
  sds = np.nan_to_num(np.array([finals[n][1] for n in names]))
  figure = Figure(figsize=(max(5.0, 0.6 * len(names) + 2), 4.5), dpi=120)
  ax = figure.subplots()
  ax.bar(range(len(names)), means, yerr=sds, capsize=3, color=_palette(len(names)))
  for i, (mean, sd) in enumerate(zip(means, sds)):
    ax.annotate(f"{mean:.3f}", (i, mean + sd), textcoords="offset points", xytext=(0, 2), ha="center",
                fontsize=7)
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
  ax.set_ylim(0.0, min(1.0, float(np.max(means + sds))) + 0.05)
  ax.set(ylabel=f"final test {metric}", title=f"Final {metric} (mean ± sd over seeds)")
  ax.grid(axis="y", alpha=0.3)
  figure.tight_layout()
  return figure


def _colour(rgb: tuple) -> tuple:
  return tuple(c / 255 for c in rgb)


def _palette(n: int) -> list:
  """n distinct colours: tab20's dark ones first, then its light ones (neighbours then differ); past 20,
  tab20b's and tab20c's the same way; past 60, n hues evenly spaced."""
  order = [(name, i) for name in ("tab20", "tab20b", "tab20c")
           for i in (*range(0, 20, 2), *range(1, 20, 2))]
  if n > len(order):
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]
  return [matplotlib.colormaps[name](i) for name, i in order[:n]]


def line_charts(panels: dict[str, dict[str, tuple]]) -> Figure:
  """Panels stacked, one per title: each named series {name: (steps [n], values [n])} as a line with
  dots, in its own colour, with a legend."""
  figure = Figure(figsize=(8, 2.6 * len(panels)), dpi=100)
  for ax, (title, series) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0],
                                 panels.items()):
    for colour, (name, (steps, values)) in zip(_palette(len(series)), series.items()):
      ax.plot(steps, values, marker="o", markersize=3, color=colour, label=name)
    ax.set(xlabel="step", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  figure.tight_layout()
  return figure
