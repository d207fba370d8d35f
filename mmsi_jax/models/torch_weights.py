"""PyTorch state dicts without torch: read them safely, and map their names and layouts to a Flax tree.

`read_state_dict(path)` reads `{name: array}` from
  - `.npz`: any state dict, converted where torch is installed with
        import numpy as np, torch
        sd = torch.load("resnet50-0676ba61.pth", map_location="cpu")
        np.savez("resnet50.npz", **{k: v.numpy() for k, v in sd.items()})
    (read with allow_pickle=False);
  - `.pth` / `.pt`: torch.save's zip format (torch >= 1.6) and its earlier legacy format (the one of the
    2017 `pretrainedmodels` files), read with numpy and a restricted unpickler.

A weights file never runs code. Every pickle in it (the legacy format has five: magic number, protocol
version, system info, the state dict, the storage keys) goes through `_Unpickler`, which builds only
numbers, strings, lists, tuples, dicts and the records torch.save writes for tensors
(`torch._utils._rebuild_tensor(_v2)` of a storage whose type names its dtype); any other global or
persistent object is refused, naming the file, the pickle and what was refused. A tensor record is
checked against its storage before it is read (offset, sizes and strides non-negative integers, every
element it views inside the storage, no more elements than the storage holds), a storage against its
record (its declared length against the bytes the file holds for it, before they are read), and a
truncated or corrupt file is a `WeightsError` naming the file, never a crash.

Names map one to one when the Flax modules carry the torch modules' names: the Flax leaf
`<module>/{kernel, bias, scale, mean, var}` is the torch entry `<module>.{weight, bias, weight,
running_mean, running_var}`. Layouts: a conv kernel [O, I, kh, kw] -> [kh, kw, I, O], a linear weight
[out, in] -> [in, out]; a vector stored as [1, C] (the converted Caffe files do) is accepted for [C].
`Pretrained` gives the Flax initializers that return a file's values and, once the model is built,
checks the file against it as a whole (missing, unexpected, mis-shaped and non-float entries, all
listed in one error); `to_state_dict` is the inverse map (for tests, and to export weights).
"""

import collections
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Callable, Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np

TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}

# torch's storage types, as torch.save names them, and their element types.
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
           "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
# Errors a malformed file raises inside the readers; each becomes a WeightsError naming the file.
_MALFORMED = (pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError,
              TypeError, IndexError, AttributeError, struct.error, OverflowError, RecursionError,
              UnicodeDecodeError)


class WeightsError(ValueError):
  """A weights file is missing, unreadable, refused, or does not fit the model."""


class _Refused(pickle.UnpicklingError):
  """A pickle asked for something a state dict does not hold."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """`{name: array}` of a PyTorch state dict saved as .npz or by torch.save (.pth, .pt); entries that
  are not tensors (e.g. a checkpoint's epoch) are dropped, a "module." prefix (DataParallel) removed."""
  if not os.path.isfile(path):
    raise WeightsError(f"No weights file at {path!r}.")
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    with open(path, "rb") as f:
      is_zip = f.read(2) == b"PK"  # A legacy file starts with a pickle's PROTO opcode, 0x80.
    state = _read_zip(path) if is_zip else _read_legacy(path)
  except _Refused as e:
    raise WeightsError(f"{path}: refused: {e}. A weights file holds tensors, numbers, strings and "
                       f"dicts only; this one asks for more (it may try to run code) and was not "
                       f"loaded.") from None
  except _MALFORMED as e:
    raise WeightsError(f"{path}: not a readable PyTorch state dict: {e}. Is the file complete "
                       f"(not truncated by a download)? Convert it to .npz with torch "
                       f"(see mmsi_jax/models/torch_weights.py).") from None
  if not isinstance(state, dict):
    raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict.")
  if isinstance(state.get("state_dict"), dict):  # A training checkpoint.
    state = state["state_dict"]
  return {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, np.ndarray)}


class _StorageType:
  """A torch storage type named in a pickle (e.g. torch.FloatStorage): its dtype, nothing callable."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_DTYPES[name])


class _Storage:
  """A torch storage: its key, dtype, declared number of elements and (once read) its data."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: Optional[np.ndarray] = None


class _TensorRecord:
  """torch._utils._rebuild_tensor(_v2)'s arguments, kept to be checked and read once the storages are
  (the legacy format stores them after the state dict)."""

  def __init__(self, storage, offset, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Unpickler(pickle.Unpickler):
  """Unpickles plain data; with `storage` (key, dtype, numel) -> _Storage, also torch.save's tensor
  records. Everything else is refused."""

  def __init__(self, file, what: str, storage: Optional[Callable] = None):
    super().__init__(file)
    self._what, self._storage = what, storage
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    if self._storage is not None:
      if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
      if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        return _TensorRecord
      if module in ("torch", "torch.cuda") and name in _DTYPES:
        return _StorageType(name)
    raise _Refused(f"{self._what} asks for {module}.{name}")

  def persistent_load(self, pid):
    if self._storage is None:
      raise _Refused(f"{self._what} asks for the persistent object {pid!r:.80}")
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_count(pid[4])):
      raise _Refused(f"{self._what} asks for the persistent object {pid!r:.80} (not a storage record)")
    _, storage_type, key, _, numel, *view = pid
    if view and view[0] is not None:
      raise ValueError(f"storage {key!r} is a storage view (torch < 0.4), which is not supported")
    if key not in self.storages:
      self.storages[key] = self._storage(key, storage_type.dtype, numel)
    storage = self.storages[key]
    if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
      raise ValueError(f"storage {key!r} is declared twice, differently")
    return storage


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _load(f, what: str, storage: Optional[Callable] = None):
  unpickler = _Unpickler(f, what, storage)
  return unpickler.load(), unpickler.storages


