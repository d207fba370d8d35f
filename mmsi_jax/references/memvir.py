"""MemVir: memory-based virtual classes (Ko et al., "Learning with Memory-based Virtual Classes for Deep
Metric Learning", ICCV 2021).

The class proxies (references/proxies.py) plus fixed-shape queues in the TrainState. From step U (the
warm-up, `warmup_steps`) on, every step t pushes its detached embeddings E_t [B, D], labels y_t [B] and
the proxies W_t [C, D] as they are before its update, and trains on k = min(N, floor((t - U) / (M + 1)))
past steps as virtual classes, M + 1 steps apart:

    W' = [W_t | W_{t-(M+1)} | ... | W_{t-k(M+1)}]          [(k + 1) C, D]   (rows L2-normalised)
    E' = [e_t; E_{t-(M+1)}; ...; E_{t-k(M+1)}]             [(k + 1) B, D]
    y' = [y_t; y_{t-(M+1)} + C; ...; y_{t-k(M+1)} + kC]

    L = the proxy loss on (E', y', W'), averaged over all (k + 1) B rows (Proxy-Anchor: over the (k + 1) C
        proxies, as the loss itself does).

Only e_t and W_t are differentiable: the stored entries are constants, and W_t is also pushed away by
the memory rows, as one of their negatives. The class count grows in stairs, by C every M + 1 steps,
to (N + 1) C (the curriculum). Shapes are fixed at k = N; the steps not yet available are masked (their
rows have no class, their columns are nobody's candidate). docs/METHODS.md lists where this differs
from the authors' code.

Memory. Step t reads steps t - (M+1), ..., t - N(M+1) after it has pushed step t, so the queues hold
Q = N(M + 1) + 1 steps, each read by later steps, and nothing is pushed before the warm-up:

    bytes = (N (M + 1) + 1) x ((C + B) x D x s + 4 B),    s = 4 (float32) or 2 (bfloat16).
"""

import flax
import jax
import jax.numpy as jnp

from mmsi_jax import losses
from mmsi_jax.losses.class_blocks import stored_bits, stored_values
from mmsi_jax.models import l2_normalize
from mmsi_jax.references.base import References
from mmsi_jax.references.proxies import (INITS, PROXY_PARAMS, ClassProxies, check_class_block,
                                         class_blocks, padded_classes)
from mmsi_jax.search_space import Int, ShareOfRun, tunable

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}  # float64: checks.
# bfloat16 entries are kept as their bits (uint16): see losses/class_blocks.py, stored_bits.


@flax.struct.dataclass
class VirtualClassQueues:
  """The last Q = N(M + 1) + 1 pushed steps, a ring indexed by the push count.

  Attributes:
    embeddings: [Q, B, D] detached embeddings of each pushed step (bfloat16 as its bits, uint16).
    labels: [Q, B] int32 their labels.
    proxies: [Q, C, D] the proxies before each pushed step's update (as embeddings).
    pushed: [] int32, steps pushed so far; step number p (0-based) is in slot p mod Q.
  """
  embeddings: jax.Array
  labels: jax.Array
  proxies: jax.Array
  pushed: jax.Array


def queue_steps(num_steps: int, step_gap: int) -> int:
  """Q = N(M + 1) + 1: the steps the queues hold (see the module docstring)."""
  return num_steps * (step_gap + 1) + 1


def queue_bytes(*, num_classes: int, embed_dim: int, batch_size: int, num_steps: int, step_gap: int,
                dtype: str) -> int:
  """(N(M + 1) + 1) x ((C + B) x D x s + 4 B): the queues' size in bytes."""
  itemsize = jnp.dtype(DTYPES[dtype]).itemsize
  per_step = (num_classes + batch_size) * embed_dim * itemsize + 4 * batch_size
  return queue_steps(num_steps, step_gap) * per_step


@tunable(num_steps=Int(2, 50, log=True), step_gap=Int(1, 30, log=True),
         warmup_steps=ShareOfRun(0.0, 0.75))
