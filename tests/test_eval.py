"""Evaluation: retrieval metrics against a brute-force NumPy ranking, NMI against a contingency-table
computation, k-means as a fixed point, sharding over 4 virtual CPU devices, the figures, and the raw-pixel
baseline computed once and read back from beside the dataset.

Embeddings are multiples of 1/64 with small norms, so every inner product is exact in float32 whatever
the summation order: the brute force and the device then see the very same similarities, ties included.
"""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
from scipy import stats

from configs import demo
from mmsi_jax.eval import figures, kmeans, nearest_neighbors, nmi, normalized_mutual_information
from mmsi_jax.eval import evaluator, retrieval, retrieval_metrics
from tests import conftest


def brute_force_order(sim_row: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """Candidates sorted by decreasing similarity, equal similarities by increasing index."""
  return candidates[np.lexsort((candidates, -sim_row[candidates]))]


def brute_force_metrics(queries, query_labels, refs, ref_labels, ks, self_query):
  """Every metric from the full ranking of each query, straight from the definitions."""
  sim = np.asarray(queries, np.float64) @ np.asarray(refs, np.float64).T
  per_query = {f"recall@{k}": [] for k in ks} | {"precision@1": [], "r_precision": [], "map@r": []}
  excluded = 0
  for i, label in enumerate(query_labels):
    candidates = np.delete(np.arange(len(refs)), i) if self_query else np.arange(len(refs))
    ranked_relevance = ref_labels[brute_force_order(sim[i], candidates)] == label
    r = int(ranked_relevance.sum())
    if r == 0:
      excluded += 1
      continue
    for k in ks:
      per_query[f"recall@{k}"].append(ranked_relevance[:k].any())
    per_query["precision@1"].append(ranked_relevance[0])
    per_query["r_precision"].append(ranked_relevance[:r].sum() / r)
    precision_at = [ranked_relevance[:i + 1].sum() / (i + 1) for i in range(r)]
    per_query["map@r"].append(sum(p for p, rel in zip(precision_at, ranked_relevance[:r]) if rel) / r)
  metrics = {name: float(np.mean(values)) for name, values in per_query.items()}
  metrics["num_queries"] = len(query_labels) - excluded
  metrics["num_excluded_queries"] = excluded
  return metrics


def unequal_labels(rng, num_classes):
  """Labels of classes of 1 to 12 items (several of one item), shuffled."""
  sizes = rng.integers(1, 13, num_classes)
  sizes[:3] = 1
  return rng.permutation(np.repeat(rng.permutation(10 * num_classes)[:num_classes], sizes))


def dyadic(x):
  return np.round(np.asarray(x) * 64) / 64


def random_embeddings(rng, labels, dim=16):
  return dyadic(rng.standard_normal((len(labels), dim)) / 2).astype(np.float32)


def clustered_embeddings(rng, labels, dim=16):
  centers = rng.standard_normal((labels.max() + 1, dim))
  return dyadic(centers[labels] + 0.6 * rng.standard_normal((len(labels), dim))).astype(np.float32)


def tied_embeddings(rng, labels, dim=4):
  """Coordinates in {-1, 0, 1}: most similarities are shared by many references."""
  return rng.integers(-1, 2, (len(labels), dim)).astype(np.float32)


def assert_metrics_equal(actual, expected):
  assert actual.keys() == expected.keys()
  for key, value in expected.items():
    assert actual[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("make_embeddings", [random_embeddings, clustered_embeddings, tied_embeddings])
@pytest.mark.parametrize("ks", [(1, 2, 4, 8), (1, 10, 100)])
def test_self_query_matches_brute_force(make_embeddings, ks):
  rng = np.random.default_rng(0)
  labels = unequal_labels(rng, 300)  # About 2,000: the top-k goes through groups of references.
  embeddings = make_embeddings(rng, labels)
  expected = brute_force_metrics(embeddings, labels, embeddings, labels, ks, self_query=True)
  assert expected["num_excluded_queries"] >= 3
  assert_metrics_equal(retrieval_metrics(embeddings, labels, ks=ks, chunk_size=96), expected)


@pytest.mark.parametrize("make_embeddings", [clustered_embeddings, tied_embeddings])
def test_separate_references_match_brute_force(make_embeddings):
  rng = np.random.default_rng(1)
  ref_labels = unequal_labels(rng, 150)
  refs = make_embeddings(rng, ref_labels)
  query_labels = np.concatenate([ref_labels[:250], [-5, 10_000]])  # Two classes without references.
  queries = make_embeddings(rng, query_labels)
  ks = (1, 3, 50, 5000)  # 5000: more than the references.
  expected = brute_force_metrics(queries, query_labels, refs, ref_labels, ks, self_query=False)
  actual = retrieval_metrics(queries, query_labels, ref_embeddings=refs, ref_labels=ref_labels, ks=ks,
                             chunk_size=64)
  assert actual["num_excluded_queries"] == 2
  assert_metrics_equal(actual, expected)


@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("few_queries", [64, 2])
def test_merge_block_matches_brute_force_with_ties(axis, few_queries, monkeypatch):
  monkeypatch.setattr(retrieval, "_FEW_QUERIES", few_queries)
  rng = np.random.default_rng(2)
  num_queries, num_refs, depth = 40, 8 * retrieval._GROUP_SIZE, 9
  for listed_first in (True, False):  # The listed refs come before the block's, or after.
    ref_start = 1000 if listed_first else 0
    listed_index = np.stack([rng.choice(np.arange(num_refs, 1000), depth, replace=False)
                             for _ in range(num_queries)])
    listed_index = listed_index if listed_first else listed_index + 2000
    listed_sim = rng.integers(0, 6, (num_queries, depth)).astype(np.float32)
    listed_sim[:5, 4:] = -np.inf  # Lists not full yet.
    block = rng.integers(0, 6, (num_queries, num_refs)).astype(np.float32)
    block[:3] = -np.inf  # Queries with nothing to take.
    block[3:6, :] = np.where(rng.random((3, num_refs)) < 0.9, -np.inf, block[3:6, :])
    order = np.lexsort((listed_index, -listed_sim), axis=1)
    listed_sim, listed_index = (np.take_along_axis(x, order, axis=1) for x in (listed_sim, listed_index))
    merged_sim, merged_index = jax.jit(retrieval._merge_block, static_argnums=(3, 4))(
        listed_sim, listed_index.astype(np.int32), block if axis == 1 else block.T, ref_start, axis)
    for q in range(num_queries):
      finite = np.isfinite(block[q])
      sims = np.concatenate([listed_sim[q], block[q][finite]])
      indices = np.concatenate([listed_index[q], ref_start + np.arange(num_refs)[finite]])
      expected = np.lexsort((indices, -sims))[:depth]
      np.testing.assert_array_equal(merged_sim[q], sims[expected])
      kept = np.isfinite(sims[expected])
      np.testing.assert_array_equal(np.asarray(merged_index[q])[kept], indices[expected][kept])


@pytest.mark.parametrize("num_items,block_size", [(203, 32), (64, 64), (20, 1024)])
def test_symmetric_blocks_match_all_blocks(num_items, block_size):
  """The self-query sweep (blocks on and above the diagonal, read both ways) against the sweep of all
  blocks with each item a class of its own: the same lists and counts; odd sizes, ties across blocks."""
  rng = np.random.default_rng(9)
  items = rng.integers(-1, 2, (num_items, 3)).astype(np.float32)
  ids = np.arange(num_items, dtype=np.int32)
  first_hit = (items @ items[::-1].T).diagonal().copy(), ids[::-1].copy()
  sweeps = [retrieval._nearest_lists(items, ids, items, ids, depth=7, block_size=block_size,
                                     symmetric=symmetric, first_hit=first_hit)
            for symmetric in (True, False)]
  for symmetric, all_blocks in zip(*sweeps):
    np.testing.assert_array_equal(np.asarray(symmetric)[:num_items], np.asarray(all_blocks)[:num_items])
  sim = items @ items.T
  for i in range(num_items):
    order = brute_force_order(sim[i], np.delete(ids, i))
    np.testing.assert_array_equal(np.asarray(sweeps[0][1])[i], order[:7])
    ahead = order[:np.flatnonzero(order == first_hit[1][i])[0]] if i != first_hit[1][i] else None
    if ahead is not None:
      assert np.asarray(sweeps[0][2])[i] == len(ahead)


def test_large_classes_across_class_blocks(monkeypatch):
  """Classes larger than the blocks of the sweep for relevant refs, and a K that counts ranks."""
  monkeypatch.setattr(retrieval, "_CLASS_BLOCK", 32)
  rng = np.random.default_rng(10)
  labels = rng.permutation(np.concatenate([np.repeat([4, 9, 2], [70, 45, 33]), np.arange(10, 40)]))
  embeddings = tied_embeddings(rng, labels)
  ks = (1, 5, 80)
  expected = brute_force_metrics(embeddings, labels, embeddings, labels, ks, self_query=True)
  assert_metrics_equal(retrieval_metrics(embeddings, labels, ks=ks, chunk_size=48), expected)
  refs, ref_labels = embeddings[:100], labels[:100]
  expected = brute_force_metrics(embeddings, labels, refs, ref_labels, ks, self_query=False)
  assert_metrics_equal(retrieval_metrics(embeddings, labels, ref_embeddings=refs, ref_labels=ref_labels,
                                         ks=ks, chunk_size=48), expected)


def test_tie_rule_lower_reference_index_first():
  refs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  queries = np.array([[1.0, 0.0]], np.float32)
  # The two nearest references are tied; the one of lower index ranks first.
  assert retrieval_metrics(queries, np.array([7]), ref_embeddings=refs, ref_labels=np.array([7, 3, 3]),
                           ks=(1,))["recall@1"] == 1.0
  assert retrieval_metrics(queries, np.array([7]), ref_embeddings=refs, ref_labels=np.array([3, 7, 3]),
                           ks=(1, 2))["recall@1"] == 0.0
  _, indices = nearest_neighbors(queries, refs, 3)
  np.testing.assert_array_equal(indices, [[0, 1, 2]])


def test_chunk_size_does_not_change_results():
  rng = np.random.default_rng(3)
  labels = unequal_labels(rng, 80)
  embeddings = tied_embeddings(rng, labels)
  results = [retrieval_metrics(embeddings, labels, ks=(1, 4, 100), chunk_size=c) for c in (1, 37, 4096)]
  assert results[0] == results[1] == results[2]


def test_nearest_neighbors_excludes_the_query_itself():
  rng = np.random.default_rng(4)
  labels = unequal_labels(rng, 60)
  embeddings = tied_embeddings(rng, labels)
  query_ids = np.array([0, 5, len(labels) - 1])
  similarities, indices = nearest_neighbors(embeddings[query_ids], embeddings, 7, query_ids=query_ids)
  sim = embeddings[query_ids] @ embeddings.T
  for row, i in enumerate(query_ids):
    expected = brute_force_order(sim[row], np.delete(np.arange(len(labels)), i))[:7]
    np.testing.assert_array_equal(indices[row], expected)
    np.testing.assert_array_equal(similarities[row], sim[row, expected])


def test_no_query_with_a_reference_raises():
  with pytest.raises(ValueError, match="No query has a reference"):
    retrieval_metrics(np.eye(3, dtype=np.float32), np.array([0, 1, 2]))


_SHARDED_SCRIPT = """
import json, os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
import jax
from mmsi_jax.eval import nearest_neighbors, eval_mesh, retrieval_metrics
x = np.asarray(json.loads(sys.argv[1]), np.float32)
labels = np.asarray(json.loads(sys.argv[2]))
_, indices = nearest_neighbors(x, x, 5, query_ids=np.arange(len(x)), chunk_size=30)
print(json.dumps({"devices": eval_mesh().size, "neighbors": indices.tolist(),
                  "metrics": [retrieval_metrics(x, labels, ks=ks, chunk_size=30) for ks in SHARDED_KS],
                  "gallery": retrieval_metrics(x[:150], labels[:150], ref_embeddings=x[100:],
                                               ref_labels=labels[100:], ks=(1, 4, 100), chunk_size=30)}))
"""
# Listed (K up to 64) and counted (K = 200) ranks.
_SHARDED_KS = ((1, 2, 8), (1, 10, 200))


def test_sharded_over_four_devices_gives_the_same_results():
  """Blocks dealt out to 4 devices (some get an empty turn): the same as on one, and as brute force."""
  rng = np.random.default_rng(5)
  labels = unequal_labels(rng, 50)
  embeddings = tied_embeddings(rng, labels)
  env = conftest.host_devices_env(4)
  output = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT.replace("SHARDED_KS", repr(_SHARDED_KS)),
       json.dumps(embeddings.tolist()), json.dumps(labels.tolist())],
      env=env, cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True,
      check=True).stdout
  sharded = json.loads(output)
  assert sharded["devices"] == 4
  _, indices = nearest_neighbors(embeddings, embeddings, 5, query_ids=np.arange(len(labels)))
  np.testing.assert_array_equal(sharded["neighbors"], indices)
  for ks, metrics in zip(_SHARDED_KS, sharded["metrics"]):
    assert metrics == retrieval_metrics(embeddings, labels, ks=ks, chunk_size=30)
    assert_metrics_equal(metrics, brute_force_metrics(embeddings, labels, embeddings, labels, ks, True))
  assert_metrics_equal(sharded["gallery"], brute_force_metrics(
      embeddings[:150], labels[:150], embeddings[100:], labels[100:], (1, 4, 100), False))


