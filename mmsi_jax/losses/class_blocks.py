"""Proxy losses over blocks of classes: S [N, C] is never held whole.

A proxy loss reduces S over its classes in one of two ways, and each is a reduction that can be
computed block by block and merged:

  ClassSoftmax   L = mean_{i active} [ log sum_{c in D_i} exp(z_ic) - mean_{c in P_i} z_ic ],
                 z = logits(S, pos): per row, an online log-sum-exp (running max m_i and
                 s_i = sum exp(z_ic - m_i), merged as m = max(m', m''), s = s' e^{m'-m} + s'' e^{m''-m})
                 and the sums of the targets' logits (NormSoftmax, CosFace, ArcFace, ProxyNCA).
  ClassTerms     L = sum_c pull_c / |C+| + sum_c push_c / |C+-|: per class, independent terms over the
                 rows, summed block by block with the counts (Proxy-Anchor).

Each loss is declared as a function of one block (its logits and softmax support, or its per-class
terms); called on S, pos, neg it is the whole loss, the reference of the blocked form. `blocked_loss`
scans over the blocks of classes, keeping one block of [rows, classes] and the running statistics
([rows] or scalars); its gradient is a custom VJP that scans the blocks again, recomputing each from
the rows and its class vectors. Memory: O(rows x block), not O(rows x classes); the gradient of the
class vectors is accumulated in place.

The class vectors come in groups (`ClassGroups`): the proxies W [C, D], and for MemVir the past steps'
proxies read from its queues, group g holding class ids first_id + g C .. first_id + (g + 1) C - 1. A
block of b classes starts at min(j b, C - b), so that no group is padded or copied: the last block of a
group overlaps the one before, and its classes already seen are masked out. A group may end in padding
(`ClassBlocks.num_classes` real classes of C): those classes are nobody's.

Sharded (`ClassBlocks.shard_axis`), every group's class axis is split over the devices of a mesh axis:
each device reduces the blocks of its own classes, and the statistics are merged across the devices
(a maximum and sums of [rows]-sized arrays); the rows and labels are the same on every device.
"""

import functools
from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from mmsi_jax.losses.masked import masked_log1p_sum_exp, masked_mean, softmax_cross_entropy
from mmsi_jax.models import l2_normalize