def _tensor(record: _TensorRecord, name: str) -> np.ndarray:
  """The array a tensor record views in its storage, after checking that the view lies inside it."""
  storage = record.storage
  if not isinstance(storage, _Storage) or storage.data is None:
    raise ValueError(f"tensor {name!r} has no storage in the file")
  size, stride, offset = record.size, record.stride, record.offset
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
          and len(size) == len(stride) and all(map(_is_count, (*size, *stride, offset)))):
    raise ValueError(f"tensor {name!r} has an invalid view: offset {offset!r:.40}, size {size!r:.80}, "
                     f"stride {stride!r:.80} (non-negative integers, one stride per dimension)")
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.numel or numel > storage.numel:
    raise ValueError(f"tensor {name!r} (offset {offset}, size {list(size)}, stride {list(stride)}) "
                     f"reaches element {last} of storage {storage.key!r}, which holds "
                     f"{storage.numel} elements")
  return np.lib.stride_tricks.as_strided(
      storage.data[offset:], shape=size, strides=[s * storage.dtype.itemsize for s in stride]).copy()


def _materialize(obj, name: str = ""):
  """obj with every tensor record replaced by its array (dicts, lists and tuples walked)."""
  if isinstance(obj, _TensorRecord):
    return _tensor(obj, name)
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, f"{name}.{k}" if name else str(k))) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, f"{name}[{i}]") for i, v in enumerate(obj))
  return obj


def _read_zip(path: str) -> dict:
  with zipfile.ZipFile(path) as z:
    pickles = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"the archive holds {len(pickles)} <name>/data.pkl records, torch.save writes 1")
    root = pickles[0].removesuffix("data.pkl")
    order = "little"
    if f"{root}byteorder" in z.namelist():
      order = z.read(f"{root}byteorder").decode("ascii", "replace")
    if order not in ("little", "big"):
      raise ValueError(f"unknown byte order {order[:20]!r}")

    def read_storage(key: str, dtype: np.dtype, numel: int) -> _Storage:
      entry = f"{root}data/{key}"
      nbytes = numel * dtype.itemsize
      size = z.getinfo(entry).file_size  # KeyError: no such record.
      if size != nbytes:
        raise ValueError(f"storage {key!r} is declared as {numel} x {dtype} ({nbytes} bytes) but its "
                         f"record holds {size} bytes")
      storage = _Storage(key, dtype, numel)
      storage.data = np.frombuffer(z.read(entry), dtype.newbyteorder("<" if order == "little" else ">"))
      return storage

    with z.open(f"{root}data.pkl") as f:
      obj, _ = _load(f, f"{root}data.pkl", read_storage)
  return _materialize(obj)


def _read_legacy(path: str) -> dict:
  with open(path, "rb") as f:
    file_size = os.fstat(f.fileno()).st_size
    magic, _ = _load(f, "the first pickle (magic number)")
    if magic != _LEGACY_MAGIC:
      raise ValueError("neither a zip archive nor a legacy torch.save file (wrong magic number)")
    protocol, _ = _load(f, "the protocol version pickle")
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"legacy protocol version {protocol!r:.40}, expected {_LEGACY_PROTOCOL}")
    system, _ = _load(f, "the system info pickle")
    if not (isinstance(system, dict) and system.get("little_endian") is True):
      raise ValueError(f"system info {system!r:.120}: only little-endian files are supported")
    obj, storages = _load(f, "the state dict pickle", _Storage)
    keys, _ = _load(f, "the storage keys pickle")
    if not (isinstance(keys, list) and sorted(keys) == sorted(storages)):
      raise ValueError(f"the storage keys {keys!r:.120} are not those of the state dict's tensors")
    for key in keys:  # Each storage: its number of elements (int64), then its data.
      storage = storages[key]
      numel = struct.unpack("<q", f.read(8))[0]
      nbytes = numel * storage.dtype.itemsize
      if numel != storage.numel:
        raise ValueError(f"storage {key!r} holds {numel} elements, its record declares {storage.numel}")
      if nbytes > file_size - f.tell():
        raise EOFError(f"storage {key!r} needs {nbytes} bytes, the file has {file_size - f.tell()} left")
      storage.data = np.frombuffer(f.read(nbytes), storage.dtype.newbyteorder("<"))
  return _materialize(obj)