def contingency_nmi(labels_a, labels_b):
  """NMI from the dense contingency table: I = H(A) + H(B) - H(A, B), over the mean entropy."""
  _, a = np.unique(labels_a, return_inverse=True)
  _, b = np.unique(labels_b, return_inverse=True)
  table = np.zeros((a.max() + 1, b.max() + 1))
  np.add.at(table, (a, b), 1)
  h_a, h_b = stats.entropy(table.sum(axis=1)), stats.entropy(table.sum(axis=0))
  mutual_information = h_a + h_b - stats.entropy(table.ravel())
  return mutual_information / ((h_a + h_b) / 2)


@pytest.mark.parametrize("num_a,num_b", [(2, 2), (5, 13), (40, 7)])
def test_normalized_mutual_information_matches_contingency_table(num_a, num_b):
  rng = np.random.default_rng(num_a * num_b)
  a = rng.integers(0, num_a, 500)
  b = np.where(rng.random(500) < 0.6, a % num_b, rng.integers(0, num_b, 500)) * 3 - 7
  assert normalized_mutual_information(a, b) == pytest.approx(contingency_nmi(a, b), rel=1e-9)


def test_normalized_mutual_information_extremes():
  labels = np.array([3, 3, 1, 1, 2])
  assert normalized_mutual_information(labels, 10 - labels) == pytest.approx(1.0)
  assert normalized_mutual_information(labels, np.zeros(5)) == 0.0
  assert normalized_mutual_information(np.zeros(5), np.zeros(5)) == 1.0


