"""PyTorch state dicts without torch: read them, and map their names and layouts to a Flax tree.

`read_state_dict(path)` reads `{name: array}` from
  - `.npz`: any state dict, converted where torch is installed with
        import numpy as np, torch
        sd = torch.load("bn_inception-52deb4733.pth", map_location="cpu")
        np.savez("bn_inception.npz", **{k: v.numpy() for k, v in sd.items()})
  - `.pth` / `.pt`: torch.save's zip format (torch >= 1.6) and its earlier legacy format (the one of the
    2017 `pretrainedmodels` files), float tensors only, read with numpy and a restricted unpickler.

Names map one to one when the Flax modules carry the torch modules' names: the Flax leaf
`<module>/{kernel, bias, scale, mean, var}` is the torch entry `<module>.{weight, bias, weight,
running_mean, running_var}`. Layouts: a conv kernel [O, I, kh, kw] -> [kh, kw, I, O], a linear weight
[out, in] -> [in, out]; a vector stored as [1, C] (the converted Caffe files do) is accepted for [C].
`initializer` gives a Flax initializer that returns the file's value, checking its shape, and
`to_state_dict` the inverse map (for tests, and to export weights).
"""

import collections
import os
import pickle
import zipfile
from typing import Callable

import jax.numpy as jnp
import numpy as np

TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class WeightsError(ValueError):
  """A weights file is missing, unreadable, or does not fit the model."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """`{name: array}` of a PyTorch state dict saved as .npz or by torch.save (.pth, .pt)."""
  if not os.path.isfile(path):
    raise WeightsError(f"No weights file at {path!r}.")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  try:
    if zipfile.is_zipfile(path):
      state = _read_zip(path)
    else:
      with open(path, "rb") as f:
        state = _read_legacy(f)
  except (pickle.UnpicklingError, KeyError, EOFError, ValueError) as e:
    raise WeightsError(f"{path}: not a readable PyTorch state dict ({e}). Convert it to .npz with "
                       f"torch (see mmsi_jax/models/torch_weights.py).") from e
  if "state_dict" in state and isinstance(state["state_dict"], dict):  # A training checkpoint.
    state = state["state_dict"]
  return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, np.ndarray)}


class _Storage:
  """A torch storage to be filled from the file: its dtype and number of elements."""

  def __init__(self, dtype, numel):
    self.dtype, self.numel, self.data = dtype, numel, None


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2), on a numpy buffer; returns a lazy view (storage is filled later
  in the legacy format)."""
  return ("tensor", storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
  """Unpickles only what a state dict holds: dicts, tensors and storages."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage
    self.storages = {}

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module in ("torch", "torch.cuda") and name in _DTYPES:  # Storage types, by name.
      return name
    raise pickle.UnpicklingError(f"unsupported object {module}.{name}")

  def persistent_load(self, saved_id):
    kind, storage_type, key, _, numel, *view = saved_id
    if kind != "storage" or storage_type not in _DTYPES:
      raise pickle.UnpicklingError(f"unsupported persistent object {saved_id[:2]}")
    if view and view[0] is not None:
      raise pickle.UnpicklingError("storage views (torch < 0.4) are not supported")
    if key not in self.storages:
      self.storages[key] = _Storage(np.dtype(_DTYPES[storage_type]), numel)
      self._load_storage(key, self.storages[key])
    return self.storages[key]


def _materialize(obj):
  if isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "tensor":
    _, storage, offset, size, stride = obj
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage.data[offset:], shape=size, strides=[s * item for s in stride]).copy()
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  return obj


def _read_zip(path: str) -> dict:
  with zipfile.ZipFile(path) as z:
    root = next(n for n in z.namelist() if n.endswith("data.pkl")).removesuffix("data.pkl")

    def load_storage(key, storage):
      storage.data = np.frombuffer(z.read(f"{root}data/{key}"), storage.dtype, storage.numel)

    with z.open(f"{root}data.pkl") as f:
      return _materialize(_Unpickler(f, load_storage).load())


def _read_legacy(f) -> dict:
  if pickle.load(f) != _LEGACY_MAGIC:
    raise pickle.UnpicklingError("not a torch.save file")
  pickle.load(f)  # Protocol version.
  pickle.load(f)  # System info.
  unpickler = _Unpickler(f, lambda key, storage: None)
  obj = unpickler.load()
  for key in pickle.load(f):  # The storages follow, each as int64 numel + raw data.
    storage = unpickler.storages[key]
    numel = int(np.frombuffer(f.read(8), "<i8")[0])
    storage.data = np.frombuffer(f.read(numel * storage.dtype.itemsize), storage.dtype, numel)
  return _materialize(obj)


def to_torch_layout(flax_value: np.ndarray) -> np.ndarray:
  """A Flax leaf in torch's layout: conv kernels [kh, kw, I, O] -> [O, I, kh, kw], dense [in, out] ->
  [out, in], vectors unchanged."""
  if flax_value.ndim == 4:
    return np.transpose(flax_value, (3, 2, 0, 1))
  return np.transpose(flax_value) if flax_value.ndim == 2 else flax_value


def from_torch_layout(name: str, value: np.ndarray, shape: tuple, source: str) -> np.ndarray:
  """The file's `value` for torch entry `name` as a Flax leaf of `shape`; a mismatch is an error
  naming the entry and both shapes (in torch's layout)."""
  expected = to_torch_layout(np.empty(shape, np.bool_)).shape
  if len(shape) == 1 and value.size == shape[0] and all(d == 1 for d in value.shape[:-1]):
    value = value.reshape(shape)  # [1, C] vectors of the converted Caffe models.
  if value.shape != expected:
    raise WeightsError(f"{source}: {name!r} has shape {list(value.shape)} in the file but the model "
                       f"expects {list(expected)}.")
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  return np.transpose(value) if value.ndim == 2 else value


def initializer(state_dict: dict, module: str, leaf: str, source: str) -> Callable:
  """A Flax initializer `(key, shape, dtype) -> array` returning the file's value of `module`'s
  `leaf` (a Flax name: kernel, bias, scale, mean, var)."""
  name = f"{module}.{TORCH_LEAF[leaf]}"

  def init(key, shape, dtype=jnp.float32):
    del key
    if name not in state_dict:
      raise WeightsError(f"{source}: no entry {name!r}; is it a state dict of this architecture?")
    return jnp.asarray(from_torch_layout(name, state_dict[name], tuple(shape), source), dtype)

  return init


def to_state_dict(tree: dict) -> dict[str, np.ndarray]:
  """The torch state dict of a tree of Flax modules `{module: {leaf: array}}` (e.g. a backbone's
  params and batch statistics merged), with torch's names and layouts."""
  return {f"{module}.{TORCH_LEAF[leaf]}": to_torch_layout(np.asarray(value))
          for module, leaves in tree.items() for leaf, value in leaves.items()}