def _count(mask: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(mask, axis=axis, dtype=jnp.int32)


def _declared(wrapper, function: Callable) -> None:
  """`wrapper` takes the name, docstring and signature (its hyperparameters) of `function`."""
  functools.update_wrapper(wrapper, function)


class ClassSoftmax:
  """A softmax cross-entropy over classes, from `terms(S, pos, neg, **hparams) -> (z, D)`: the logits
  z [N, C] and the softmax's support D [N, C] (the targets are pos; see masked.softmax_cross_entropy).
  Its statistics are per row (`per_row`): a row's share of the loss depends on its own row of S only.
  """
  per_row = True

  def __init__(self, terms: Callable):
    self.terms = terms
    _declared(self, terms)

  def __call__(self, sim, pos, neg, **hparams):
    logits, candidates = self.terms(sim, pos, neg, **hparams)
    return softmax_cross_entropy(logits, pos, candidates)

  def stats(self, sim, pos, neg, hparams: dict):
    """(m, s, target sum, target count, support count) per row, of one block."""
    logits, candidates = self.terms(sim, pos, neg, **hparams)
    row_max = jax.lax.stop_gradient(jnp.max(jnp.where(candidates, logits, -jnp.inf), axis=-1))
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    exp_sum = jnp.sum(jnp.exp(jnp.where(candidates, logits - shift[:, None], -jnp.inf)), axis=-1)
    return (row_max, exp_sum, jnp.sum(jnp.where(pos, logits, 0.0), axis=-1),
            _count(pos, axis=-1), _count(candidates, axis=-1))

  def empty(self, num_rows: int, dtype) -> tuple:
    zeros = jnp.zeros((num_rows,), dtype)
    counts = jnp.zeros((num_rows,), jnp.int32)
    return (jnp.full((num_rows,), -jnp.inf, dtype), zeros, zeros, counts, counts)

  def merge(self, first, second):
    (max_a, sum_a, target_a, pos_a, cand_a), (max_b, sum_b, target_b, pos_b, cand_b) = first, second
    row_max = jnp.maximum(max_a, max_b)

    def rescaled(block_max, exp_sum):  # sum exp(z - m) of one part relative to the common max.
      finite = jnp.isfinite(block_max)
      return jnp.where(finite, exp_sum * jnp.exp(jnp.where(finite, block_max - row_max, 0.0)), 0.0)
    return (row_max, rescaled(max_a, sum_a) + rescaled(max_b, sum_b), target_a + target_b,
            pos_a + pos_b, cand_a + cand_b)

  def merge_across(self, stats, axis: str):
    """`merge` of every device's statistics along mesh axis `axis` (inside shard_map)."""
    row_max, exp_sum, target_sum, pos_count, cand_count = stats
    row_max = jax.lax.stop_gradient(row_max)  # Held constant, as every maximum here.
    common = jax.lax.pmax(row_max, axis)
    finite = jnp.isfinite(row_max)
    exp_sum = jnp.where(finite, exp_sum * jnp.exp(jnp.where(finite, row_max - common, 0.0)), 0.0)
    return (common, *jax.lax.psum((exp_sum, target_sum, pos_count, cand_count), axis))

  def finish(self, stats) -> jax.Array:
    row_max, exp_sum, target_sum, pos_count, cand_count = stats
    active = (pos_count > 0) & (cand_count > 0)
    log_sum = jnp.where(active, jnp.where(jnp.isfinite(row_max), row_max, 0.0)
                        + jnp.log(jnp.where(active, exp_sum, 1.0)), 0.0)
    return masked_mean(log_sum - target_sum / jnp.maximum(pos_count, 1), active)


class ClassTerms:
  """L = sum_c pull_c / max(|C+|, 1) + sum_c push_c / max(|C+-|, 1), from
  `terms(S, pos, neg, **hparams) -> (pull [C], push [C])`: C+ the classes with a target row, C+- those
  with a target or another row (a column with neither is no class of the step). Its statistics are
  sums over all rows (not `per_row`)."""
  per_row = False

  def __init__(self, terms: Callable):
    self.terms = terms
    _declared(self, terms)

  def __call__(self, sim, pos, neg, **hparams):
    return self.finish(self.stats(sim, pos, neg, hparams))

  def stats(self, sim, pos, neg, hparams: dict):
    """(pull sum, push sum, classes with a target, classes with a row) of one block."""
    pull, push = self.terms(sim, pos, neg, **hparams)
    return (jnp.sum(pull), jnp.sum(push), _count(jnp.any(pos, axis=0)),
            _count(jnp.any(pos | neg, axis=0)))

  def empty(self, num_rows: int, dtype) -> tuple:
    del num_rows
    return (jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32))

  def merge(self, first, second):
    return jax.tree.map(jnp.add, first, second)

  def merge_across(self, stats, axis: str):
    """`merge` of every device's statistics along mesh axis `axis` (inside shard_map)."""
    return jax.lax.psum(stats, axis)

  def finish(self, stats) -> jax.Array:
    pull, push, with_target, with_row = stats
    return pull / jnp.maximum(with_target, 1) + push / jnp.maximum(with_row, 1)