class MemoryVirtualClasses(References):
  """Class proxies and, after the warm-up, past steps' embeddings and proxies as virtual classes.

  Args:
    num_classes: C, the training classes.
    init, init_std: how the proxies are drawn (references/proxies.py).
    num_steps: N, the most past steps used at once (MemVir: 45 for NormSoftmax, 20 for ProxyNCA).
    step_gap: M, the steps skipped between two used ones (MemVir: 10 and 25).
    warmup_steps: U, the steps (0-based count of completed steps) before the first push.
    batch_size: B, the rows of every batch (the queues' shape).
    dtype: "float32" or "bfloat16", what the queues store ("float64" for checks in double precision).
    max_memory_gb: the queues may take at most this many GB (1e9 bytes); more is refused at init.
    class_block: 0, S [(N + 1) B, (N + 1) C] whole; b > 0, the loss over blocks of b classes read
      from the proxies and the queues in place (losses/class_blocks.py), never more than
      [(N + 1) B, b] at once.
    class_shards: 0, or k > 0: the proxies and the queue of past proxies padded to a multiple of k
      classes and split along their class axis over the devices (references/proxies.py); the loss
      then runs over blocks (of class_block, or of every class of a device's shard with 0).
  """
  kind = "proxy"

  def __init__(self, num_classes: int, *, init: str, init_std: float, num_steps: int,
               step_gap: int, warmup_steps: int, batch_size: int, dtype: str,
               max_memory_gb: float, class_block: int = 0, class_shards: int = 0):
    checks = [
        (init in INITS, f"init={init!r} is not one of {INITS}"),
        (num_steps >= 1, f"num_steps (N) must be >= 1, got {num_steps}"),
        (step_gap >= 0, f"step_gap (M) must be >= 0, got {step_gap}"),
        (warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}"),
        (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
        (dtype in DTYPES, f"dtype={dtype!r} is not one of {tuple(DTYPES)}"),
        (max_memory_gb > 0, f"max_memory_gb must be positive, got {max_memory_gb}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"references.memvir.{message}.")
    check_class_block(class_block, class_shards, "references.memvir")
    self.proxies = ClassProxies(num_classes, init=init, init_std=init_std, class_shards=class_shards)
    self.class_block = class_block
    self.class_shards = class_shards
    self.num_classes = num_classes
    self.num_steps = num_steps
    self.step_gap = step_gap
    self.warmup_steps = warmup_steps
    self.batch_size = batch_size
    self.dtype = dtype
    self.max_memory_gb = max_memory_gb

  def init(self, rng: jax.Array, embed_dim: int):
    self.check_memory(embed_dim)
    params, _ = self.proxies.init(rng, embed_dim)
    slots, dtype = queue_steps(self.num_steps, self.step_gap), DTYPES[self.dtype]
    zeros = lambda shape: stored_bits(jnp.zeros(shape, dtype))
    return params, VirtualClassQueues(
        embeddings=zeros((slots, self.batch_size, embed_dim)),
        labels=jnp.zeros((slots, self.batch_size), jnp.int32),
        proxies=zeros((slots, self.padded_classes, embed_dim)),
        pushed=jnp.zeros((), jnp.int32))

  @property
  def padded_classes(self) -> int:
    """C', the proxies' rows (C padded for the class shards); class ids of past step j start at j C'."""
    return padded_classes(self.num_classes, self.class_shards)

  def check_memory(self, embed_dim: int) -> None:
    """Raises ValueError, with the formula and its numbers, when the queues exceed the budget."""
    size = queue_bytes(num_classes=self.padded_classes, embed_dim=embed_dim, batch_size=self.batch_size,
                       num_steps=self.num_steps, step_gap=self.step_gap, dtype=self.dtype)
    if size > self.max_memory_gb * 1e9:
      itemsize = jnp.dtype(DTYPES[self.dtype]).itemsize
      n, m, c, b = self.num_steps, self.step_gap, self.padded_classes, self.batch_size
      raise ValueError(
          f"references.memvir: the queues need (N(M+1) + 1) x ((C + B) x D x s + 4B) bytes = "
          f"({n} x {m + 1} + 1) x (({c} + {b}) x {embed_dim} x {itemsize} + 4 x {b}) = "
          f"{size / 1e9:.2f} GB, over references.memvir.max_memory_gb={self.max_memory_gb}: lower "
          f"num_steps or step_gap, store dtype='bfloat16', or raise max_memory_gb.")

  def update(self, state: VirtualClassQueues, params, embeddings: jax.Array, labels: jax.Array,
             step: jax.Array) -> VirtualClassQueues:
    """Pushes (E_t, y_t, W_t before the update) from the warm-up's end on."""
    if embeddings.shape[0] != self.batch_size:
      raise ValueError(f"references.memvir.batch_size={self.batch_size}, but the batch has "
                       f"{embeddings.shape[0]} rows: set it to the batch size.")
    write = jnp.asarray(step) >= self.warmup_steps
    slots = state.labels.shape[0]
    slot = jnp.where(write, state.pushed % slots, slots)  # Out of range: dropped by the scatter.
    dtype = DTYPES[self.dtype]
    embeddings = stored_bits(jax.lax.stop_gradient(embeddings).astype(dtype))
    proxies = stored_bits(jax.lax.stop_gradient(params[PROXY_PARAMS]).astype(dtype))
    return state.replace(
        embeddings=state.embeddings.at[slot].set(embeddings, mode="drop"),
        labels=state.labels.at[slot].set(labels.astype(jnp.int32), mode="drop"),
        proxies=state.proxies.at[slot].set(proxies, mode="drop"),
        pushed=state.pushed + write.astype(jnp.int32))

  def past_steps(self, state: VirtualClassQueues) -> tuple[jax.Array, jax.Array]:
    """(slots [N], available [N]) of steps t - j(M + 1), j = 1..N, after step t's push; a step is
    available when it was pushed."""
    newest = state.pushed - 1  # Step t's push number, -1 during the warm-up.
    number = newest - jnp.arange(1, self.num_steps + 1) * (self.step_gap + 1)
    return number % state.labels.shape[0], number >= 0

  def available(self, state: VirtualClassQueues) -> jax.Array:
    """[N] bool: whether step t - j(M + 1), j = 1..N, is in the queues."""
    return self.past_steps(state)[1]

  def pairs(self, state: VirtualClassQueues, params, embeddings: jax.Array, labels: jax.Array):
    """Pairs [(N + 1) B, (N + 1) C] of E' against W' (module docstring), unavailable steps masked; with
    a class block or class shards, their ClassBlocks (S never whole).

    S whole is built in blocks, so that its block of past embeddings against past proxies, the largest
    and a constant, is computed in the forward pass only: the backward pass costs O(N), not O(N^2).
    """
    n, c, dim, dtype = self.num_steps, self.padded_classes, embeddings.shape[1], embeddings.dtype
    past, available = self.past_steps(state)
    past_embeddings = stored_values(state.embeddings[past]).reshape(n * self.batch_size, dim).astype(
        dtype)
    all_labels = jnp.concatenate([labels, (state.labels[past] + c * jnp.arange(1, n + 1)[:, None])
                                  .reshape(-1).astype(labels.dtype)])  # Step t - j(M + 1): + jC.
    row_valid = jnp.concatenate([jnp.ones(labels.shape, bool), jnp.repeat(available, self.batch_size)])
    if self.class_block or self.class_shards:
      return class_blocks(
          jnp.concatenate([embeddings, past_embeddings]), params[PROXY_PARAMS], all_labels, row_valid,
          num_classes=self.num_classes, class_block=self.class_block, class_shards=self.class_shards,
          more=(losses.ClassGroups(state.proxies, past, available, first_id=c),),
          trained_rows=labels.shape[0])
    proxies = l2_normalize(params[PROXY_PARAMS].astype(dtype))
    past_proxies = l2_normalize(stored_values(state.proxies[past]).reshape(n * c, dim).astype(dtype))
    sim = jnp.block([[embeddings @ proxies.T, embeddings @ past_proxies.T],
                     [past_embeddings @ proxies.T, past_embeddings @ past_proxies.T]])
    column_valid = jnp.concatenate([jnp.ones((c,), bool), jnp.repeat(available, c)])
    own_class = all_labels[:, None] == jnp.arange((n + 1) * c)[None, :]
    return losses.Pairs(sim, own_class & row_valid[:, None],
                        ~own_class & row_valid[:, None] & column_valid[None, :])

  def objective(self, state: VirtualClassQueues, step: jax.Array, pairs: losses.Pairs, loss_fn,
                hparams: dict, multipliers=None):
    loss, metrics = super().objective(state, step, pairs, loss_fn, hparams, multipliers)
    virtual_steps = jnp.sum(self.available(state).astype(jnp.int32))
    return loss, {**metrics, "memvir/virtual_steps": virtual_steps,
                  "memvir/classes": (virtual_steps + 1) * self.num_classes}