def test_kmeans_converges_to_a_fixed_point():
  rng = np.random.default_rng(6)
  points = rng.standard_normal((300, 5)).astype(np.float32)
  centers, assignments = kmeans(points, jax.random.PRNGKey(0), num_clusters=7, chunk_size=64)
  centers, assignments = np.asarray(centers, np.float64), np.asarray(assignments)
  distances = ((points[:, None, :] - centers[None]) ** 2).sum(axis=2)
  np.testing.assert_array_equal(assignments, distances.argmin(axis=1))
  assert len(np.unique(assignments)) == 7
  for cluster in range(7):
    np.testing.assert_allclose(centers[cluster], points[assignments == cluster].mean(axis=0), atol=1e-5)


def test_nmi_is_one_on_separated_classes_and_deterministic():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 12, 400)
  centers = 30 * rng.standard_normal((12, 8))
  embeddings = (centers[labels] + rng.standard_normal((400, 8))).astype(np.float32)
  assert nmi(embeddings, labels) == pytest.approx(1.0)
  noisy = rng.standard_normal((400, 8)).astype(np.float32)
  assert nmi(noisy, labels, seed=3) == nmi(noisy, labels, seed=3) < 0.5


def test_figures_mark_right_and_wrong(tmp_path):
  rng = np.random.default_rng(8)
  correct = np.array([[True, False, True], [False, False, True]])
  images = (rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
            rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8), correct)
  grid = figures.retrieval_grid(*images, cell=20)
  titled = figures.retrieval_grid(*images, cell=20, title="small_cnn + ms, step 200: nearest images")
  for image, lines in ((grid, 1), (titled, 2)):  # A header of the title (if any) and the legend.
    header = image.size[1] - 2 * 20
    assert header == lines * figures._LINE + 6
    frame_colours = [[image.getpixel((20 + 10 + col * 20 + 1, header + row * 20 + 1))
                      for col in range(3)] for row in range(2)]
    expected = [[figures._CORRECT if c else figures._WRONG for c in row] for row in correct]
    assert frame_colours == expected
    assert image.getpixel((1, header + 1)) == figures._QUERY
    # The legend's colour swatches, in the header's last line.
    band = np.asarray(image)[header - figures._LINE:header]
    for _, colour in figures._LEGEND:
      assert (band == colour).all(-1).any()
  assert titled.size[0] > 4 * 20 + 10  # As wide as its title.
  assert not (np.asarray(titled)[:figures._LINE] == 255).all()
  curve = figures.recall_curve((1, 2, 4), (0.2, 0.5, 0.9))
  ax, = curve.axes
  np.testing.assert_array_equal(ax.lines[0].get_ydata(), (0.2, 0.5, 0.9))
  assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
  assert [t.get_text() for t in ax.texts] == ["0.200", "0.500", "0.900"]
  curve.savefig(tmp_path / "recall.png")
  assert Image.open(tmp_path / "recall.png").size == (480, 320)