def log1p_sum_exp_per_class(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """log(1 + sum_i mask_ic exp(logits_ic)) per column c of [N, C]: a class's term over its rows."""
  return masked_log1p_sum_exp(logits.T, mask.T)


@flax.struct.dataclass
class ClassGroups:
  """Groups of C class vectors each, any norm (normalised block by block).

  Attributes:
    vectors: [C, D] (one group) or [Q, C, D] read at `slots`, e.g. MemVir's queue of past proxies;
      uint16: bfloat16 values stored as their bits (`stored_bits`).
    slots: None, or [G] int32, the groups' indices into vectors' first axis.
    available: None (every group), or [G] bool: an unavailable group's classes are nobody's.
    first_id: the class id of the first group's first vector; group g's class c is
      first_id + g C + c (C the classes of a group over every shard).
  """
  vectors: jax.Array
  slots: Optional[jax.Array] = None
  available: Optional[jax.Array] = None
  first_id: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_groups(self) -> int:
    return 1 if self.slots is None else self.slots.shape[0]

  @property
  def num_classes(self) -> int:
    return self.vectors.shape[-2]


@flax.struct.dataclass
class ClassBlocks:
  """N rows against the classes of some ClassGroups, S = rows @ normalised vectors^T never held whole;
  what a blocked references component gives the step in place of Pairs (references/proxies.py).

  Attributes:
    sim: (rows [N, D] L2-normalised, proxies [C, D]): what the step differentiates, in place of S.
      The proxies are the first group (class ids 0 .. C - 1).
    labels: [N] int class ids of the rows.
    row_valid: [N] bool; an invalid row has no pair.
    more: further ClassGroups, constant (e.g. MemVir's past proxies), after the proxies.
    block: b, the classes per block.
    trained_rows: T, the leading rows with a gradient (MemVir: the batch); the others are constants
      (no gradient is computed for them). 0: every row.
    num_classes: the real classes of each group, the first of its C vectors; the rest are padding,
      nobody's classes. 0: all C.
    shard_axis: None, or the mesh axis over which the proxies and every group's vectors are split along
      their class axis (global arrays, e.g. a TrainState's): `blocked_loss` then runs in shard_map
      over the current mesh (`jax.set_mesh`; one device when none is set).
  """
  sim: tuple
  labels: jax.Array
  row_valid: jax.Array
  more: tuple = ()
  block: int = flax.struct.field(pytree_node=False, default=1024)
  trained_rows: int = flax.struct.field(pytree_node=False, default=0)
  num_classes: int = flax.struct.field(pytree_node=False, default=0)
  shard_axis: Optional[str] = flax.struct.field(pytree_node=False, default=None)


def stored_bits(values: jax.Array) -> jax.Array:
  """bfloat16 values as their bits (uint16), other dtypes as they are: how class vectors are best
  stored to be read block by block (XLA on the CPU casts a bfloat16 array read in slices inside a loop
  to float32 whole, once: a float32 copy of it); `stored_values` reads them back."""
  return jax.lax.bitcast_convert_type(values, jnp.uint16) if values.dtype == jnp.bfloat16 else values


def stored_values(stored: jax.Array) -> jax.Array:
  """The values of `stored_bits`: uint16 read as bfloat16 bits, other dtypes as they are."""
  return jax.lax.bitcast_convert_type(stored, jnp.bfloat16) if stored.dtype == jnp.uint16 else stored


@flax.struct.dataclass
class ShardLayout:
  """Where this device's vectors of a group sit among the group's classes.

  Attributes:
    offset: [] int32, the group index of this device's first vector (0 unsharded).
    classes_per_group: C, a group's vectors over every device (static).
    real_classes: the group's real classes, the first ones (static); the others are padding.
  """
  offset: jax.Array
  classes_per_group: int = flax.struct.field(pytree_node=False)
  real_classes: int = flax.struct.field(pytree_node=False)


def _block_of(groups: ClassGroups, layout: ShardLayout, group: jax.Array, index: jax.Array,
              block: int, dtype):
  """(vectors [b, D] as stored, cast to `dtype`, class ids [b], whether each class is new here [b]) of
  block `index` of this device's vectors of group `group`."""
  local_classes, dim = groups.num_classes, groups.vectors.shape[-1]
  start = jnp.minimum(index * block, local_classes - block)
  if groups.slots is None:
    vectors = jax.lax.dynamic_slice(groups.vectors, (start, 0), (block, dim))
  else:
    vectors = jax.lax.dynamic_slice(groups.vectors, (groups.slots[group], start, 0),
                                    (1, block, dim))[0]
  within = start + jnp.arange(block)
  in_group = layout.offset + within
  new = (within >= index * block) & (in_group < layout.real_classes)
  if groups.available is not None:
    new = new & groups.available[group]
  class_ids = groups.first_id + group * layout.classes_per_group + in_group
  return stored_values(vectors).astype(dtype), class_ids, new


def _pairs_of_block(rows, labels, row_valid, vectors, class_ids, new):
  """S [rows, b] of the rows against a block's vectors (normalised here), and its pos and neg masks."""
  own = labels[:, None] == class_ids[None, :]
  in_step = row_valid[:, None] & new[None, :]
  return rows @ l2_normalize(vectors).T, own & in_step, ~own & in_step


def _blocks(groups: ClassGroups, block: int) -> tuple[int, tuple]:
  """(b, (group index, block index) of every block of `groups`): blocks of min(block, C) classes."""
  block = min(block, groups.num_classes)
  per_group = -(-groups.num_classes // block)
  return block, (jnp.repeat(jnp.arange(groups.num_groups), per_group),
                 jnp.tile(jnp.arange(per_group), groups.num_groups))


def blocked_loss(loss, blocks: ClassBlocks, hparams: dict,
                 class_axis: Optional[str] = None) -> tuple[jax.Array, dict]:
  """(L, {"train/pos_sim", "train/neg_sim"}) of a ClassSoftmax or ClassTerms loss over the classes of
  `blocks`, block by block (module docstring); equal to `loss` on the whole S and masks.

  The statistics' gradient in the rows and the proxies (a custom VJP) makes a second pass over the
  blocks, with the first pass's merged statistics: each block's share of dL/dS is the VJP of
  merge(block, total), which equals the block's part of d total because merging is linear in each part
  (the maxima held constant). Blocks of the constant groups recompute only the first `trained_rows` rows
  where the reduction is per row (ClassSoftmax): the other rows and those groups have no gradient.

  With `class_axis`, a mesh axis name inside `shard_map`, the proxies and every further group's vectors
  are this device's shard of their classes (shard k holds a group's classes k C' .. (k + 1) C' - 1):
  each device reduces its classes and the statistics are merged across the axis (collectives over
  [rows]-sized statistics); the rows and labels are the same on every device. Blocks with a
  `shard_axis` (global arrays split over it) call this in shard_map with that axis.
  """
  if blocks.shard_axis is not None and class_axis is None:
    return _in_shard_map(loss, blocks, hparams)
  rows, proxies = blocks.sim
  local_classes = proxies.shape[0]
  for groups in blocks.more:
    if groups.num_classes != local_classes:
      raise ValueError(f"Every group of class vectors must have the proxies' {local_classes} classes "
                       f"(per device), not {groups.num_classes}.")
  shards = 1 if class_axis is None else jax.lax.axis_size(class_axis)
  offset = 0 if class_axis is None else jax.lax.axis_index(class_axis) * local_classes
  layout = ShardLayout(jnp.asarray(offset, jnp.int32), local_classes * shards,
                       blocks.num_classes or local_classes * shards)
  # Each shard's gradient in the rows is its part: typed varying, the parts are summed in the rows'
  # transpose (pcast's, a psum).
  rows = _varying(rows, class_axis)
  stats, sums = _statistics(loss, tuple(sorted(hparams.items())), blocks.block,
                            blocks.trained_rows or rows.shape[0], class_axis, rows, proxies, layout,
                            (blocks.labels, blocks.row_valid, blocks.more))
  sums = jax.lax.stop_gradient(sums)
  if class_axis is not None:
    stats = loss.merge_across(stats, class_axis)
    sums = jax.lax.psum(sums, class_axis)
  pos_sum, pos_count, neg_sum, neg_count = sums
  return loss.finish(stats), {"train/pos_sim": pos_sum / jnp.maximum(pos_count, 1),
                              "train/neg_sim": neg_sum / jnp.maximum(neg_count, 1)}


def class_spec(axis: str, ndim: int) -> PartitionSpec:
  """The PartitionSpec of class vectors [..., C, D] split along their class axis over mesh `axis`."""
  return PartitionSpec(*([None] * (ndim - 2)), axis, None)


def _in_shard_map(loss, blocks: ClassBlocks, hparams: dict) -> tuple[jax.Array, dict]:
  """`blocked_loss` of blocks whose class vectors are global arrays split over `blocks.shard_axis`,
  run on each device's shard inside shard_map over the current mesh (one device if none is set)."""
  axis = blocks.shard_axis
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    mesh = Mesh(np.array(jax.devices()[:1]), (axis,))
  replicated = PartitionSpec()
  maybe = lambda x: None if x is None else replicated
  rows, proxies = blocks.sim
  specs = blocks.replace(
      sim=(replicated, class_spec(axis, proxies.ndim)), labels=replicated, row_valid=replicated,
      more=tuple(groups.replace(vectors=class_spec(axis, groups.vectors.ndim),
                                slots=maybe(groups.slots), available=maybe(groups.available))
                 for groups in blocks.more))

  def local(shard: ClassBlocks):
    return blocked_loss(loss, shard.replace(shard_axis=None), hparams, class_axis=axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=replicated)(blocks)


def _groups(proxies, more) -> tuple:
  return (ClassGroups(proxies), *more)


def _varying(tree, class_axis: Optional[str]):
  """`tree` typed as varying over the class axis inside shard_map (as the carries of a scan over a
  shard's blocks must be); unchanged without one."""
  if class_axis is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.pcast(x, (class_axis,), to="varying"), tree)


def _forward(loss, hparams, block, trained, class_axis, rows, proxies, layout, constants):
  del trained
  labels, row_valid, more = constants
  hparams = dict(hparams)
  zero = jnp.zeros((), rows.dtype)
  count = jnp.zeros((), jnp.int32)

  def body(groups, size, carry, indices):
    stats, sums = carry
    sim, pos, neg = _pairs_of_block(rows, labels, row_valid,
                                    *_block_of(groups, layout, *indices, size, rows.dtype))
    sums = jax.tree.map(jnp.add, sums, (jnp.sum(jnp.where(pos, sim, 0.0)), _count(pos),
                                        jnp.sum(jnp.where(neg, sim, 0.0)), _count(neg)))
    return (loss.merge(stats, loss.stats(sim, pos, neg, hparams)), sums), None

  carry = _varying((loss.empty(rows.shape[0], rows.dtype), (zero, count, zero, count)), class_axis)
  for groups in _groups(proxies, more):
    size, indices = _blocks(groups, block)
    carry, _ = jax.lax.scan(functools.partial(body, groups, size), carry, indices)
  return carry, (rows, proxies, layout, constants, carry[0])


def _backward(loss, hparams, block, trained, class_axis, residuals, cotangents):
  rows, proxies, layout, constants, total = residuals
  labels, row_valid, more = constants
  hparams = dict(hparams)
  total_cotangent = cotangents[0]  # The similarity sums are reported, not differentiated.

  def block_gradients(used, total_used, cotangent_used, vectors, class_ids, new):
    """d(rows[:used]) and d(vectors) of L through this block's statistics."""
    def statistics(block_rows, block_vectors):
      return loss.stats(*_pairs_of_block(block_rows, labels[:used], row_valid[:used], block_vectors,
                                         class_ids, new), hparams)
    block_stats, stats_vjp = jax.vjp(statistics, rows[:used], vectors)
    (share,) = jax.vjp(lambda part: loss.merge(part, total_used), block_stats)[1](cotangent_used)
    return stats_vjp(share)

  def body(groups, size, used, trained_vectors, carry, indices):
    d_rows, d_proxies = carry
    sliced = lambda tree: jax.tree.map(lambda x: x[:used], tree)
    vectors, class_ids, new = _block_of(groups, layout, *indices, size, rows.dtype)
    d_used, d_vectors = block_gradients(used, sliced(total) if used < rows.shape[0] else total,
                                        sliced(total_cotangent) if used < rows.shape[0]
                                        else total_cotangent, vectors, class_ids, new)
    d_rows = d_rows + d_used[:trained]
    if trained_vectors:  # The proxies: their block's gradient, added in place.
      start = (jnp.minimum(indices[1] * size, groups.num_classes - size), 0)
      d_proxies = jax.lax.dynamic_update_slice(
          d_proxies, jax.lax.dynamic_slice(d_proxies, start, d_vectors.shape) + d_vectors, start)
    return (d_rows, d_proxies), None

  carry = _varying((jnp.zeros((trained, rows.shape[1]), rows.dtype),
                    jnp.zeros(proxies.shape, rows.dtype)), class_axis)
  for number, groups in enumerate(_groups(proxies, more)):
    used = trained if number and loss.per_row else rows.shape[0]
    size, indices = _blocks(groups, block)
    carry, _ = jax.lax.scan(functools.partial(body, groups, size, used, number == 0), carry, indices)
  d_rows, d_proxies = carry
  d_rows = jnp.concatenate([d_rows, jnp.zeros((rows.shape[0] - trained, rows.shape[1]), rows.dtype)])
  return (d_rows, d_proxies.astype(proxies.dtype), jax.tree.map(_zero_cotangent, layout),
          jax.tree.map(_zero_cotangent, constants))


def _zero_cotangent(x: jax.Array):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


_statistics = jax.custom_vjp(
    lambda loss, hparams, block, trained, class_axis, rows, proxies, layout, constants: _forward(
        loss, hparams, block, trained, class_axis, rows, proxies, layout, constants)[0],
    nondiff_argnums=(0, 1, 2, 3, 4))
_statistics.defvjp(_forward, _backward)
