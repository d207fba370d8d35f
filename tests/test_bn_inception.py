"""BN-Inception: the published architecture's size, shapes, frozen BatchNorm, and loading torch weights
(.npz, and .pth in torch.save's zip and legacy formats, written here without torch)."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mmsi_jax import mining, models
from mmsi_jax.models import torch_weights
from mmsi_jax.models.bn_inception import AuxiliaryBranch, pool_ceil
from tests import torch_files
from tests.test_models import updated_statistics


def random_variables(model, images, seed=0):
  """Variables of the model's shapes filled with numpy random values (model.init would spend tens of
  seconds compiling one random initializer per distinct shape)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1
    return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def backbone_tree(variables):
  """{module: {leaf: array}} of the backbone's params and batch statistics together."""
  tree = collections.defaultdict(dict)
  for collection in ("params", "batch_stats"):
    for module, leaves in variables.get(collection, {}).get("backbone", {}).items():
      tree[module].update(leaves)
  return dict(tree)


def test_parameter_count_and_feature_size_match_the_published_architecture():
  model = models.get("bn_inception", embed_dim=512)
  variables, features = jax.eval_shape(lambda: (
      lambda v: (v, model.apply(v, jnp.zeros((1, 224, 224, 3)), method="features")))(
          model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))))
  trunk = variables["params"]["backbone"]
  # pretrainedmodels' bninception: 11,295,240 parameters, of which 1024 x 1000 + 1000 in its classifier.
  assert sum(x.size for x in jax.tree.leaves(trunk)) == 11_295_240 - 1_025_000
  assert len([k for k in trunk if not k.endswith("_bn")]) == 69  # Convolutions, each with a BatchNorm.
  assert features.shape == (1, 1024)
  assert sum(x.size for x in jax.tree.leaves(variables["params"]["head"])) == 1024 * 512 + 512


def test_shapes_unit_norm_and_training_mode_at_64_px():
  model = models.get("bn_inception", embed_dim=8, pooling="max_plus_avg")
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  variables = random_variables(model, images)

  @jax.jit  # One compilation for both modes.
  def apply(variables, images):
    return (model.apply(variables, images, method="features_and_embeddings"),
            model.apply(variables, images, train=True, mutable=["batch_stats"])[1])

  (features, embeddings), updates = apply(variables, images)
  assert features.shape == (2, 1024) and embeddings.shape == (2, 8)
  np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  changed = updated_statistics(updates, variables)
  assert all(changed)  # Training mode updates every running statistic.


def test_frozen_batch_norm_is_constant_and_not_a_parameter():
  model = models.get("bn_inception", embed_dim=4, frozen_bn=True)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = random_variables(model, images)
  params = variables["params"]["backbone"]
  assert not [k for k in params if k.endswith("_bn")]  # Scale and offset are not trained ...
  assert set(variables["batch_stats"]["backbone"]["conv1_7x7_s2_bn"]) == {"mean", "var", "scale", "bias"}
  # The same weights unfrozen give the same inference output.
  unfrozen = models.get("bn_inception", embed_dim=4)
  tree = backbone_tree(variables)
  unfrozen_vars = {
      "params": {"head": variables["params"]["head"], "backbone": {
          m: {k: v for k, v in leaves.items() if k not in ("mean", "var")} if m.endswith("_bn")
          else leaves for m, leaves in tree.items()}},
      "batch_stats": {"backbone": {m: {k: leaves[k] for k in ("mean", "var")}
                                   for m, leaves in tree.items() if m.endswith("_bn")}}}

  @jax.jit  # One compilation for the three.
  def apply(variables, unfrozen_vars, images):
    return (model.apply(variables, images, train=True, mutable=["batch_stats"]),
            model.apply(variables, images), unfrozen.apply(unfrozen_vars, images))

  (train_out, updates), eval_out, unfrozen_out = apply(variables, unfrozen_vars, images)
  np.testing.assert_allclose(train_out, eval_out, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)  # ... and nothing changes in training mode.
  np.testing.assert_allclose(unfrozen_out, eval_out, rtol=1e-5, atol=1e-6)