def test_comparison_figures_draw_each_run_mean_and_spread():
  curves = {"a": ([200, 400], [0.5, 0.7], [0.01, 0.02]), "b": ([200, 400], [0.4, 0.6], [0.0, 0.0])}
  figure = figures.training_curves(curves, metric="recall@1")
  ax, = figure.axes
  assert [line.get_label() for line in ax.lines] == ["a", "b"]
  np.testing.assert_array_equal(ax.lines[0].get_ydata(), [0.5, 0.7])
  band = ax.collections[0].get_paths()[0].vertices  # The +-sd band of "a".
  assert band[:, 1].min() == pytest.approx(0.49) and band[:, 1].max() == pytest.approx(0.72)
  bars = figures.final_bars({"a": (0.7, 0.02), "b": (0.6, float("nan"))}, metric="recall@1")
  ax, = bars.axes
  assert [p.get_height() for p in ax.patches] == pytest.approx([0.7, 0.6])
  assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


def test_comparison_figures_give_each_variant_its_own_colour_and_bars_start_at_zero():
  names = [f"variant_{i}" for i in range(30)]
  curves = figures.training_curves({n: ([0, 100], [0.5, 0.6], [0.01, 0.02]) for n in names},
                                   metric="recall@1")
  colours = {tuple(line.get_color()) for line in curves.axes[0].lines}
  assert len(colours) == len(names)
  bars = figures.final_bars({n: (0.8 + i / 1000, 0.01) for i, n in enumerate(names)},
                            metric="recall@1")
  assert bars.axes[0].get_ylim()[0] == 0.0
  assert len({tuple(p.get_facecolor()) for p in bars.axes[0].patches}) == len(names)


