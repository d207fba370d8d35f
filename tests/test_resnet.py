"""ResNets as torchvision defines them: torchvision-named weights load (.npz and .pth), the features equal
an independent NumPy forward pass of torchvision's architecture (padding 1 on each side of every 3x3
convolution and of the stem's max pooling), a file that does not fit lists every problem, BatchNorm's
frozen settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsi_jax import models
from mmsi_jax.models import torch_weights
from mmsi_jax.models.embedding import EmbeddingNet
from mmsi_jax.models.resnet import ResNetBackbone
from tests import torch_files
from tests.test_bn_inception import backbone_tree, random_variables


def np_conv(x, w, stride, pad):
  """torch's conv2d without bias: x [N, C, H, W], w [O, C, kh, kw], zero padding `pad` on each side."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = w.shape[2:]
  oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out


def np_batch_norm(x, state, name):
  """torch's BatchNorm2d in eval mode (eps 1e-5)."""
  mean, var, weight, bias = (state[f"{name}.{k}"].reshape(1, -1, 1, 1)
                             for k in ("running_mean", "running_var", "weight", "bias"))
  return (x - mean) / np.sqrt(var + 1e-5) * weight + bias


def np_max_pool_3x3_s2_p1(x):
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  oh, ow = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
  return np.max([x[:, :, i:i + 2 * (oh - 1) + 1:2, j:j + 2 * (ow - 1) + 1:2]
                 for i in range(3) for j in range(3)], axis=0)