def test_weights_load_by_torch_name_and_a_bad_shape_names_the_parameter(tmp_path):
  images = jnp.zeros((1, 32, 32, 3))
  source = random_variables(models.get("bn_inception", embed_dim=4), images, seed=1)
  state = torch_weights.to_state_dict(backbone_tree(source))
  assert state["conv1_7x7_s2.weight"].shape == (64, 3, 7, 7)
  state["conv2_3x3_bn.weight"] = state["conv2_3x3_bn.weight"][None]  # Caffe-converted [1, C] vector.
  state["last_linear.weight"] = np.zeros((1000, 1024), np.float32)  # The classifier is ignored.
  path = str(tmp_path / "bn_inception.npz")
  np.savez(path, **state)
  for frozen_bn in (False, True):
    model = models.get("bn_inception", embed_dim=4, frozen_bn=frozen_bn, pretrained=path)
    loaded = jax.jit(model.init)(jax.random.PRNGKey(0), images)  # Jitted: seconds faster.
    expected, got = backbone_tree(source), backbone_tree(loaded)
    assert got.keys() == expected.keys()
    for module in expected:
      for leaf in expected[module]:
        np.testing.assert_array_equal(got[module][leaf], expected[module][leaf], err_msg=module)

  state["inception_4d_3x3.weight"] = state["inception_4d_3x3.weight"][:, :64]
  np.savez(path, **state)
  with pytest.raises(torch_weights.WeightsError, match=r"'inception_4d_3x3.weight' has shape "
                     r"\[192, 64, 3, 3\] in the file but the model expects \[192, 128, 3, 3\]"):
    jax.eval_shape(models.get("bn_inception", pretrained=path).init, jax.random.PRNGKey(0), images)
  with pytest.raises(torch_weights.WeightsError, match="no such file.*pretrained=''"):
    models.get("bn_inception", pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_files_are_read_without_torch(tmp_path, legacy):
  rng = np.random.default_rng(0)
  state = {"a.weight": rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
           "a.bias": rng.normal(size=(4,)).astype(np.float32),
           "fc.weight": rng.normal(size=(5, 6)).astype(np.float32)}  # Stored transposed: strided.
  path = str(tmp_path / "weights.pth")
  torch_files.write_state_dict(path, state, legacy)
  read = torch_weights.read_state_dict(path)
  assert read.keys() == state.keys()
  for key in state:
    np.testing.assert_array_equal(read[key], state[key])


def np_average_pool_ceil(x, window, stride):
  """Caffe's average pooling without padding, ceil mode: the last window clipped to the map, averaged
  over the positions it covers."""
  n, h, w, c = x.shape
  rows, cols = (-(-max(size - window, 0) // stride) + 1 for size in (h, w))
  out = np.zeros((n, rows, cols, c))
  for i in range(rows):
    for j in range(cols):
      out[:, i, j] = x[:, i * stride:min(i * stride + window, h),
                       j * stride:min(j * stride + window, w)].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("size, expected", [(7, 2), (14, 4), (8, 2), (2, 1), (1, 1)])
def test_average_pooling_in_ceil_mode_is_caffes(size, expected):
  x = np.random.default_rng(size).normal(size=(2, size, size, 3))
  pooled = np.asarray(pool_ceil(jnp.asarray(x), 5, 3, "avg"))
  assert pooled.shape == (2, expected, expected, 3)
  np.testing.assert_allclose(pooled, np_average_pool_ceil(x, 5, 3), rtol=1e-6, atol=1e-6)


def np_batch_norm_relu(y, leaves):
  """Training-mode BatchNorm over every axis but the last (biased variance, eps 1e-5), then ReLU."""
  axes = tuple(range(y.ndim - 1))
  normalised = (y - y.mean(axis=axes)) / np.sqrt(y.var(axis=axes) + 1e-5)
  return np.maximum(normalised * leaves["scale"] + leaves["bias"], 0.0)


def np_auxiliary_branch(x, params):
  """The branch of the OSM + CAA authors' layout: average pool 5/3 (ceil), 1x1 conv 128 + BN + ReLU,
  flatten, FC + BN + ReLU."""
  y = np_average_pool_ceil(x, 5, 3)
  y = np_batch_norm_relu(y @ params["conv"]["kernel"][0, 0] + params["conv"]["bias"], params["conv_bn"])
  y = y.reshape(len(y), -1) @ params["fc"]["kernel"] + params["fc"]["bias"]
  return np_batch_norm_relu(y, params["fc_bn"])


def test_osm_caa_layout_embeds_the_inception_4e_branch():
  """The authors' layout: the features are [pool5 | 4e branch | 3c branch], the branches read the
  inception_4e and inception_3c maps (a NumPy forward of each branch on the map it read), and the
  embedding is the 4e branch, L2-normalised, with no linear head."""
  model = models.get("bn_inception", embed_dim=8, pooling="avg", layout="osm_caa")
  assert model.feature_groups == (("pool5", 1024), ("inception_4e", 8), ("inception_3c", 1024))

  def forward(variables, images):
    """Jitted: the outputs, and the maps the branches read (intercepted as they are called)."""
    branch_inputs = {}

    def record_branch_inputs(call, args, kwargs, context):
      if isinstance(context.module, AuxiliaryBranch) and context.method_name == "__call__":
        branch_inputs[context.module.name] = args[0]
      return call(*args, **kwargs)

    with nn.intercept_methods(record_branch_inputs):
      outputs = model.apply(variables, images, train=True, mutable=["batch_stats"],
                            method="features_and_embeddings")
    return outputs, branch_inputs

  with jax.enable_x64(True):  # BatchNorm over 3 samples: float64 for a tight comparison.
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 64, 3), jnp.float64)
    variables = jax.tree.map(lambda x: x.astype(jnp.float64), random_variables(model, images))
    ((features, embeddings), updates), branch_inputs = jax.jit(forward)(variables, images)
    features, embeddings, params, branch_inputs = jax.tree.map(
        np.asarray, (features, embeddings, variables["params"]["backbone"], branch_inputs))
  assert models.HEAD not in variables["params"]
  assert features.shape == (3, 1024 + 8 + 1024) and embeddings.shape == (3, 8)
  # At 64 px the inception_4e map is 2 x 2 x 1056 and the inception_3c map 4 x 4 x 576.
  assert branch_inputs["inception_4e_branch"].shape == (3, 2, 2, 1056)
  assert branch_inputs["inception_3c_branch"].shape == (3, 4, 4, 576)
  for name, columns in (("inception_4e_branch", slice(1024, 1032)),
                        ("inception_3c_branch", slice(1032, None))):
    expected = np_auxiliary_branch(branch_inputs[name].astype(np.float64), params[name])
    np.testing.assert_allclose(features[:, columns], expected, rtol=1e-9, atol=1e-9)
  branch = features[:, 1024:1032]
  np.testing.assert_allclose(embeddings, branch / np.linalg.norm(branch, axis=1, keepdims=True),
                             rtol=1e-12)
  assert set(updates["batch_stats"]["backbone"]) >= {"inception_4e_branch", "inception_3c_branch"}
  with pytest.raises(ValueError, match="no head"):
    mining.MINERS.build("mmsi", dict(default.get_config().miner.mmsi, scope="head"),
                        where="miner.mmsi", model=model, pair_loss=None, hparams={}, num_classes=4)
  with pytest.raises(ValueError, match="model.layout='branches'"):
    models.get("bn_inception", layout="branches")
