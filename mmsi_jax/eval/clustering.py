"""NMI: k-means of the embeddings, with as many clusters as classes, scored against the labels.

k-means runs in JAX: k-means++ seeding (Arthur and Vassilvitskii 2007: each new center drawn with
probability proportional to the squared distance to the nearest center so far), then Lloyd iterations
until no assignment changes, by squared Euclidean distance. The normalised mutual information uses the
arithmetic mean of the entropies, NMI = I(U; V) / ((H(U) + H(V)) / 2): scikit-learn's default, and the
normalisation of DML papers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _squared_distances_less_norm(points, centers):
  """||x - c||^2 - ||x||^2 [B, K] of points [B, D] to centers [K, D]; argmin: the nearest center."""
  return (jnp.sum(centers * centers, axis=1)[None, :]
          - 2 * jnp.matmul(points, centers.T, precision=jax.lax.Precision.HIGHEST))


def _nearest_centers(points, centers, chunk_size):
  """Index [N] of the nearest center of each point, chunk_size points at a time ([chunk, K] memory)."""
  return jax.lax.map(lambda x: jnp.argmin(_squared_distances_less_norm(x[None], centers)[0]), points,
                     batch_size=chunk_size)


def _kmeans_plus_plus(points, key, num_clusters):
  """Initial centers [K, D] drawn from points [N, D] by k-means++."""
  num_points = points.shape[0]
  first_key, key = jax.random.split(key)
  first = points[jax.random.randint(first_key, (), 0, num_points)]
  centers = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(first)
  nearest_d2 = jnp.sum((points - first) ** 2, axis=1)

  def add_center(i, state):
    centers, nearest_d2 = state
    total = jnp.sum(nearest_d2)
    # All points on centers already (fewer distinct points than clusters): draw uniformly.
    p = jnp.where(total > 0, nearest_d2 / jnp.where(total > 0, total, 1.0), 1.0 / num_points)
    center = points[jax.random.choice(jax.random.fold_in(key, i), num_points, p=p)]
    d2 = jnp.sum((points - center) ** 2, axis=1)
    return centers.at[i].set(center), jnp.minimum(nearest_d2, d2)

  centers, _ = jax.lax.fori_loop(1, num_clusters, add_center, (centers, nearest_d2))
  return centers


@functools.partial(jax.jit, static_argnames=("num_clusters", "max_iterations", "chunk_size"))
def kmeans(points, key, *, num_clusters: int, max_iterations: int = 100, chunk_size: int = 1024):
  """k-means++ then Lloyd iterations until the assignments stop changing (at most max_iterations).

  An empty cluster keeps its previous center.

  Args:
    points: [N, D] float32; key: PRNG key of the seeding.
    num_clusters: K; max_iterations: Lloyd iterations at most; chunk_size: points per distance block.

  Returns:
    centers [K, D] and assignments [N] int32 (the index of each point's nearest center).
  """
  centers = _kmeans_plus_plus(points, key, num_clusters)
  assignments = _nearest_centers(points, centers, chunk_size)

  def update(state):
    iteration, centers, assignments, _ = state
    sums = jax.ops.segment_sum(points, assignments, num_segments=num_clusters)
    counts = jnp.bincount(assignments, length=num_clusters)[:, None]
    centers = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centers)
    new_assignments = _nearest_centers(points, centers, chunk_size)
    return iteration + 1, centers, new_assignments, jnp.any(new_assignments != assignments)

  def keep_going(state):
    iteration, _, _, changed = state
    return changed & (iteration < max_iterations)

  _, centers, assignments, _ = jax.lax.while_loop(
      keep_going, update, (0, centers, assignments, jnp.array(True)))
  return centers, assignments.astype(jnp.int32)


def normalized_mutual_information(labels_a, labels_b) -> float:
  """NMI [0, 1] of two labelings [N] of the same items, I(U; V) / ((H(U) + H(V)) / 2) in nats.

  1 when both labelings put every item in one group (no information either way, but identical).
  """
  _, a = np.unique(np.asarray(labels_a), return_inverse=True)
  _, b = np.unique(np.asarray(labels_b), return_inverse=True)
  num = len(a)
  (pair_a, pair_b), joint_counts = np.unique(np.stack([a, b]), axis=1, return_counts=True)
  count_a, count_b = np.bincount(a), np.bincount(b)
  mutual_information = np.sum(joint_counts / num * np.log(
      joint_counts * num / (count_a[pair_a] * count_b[pair_b])))

  def entropy(counts):
    p = counts / num
    return -np.sum(p * np.log(p))

  mean_entropy = (entropy(count_a) + entropy(count_b)) / 2
  return 1.0 if mean_entropy == 0 else float(mutual_information / mean_entropy)


def nmi(embeddings, labels, *, seed: int = 0, max_iterations: int = 100,
        chunk_size: int = 1024) -> float:
  """NMI of the k-means clusters of `embeddings` [N, D] (K = number of classes) against `labels` [N].

  Costs O(N K D) per Lloyd iteration and K sequential seeding steps over the N points: on SOP's test
  split (K = 11,316) that is minutes on a CPU.
  """
  num_clusters = len(np.unique(np.asarray(labels)))
  _, assignments = kmeans(jnp.asarray(embeddings, jnp.float32), jax.random.PRNGKey(seed),
                          num_clusters=num_clusters, max_iterations=max_iterations,
                          chunk_size=chunk_size)
  return normalized_mutual_information(labels, np.asarray(assignments))