class EncodedSplit:
  """A split of `images` [N, H, W, 3] uint8, stored as PNG bytes, with `labels` [N]."""

  def __init__(self, images, labels):
    self.records = []
    for image, label in zip(images, labels):
      encoded = io.BytesIO()
      Image.fromarray(image).save(encoded, format="PNG")
      self.records.append({"image": encoded.getvalue(), "label": int(label)})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]

  def __getitems__(self, indices):
    return [self.records[i] for i in indices]


def test_raw_pixel_baseline_is_computed_once_and_read_back_alike(tmp_path, monkeypatch):
  """The baseline of a split and its settings is computed once, kept beside the dataset, and read back
  by later evaluators as the same metrics, figure files and TensorBoard images; another split, another
  setting or an unwritable data_dir computes it."""
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), np.repeat(np.arange(6), 4)
  config = demo.get_config()
  config.data.data_dir = str(tmp_path / "data")
  config.eval.update(nmi=False, grid_queries=2, grid_results=2)
  computed = []
  real_raw_pixels = evaluator.raw_pixels
  monkeypatch.setattr(evaluator, "raw_pixels", lambda *a: computed.append(1) or real_raw_pixels(*a))

  def baseline(split, name, config=config):
    """(metrics, {figure: its PNG file's bytes}, {(tag, step): the image written to TensorBoard})."""
    written = {}
    run = evaluator.Evaluator(config, split, str(tmp_path / name),
                              write_image=lambda tag, image, step: written.update({(tag, step): image}))
    metrics = run.raw_pixel_baseline()
    files = {f: (tmp_path / name / f"baseline_{f}.png").read_bytes() for f in ("grid", "recall")}
    return metrics, files, written

  split = EncodedSplit(images, labels)
  first = baseline(split, "first")
  assert computed and set(first[2]) == {("baseline/retrieval_grid", 0), ("baseline/recall_at_k", 0)}
  direct = evaluator.Evaluator(config, split, None).evaluate(
      lambda x: real_raw_pixels(x, config.eval.baseline_side), "baseline", 0)
  assert first[0] == direct
  computed.clear()
  second = baseline(split, "second")
  assert not computed and second[:2] == first[:2]
  for key, image in first[2].items():
    np.testing.assert_array_equal(second[2][key], image)
  cache = os.path.join(config.data.data_dir, evaluator.BASELINE_CACHE)
  assert len(os.listdir(cache)) == 1

  relabelled = EncodedSplit(images, np.roll(labels, 1))
  assert baseline(relabelled, "relabelled")[0] != first[0] and computed
  assert len(os.listdir(cache)) == 2
  computed.clear()
  unwritable = config.copy_and_resolve_references()
  (tmp_path / "a_file").write_text("")
  unwritable.data.data_dir = str(tmp_path / "a_file" / "data")
  assert baseline(split, "unwritable", unwritable)[:2] == first[:2] and computed
  # Every setting the baseline depends on is in its key (a changed one computes it anew).
  key = evaluator.Evaluator(config, split, None).baseline_key()
  for edit in (dict(eval=dict(ks=(1, 2))), dict(eval=dict(baseline_side=4)),
               dict(eval=dict(grid_results=3)), dict(eval=dict(grid_queries=3)),
               dict(eval=dict(nmi=True)), dict(data=dict(image_size=6, resize_size=7))):
    edited = config.copy_and_resolve_references()
    edited.update_from_flattened_dict({f"{group}.{k}": v for group, settings in edit.items()
                                       for k, v in settings.items()})
    assert evaluator.Evaluator(edited, split, None).baseline_key() != key, edit