def to_torch_layout(flax_value: np.ndarray) -> np.ndarray:
  """A Flax leaf in torch's layout: conv kernels [kh, kw, I, O] -> [O, I, kh, kw], dense [in, out] ->
  [out, in], vectors unchanged."""
  if flax_value.ndim == 4:
    return np.transpose(flax_value, (3, 2, 0, 1))
  return np.transpose(flax_value) if flax_value.ndim == 2 else flax_value


def _torch_shape(shape: tuple) -> tuple:
  return to_torch_layout(np.empty(shape, np.bool_)).shape


def _caffe_vector(value: np.ndarray, torch_shape: tuple) -> np.ndarray:
  """A [1, ..., 1, C] value as [C] where [C] is expected (the converted Caffe models store vectors so)."""
  if (len(torch_shape) == 1 and value.ndim > 1 and value.size == torch_shape[0]
      and all(d == 1 for d in value.shape[:-1])):
    return value.reshape(torch_shape)
  return value


def from_torch_layout(value: np.ndarray, shape: tuple) -> Optional[np.ndarray]:
  """The file's `value` as a Flax leaf of `shape`, or None if it does not have that shape in torch's
  layout."""
  value = _caffe_vector(value, _torch_shape(shape))
  if value.shape != _torch_shape(shape):
    return None
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  return np.transpose(value) if value.ndim == 2 else value


def require_file(path: str, what: str) -> None:
  """Stops a model's construction when its `pretrained` file is missing; `what` names the weights and
  the file to put there."""
  if path and not os.path.isfile(path):
    from mmsi_jax.models import fetch  # pylint: disable=g-import-not-at-top  (a missing file only)
    command = fetch.command_for(path)
    download = (f"Download it with `{command}` (docs/WEIGHTS.md), or put" if command else
                "Put")
    raise WeightsError(
        f"model.pretrained={path!r}: no such file. {download} {what} there (or that state dict saved "
        f"as .npz: see mmsi_jax/models/torch_weights.py), or pass --config.model.pretrained='' to "
        f"start from random initialisation.")


class Pretrained:
  """The initializers of a model whose parameters come from a torch state dict, by torch name.

  `init(module, leaf, default)` is the initializer of Flax leaf `leaf` of module `module` (named as the
  torch module): the file's value, or `default` without a file (path ""). Entries that are missing,
  mis-shaped or not floating point are noted, not raised one by one: `check()`, called once the model
  has asked for all its parameters, raises one error listing them with the file's unexpected entries
  (those that are neither parameters of the model, nor BatchNorm's step counters, nor under one of the
  `ignored` prefixes, e.g. the ImageNet classifier).
  """

  def __init__(self, path: str, ignored: tuple[str, ...] = ()):
    self.path, self.ignored = path, ignored
    self.state = read_state_dict(path) if path else None
    self.expected: dict[str, tuple] = {}  # Torch name -> shape the model expects, in torch's layout.

  def init(self, module: str, leaf: str, default: Callable) -> Callable:
    if self.state is None:
      return default
    name = f"{module}.{TORCH_LEAF[leaf]}"

    def init(key, shape, dtype=jnp.float32):
      del key
      self.expected[name] = _torch_shape(tuple(shape))
      value = self.state.get(name)
      fitted = None if value is None else from_torch_layout(value, tuple(shape))
      if fitted is None or not jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.zeros(shape, dtype)  # Reported by check().
      return jnp.asarray(fitted, dtype)

    return init

  def check(self) -> None:
    """Raises WeightsError listing every entry of the file that does not fit the model."""
    if self.state is None:
      return
    missing = sorted(set(self.expected) - set(self.state))
    unexpected = sorted(k for k in self.state if k not in self.expected
                        and not k.endswith(".num_batches_tracked") and not k.startswith(self.ignored))
    misshaped, not_float = [], []
    for name in sorted(set(self.expected) & set(self.state)):
      value, shape = self.state[name], self.expected[name]
      if _caffe_vector(value, shape).shape != shape:
        misshaped.append(f"{name!r} has shape {list(value.shape)} in the file but the model expects "
                         f"{list(shape)}")
      elif not jnp.issubdtype(value.dtype, jnp.floating):
        not_float.append(f"{name!r} is {value.dtype} in the file, the model needs floating point")
    problems = [f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                for title, items in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped", misshaped), ("not floating point", not_float))
                if items]
    if problems:
      raise WeightsError(f"{self.path} does not fit the model (is it a state dict of this "
                         f"architecture?): " + "; ".join(problems) + ".")


def to_state_dict(tree: dict) -> dict[str, np.ndarray]:
  """The torch state dict of a tree of Flax modules `{module: {leaf: array}}` (e.g. a backbone's
  params and batch statistics merged), with torch's names and layouts."""
  return {f"{module}.{TORCH_LEAF[leaf]}": to_torch_layout(np.asarray(value))
          for module, leaves in tree.items() for leaf, value in leaves.items()}