def np_resnet_features(state, images, stage_sizes, bottleneck, last_stride=2, stem_relu=True):
  """torchvision's ResNet (eval mode) from its state dict, globally average-pooled: [N, F] float64.
  Basic block: 3x3 (stride) - 3x3; bottleneck: 1x1 - 3x3 (stride) - 1x1 (x4 channels); a projection
  shortcut (1x1 conv with the stride + BN) where the stride is not 1 or the channels change; stride 2
  in the first block of stages 2 and 3, `last_stride` in stage 4's. stem_relu False: XBM's variant."""
  relu = lambda v: np.maximum(v, 0)
  state = {k: v.astype(np.float64) for k, v in state.items()}
  x = np.transpose(images, (0, 3, 1, 2)).astype(np.float64)
  x = np_batch_norm(np_conv(x, state["conv1.weight"], 2, 3), state, "bn1")
  x = np_max_pool_3x3_s2_p1(relu(x) if stem_relu else x)
  for s, num_blocks in enumerate(stage_sizes):
    width = 64 * 2**s
    for b in range(num_blocks):
      name = f"layer{s + 1}.{b}"
      stride = 1 if s == 0 or b > 0 else (last_stride if s == 3 else 2)
      specs = ([(1, 1), (3, stride), (1, 1)] if bottleneck else [(3, stride), (3, 1)])
      y = x
      for i, (kernel, conv_stride) in enumerate(specs, 1):
        w = state[f"{name}.conv{i}.weight"]
        assert w.shape[2] == kernel
        y = np_batch_norm(np_conv(y, w, conv_stride, kernel // 2), state, f"{name}.bn{i}")
        y = relu(y) if i < len(specs) else y
      out_channels = width * (4 if bottleneck else 1)
      if stride != 1 or x.shape[1] != out_channels:
        x = np_batch_norm(np_conv(x, state[f"{name}.downsample.0.weight"], stride, 0), state,
                          f"{name}.downsample.1")
      x = relu(x + y)
  return x.mean(axis=(2, 3))


def torchvision_state(model, images, seed):
  """A random state dict of `model` under torchvision's names and layouts, with BatchNorm scales and
  offsets around (1, 0) so that activations keep their scale through the depth."""
  variables = random_variables(model, images, seed)
  tree = backbone_tree(variables)
  rng = np.random.default_rng(seed)
  for module, leaves in tree.items():
    if "scale" in leaves:
      leaves["scale"] = rng.uniform(0.5, 1.5, leaves["scale"].shape).astype(np.float32)
      leaves["bias"] = rng.normal(0, 0.1, leaves["bias"].shape).astype(np.float32)
      leaves["mean"] = rng.normal(0, 0.1, leaves["mean"].shape).astype(np.float32)
  return torch_weights.to_state_dict(tree)


@pytest.mark.parametrize("stage_sizes, bottleneck, fmt, xbm", [
    ((2, 2, 2, 2), False, "npz", False),  # ResNet-18.
    # ResNet-50's bottlenecks, one block a stage, as XBM's code runs them (last stride 1, no stem ReLU).
    ((1, 1, 1, 1), True, "pth", True),
])
def test_features_equal_a_numpy_torchvision_resnet_with_loaded_weights(tmp_path, stage_sizes,
                                                                      bottleneck, fmt, xbm):
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  options = dict(last_stride=1, stem_relu=False) if xbm else {}
  model = EmbeddingNet(ResNetBackbone(stage_sizes, bottleneck, **options), 4)
  state = torchvision_state(model, images, seed=1)
  assert ("layer1.0.downsample.0.weight" in state) == bottleneck  # Basic blocks keep 64 channels.
  state["fc.weight"] = np.zeros((1000, 2048 if bottleneck else 512), np.float32)  # Ignored.
  path = str(tmp_path / f"resnet.{fmt}")
  if fmt == "npz":
    np.savez(path, **state)
  else:
    torch_files.write_state_dict(path, state, legacy=False)
  model = EmbeddingNet(ResNetBackbone(stage_sizes, bottleneck, pretrained=path, **options), 4)

  @jax.jit
  def init_and_features(images):
    variables = model.init(jax.random.PRNGKey(0), images)
    return variables, model.apply(variables, images, method="features")

  variables, features = init_and_features(images)
  loaded = torch_weights.to_state_dict(backbone_tree(variables))
  assert loaded.keys() == state.keys() - {"fc.weight"}
  for name in loaded:
    np.testing.assert_array_equal(loaded[name], state[name], err_msg=name)
  expected = np_resnet_features(state, images, stage_sizes, bottleneck, **options)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_file_that_does_not_fit_resnet18_lists_every_problem_and_the_factory_checks_the_path(tmp_path):
  images = jnp.zeros((1, 32, 32, 3))
  state = torchvision_state(models.get("resnet18", embed_dim=4), images, seed=0)
  state["bn1.num_batches_tracked"] = np.zeros((), np.int64)  # torchvision's counters are ignored.
  del state["layer4.1.bn2.running_var"]
  state["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:, :32]
  path = str(tmp_path / "resnet18.npz")
  np.savez(path, **state)
  with pytest.raises(torch_weights.WeightsError) as error:
    jax.eval_shape(models.get("resnet18", pretrained=path).init, jax.random.PRNGKey(0), images)
  assert str(error.value) == (
      f"{path} does not fit the model (is it a state dict of this architecture?): missing (1): "
      f"layer4.1.bn2.running_var; unexpected (1): layer5.0.conv1.weight; mis-shaped (1): "
      f"'layer1.0.conv1.weight' has shape [64, 32, 3, 3] in the file but the model expects "
      f"[64, 64, 3, 3].")
  with pytest.raises(torch_weights.WeightsError, match=r"resnet50-0676ba61\.pth.*pretrained=''"):
    models.get("resnet50", pretrained=str(tmp_path / "missing.pth"))


def test_resnet50_has_torchvisions_parameters_and_batch_norm_settings():
  images = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(models.get("resnet50", embed_dim=8).init, jax.random.PRNGKey(0), images)
  trunk = backbone_tree(shapes)
  # torchvision's resnet50: 25,557,032 parameters, of which 2048 x 1000 + 1000 in its classifier.
  params = sum(x.size for x in jax.tree.leaves(shapes["params"]["backbone"]))
  assert params == 25_557_032 - 2_049_000
  assert len(torch_weights.to_state_dict(trunk)) == 320 - 2 - 53  # Less fc and the BN counters.
  assert shapes["params"]["backbone"]["layer2.0.downsample.0"]["kernel"].shape == (1, 1, 256, 512)
  frozen = jax.eval_shape(models.get("resnet50", embed_dim=8, frozen_bn=True).init,
                          jax.random.PRNGKey(0), images)
  assert "bn1" not in frozen["params"]["backbone"]
  assert set(frozen["batch_stats"]["backbone"]["bn1"]) == {"mean", "var", "scale", "bias"}
  affine = jax.eval_shape(models.get("resnet50", embed_dim=8, frozen_bn=True, frozen_bn_affine=False)
                          .init, jax.random.PRNGKey(0), images)
  assert set(affine["params"]["backbone"]["bn1"]) == {"scale", "bias"}
