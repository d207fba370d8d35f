"""Run by tests/test_class_blocks.py on 4 CPU devices (XLA's host-platform device count): classes split
over the devices of the mesh give the results of one device.

1. The loss: every kind of proxy loss over the proxies and a queue group, its classes padded and split
   over 4 devices, equals the loss on S whole over the real classes, in value and gradient (float64,
   1e-10).
2. The train step with class shards (MemVir: the proxies, their Adam moments and the queue of past
   proxies split) on 1 and 4 devices equals the step without shards on one device (float32, reduction
   order apart); a checkpoint written on 4 devices restores bit for bit on 2 and on 1, split as asked,
   and the steps that follow equal the uninterrupted run's; a device count that does not divide the
   class shards is refused.
Prints "ok" when every check passes.
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmsi_jax import checkpointing, losses, parallel, step
from mmsi_jax.losses.class_blocks import ClassBlocks, ClassGroups, blocked_loss
from mmsi_jax.models import l2_normalize
from tests.test_step import tiny_demo_config

C, PADDED, SHARDS = 10, 12, 4  # 10 real classes padded to 12: 3 per device on 4, 6 on 2.


def mesh_of(devices: int) -> Mesh:
  return Mesh(np.array(jax.devices()[:devices]), (parallel.DATA_AXIS,))


def check_the_loss():
  rng = np.random.default_rng(0)
  rows = l2_normalize(jnp.asarray(rng.normal(size=(10, 6))))
  proxies = jnp.asarray(rng.normal(size=(PADDED, 6))).at[C:].set(0.0)
  queue = jnp.asarray(rng.normal(size=(5, PADDED, 6)))  # Past proxies: groups 1 and 2, at slots 4, 0.
  slots, available = jnp.asarray([4, 0]), jnp.asarray([True, False])
  labels = jnp.asarray(rng.integers(0, C, 10) + PADDED * rng.integers(0, 2, 10))
  valid = jnp.asarray(np.arange(10) < 9)
  ids = jnp.concatenate([jnp.arange(C), PADDED + jnp.arange(C)])  # The real classes of the groups
  columns_of = lambda w: jnp.concatenate([w[:C], queue[4, :C]])   # available.
  mesh = mesh_of(4)
  for name in ("norm_softmax", "arcface", "proxy_anchor"):
    loss_fn = losses.get_proxy_loss(name)

    def whole(r, w):
      own = labels[:, None] == ids[None, :]
      return loss_fn(r @ l2_normalize(columns_of(w)).T, own & valid[:, None], ~own & valid[:, None])

    def sharded(r, w):
      blocks = ClassBlocks((r, w), labels, valid, block=2, num_classes=C, shard_axis=parallel.DATA_AXIS,
                           more=(ClassGroups(queue, slots, available, first_id=PADDED),))
      return blocked_loss(loss_fn, blocks, {})[0]

    value, grads = jax.jit(jax.value_and_grad(whole, argnums=(0, 1)))(rows, proxies)
    with jax.set_mesh(mesh):
      got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(rows, proxies)
    np.testing.assert_allclose(got, value, rtol=1e-10)
    for a, b in zip(got_grads, grads):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def check_the_step():
  def config_of(shards):
    config = tiny_demo_config("memvir_norm_softmax")
    config.data.sampler = "random"
    config.references.memvir.update(num_steps=2, step_gap=0, warmup_steps=0, batch_size=12,
                                    class_block=2, class_shards=shards)
    return config

  rng = np.random.default_rng(0)
  batches = [{"images": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
              "labels": rng.integers(0, C, 12).astype(np.int32)} for _ in range(4)]
  steps = {}

  def run(shards, devices, state=None, first=0, count=2):
    components = step.build(config_of(shards), num_classes=C)
    mesh = mesh_of(devices)
    if state is None:
      state = step.create_train_state(jax.random.PRNGKey(0), components, (32, 32, 3))
    sharding = step.state_sharding(components, state, mesh)
    state = jax.device_put(state, sharding)
    if (shards, devices) not in steps:
      steps[shards, devices] = step.make_train_step(components, mesh, sharding=sharding)
    for batch in batches[first:first + count]:
      state, metrics = steps[shards, devices](state, parallel.global_batch(batch, mesh))
    return state, metrics

  def assert_close(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
      x, y = np.asarray(x), np.asarray(y)
      assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(y) + 1e-6, (what, jax.tree_util.keystr(path))

  whole, whole_metrics = run(0, 1)
  assert int(whole_metrics["memvir/classes"]) == 2 * C  # The second step trains on virtual classes.
  for devices in (1, 4):
    state, metrics = run(SHARDS, devices)
    for array in (state.params["proxies"], state.references.proxies):
      assert array.shape[-2] == PADDED
      assert array.sharding.shard_shape(array.shape)[-2] == PADDED // devices
    np.testing.assert_array_equal(np.asarray(state.params["proxies"])[C:], 0)  # Nobody's classes.
    np.testing.assert_allclose(metrics["train/loss"], whole_metrics["train/loss"], rtol=1e-5)
    real = {**state.params, "proxies": state.params["proxies"][:C]}
    assert_close(real, whole.params, f"{devices} devices")

  try:  # 6 shards cannot be split over 4 devices: refused, with what to set.
    step.state_sharding(step.build(config_of(6), num_classes=C), state, mesh_of(4))
    raise AssertionError("6 class shards on 4 devices were accepted")
  except ValueError as e:
    assert "class_shards=6 is not a multiple of the 4 devices" in str(e), e

  straight, _ = run(SHARDS, 4, first=2, state=state)  # state: 2 steps on 4 devices.
  with tempfile.TemporaryDirectory() as workdir:
    mngr = checkpointing.manager(workdir, 1)
    checkpointing.save(mngr, 2, state)
    mngr.wait_until_finished()
    for devices in (2, 1):
      components = step.build(config_of(SHARDS), num_classes=C)
      fresh = step.create_train_state(jax.random.PRNGKey(1), components, (32, 32, 3))
      target = jax.device_put(fresh, step.state_sharding(components, fresh, mesh_of(devices)))
      restored, restored_step = checkpointing.restore_latest(mngr, target)
      assert restored_step == 2
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      proxies = restored.params["proxies"]
      assert proxies.sharding.shard_shape(proxies.shape) == (PADDED // devices, proxies.shape[1])
      continued, _ = run(SHARDS, devices, state=restored, first=2)
      assert_close(continued.params, straight.params, f"restored on {devices} devices")


if __name__ == "__main__":
  assert jax.device_count() == 4, jax.devices()
  with jax.enable_x64(True):
    check_the_loss()
  check_the_step()
  print("ok")
