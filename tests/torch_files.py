"""torch.save's two file formats written without torch (CI has none), for the weight reader's tests.

`state_pickle(records, legacy)` is the pickle torch.save writes for a dict of tensors, each given as
a `Record` of its storage and view; `write_zip` and `write_legacy` wrap a state pickle and raw storages
into the zip format (torch >= 1.6) or the legacy one (magic number, protocol version, system info,
state dict, storage keys, then each storage as int64 numel + data), with any of those parts
replaceable by other bytes, as the crafted-file tests need. `write_state_dict` writes real arrays.
"""

import collections
import dataclasses
import io
import pickle
import sys
import types
import zipfile
from unittest import mock

import numpy as np

MAGIC = 0x1950a86a20f9469cfc6c
PROTOCOL = 1001
SYSTEM_INFO = {"protocol_version": 1001, "little_endian": True,
               "type_sizes": {"short": 2, "int": 4, "long": 4}}


@dataclasses.dataclass
class Record:
  """A tensor as torch.save pickles it: a view (offset, size, stride in elements) of a storage."""
  key: str
  numel: int
  size: tuple
  stride: tuple
  offset: int = 0
  storage_type: str = "FloatStorage"


def dumps(obj) -> bytes:
  return pickle.dumps(obj, protocol=2)


def state_pickle(records: dict[str, Record], legacy: bool) -> bytes:
  """The pickle of {name: tensor} as torch.save writes it: torch._utils._rebuild_tensor_v2 of a
  persistent storage record; globals stand in for torch's, which are not installed."""
  torch, torch_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("only pickled here")

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  storage_types = {r.storage_type for r in records.values()}
  for name in storage_types:
    setattr(torch, name, type(name, (), {"__module__": "torch"}))

  class Tensor:
    def __init__(self, record):
      self.record = record

    def __reduce__(self):
      r = self.record
      return (_rebuild_tensor_v2, (("storage", r), r.offset, tuple(r.size), tuple(r.stride), False,
                                   collections.OrderedDict()))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage":
        r = obj[1]
        return ("storage", getattr(torch, r.storage_type), r.key, "cpu", r.numel) + (
            (None,) if legacy else ())
      return None

  body = io.BytesIO()
  with mock.patch.dict(sys.modules, {"torch": torch, "torch._utils": torch_utils}):
    Pickler(body, protocol=2).dump(collections.OrderedDict((k, Tensor(r)) for k, r in records.items()))
  return body.getvalue()


def write_zip(path, state: bytes, storages: dict[str, bytes], root: str = "archive") -> None:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{root}/data.pkl", state)
    z.writestr(f"{root}/byteorder", "little")
    for key, data in storages.items():
      z.writestr(f"{root}/data/{key}", data)


def write_legacy(path, state: bytes, storages: dict[str, bytes], itemsize: int = 4, *,
                 magic: bytes = dumps(MAGIC), protocol: bytes = dumps(PROTOCOL),
                 system_info: bytes = dumps(SYSTEM_INFO), keys: bytes = b"") -> None:
  with open(path, "wb") as f:
    f.write(magic + protocol + system_info + state + (keys or dumps(sorted(storages))))
    for key in sorted(storages):
      f.write(np.int64(len(storages[key]) // itemsize).tobytes() + storages[key])


def write_state_dict(path, state: dict[str, np.ndarray], legacy: bool) -> None:
  """torch.save(state, path) of float32 arrays; 2-d ones stored transposed (a strided view)."""
  records, storages = {}, {}
  for i, (name, value) in enumerate(state.items()):
    stored = np.ascontiguousarray(value.T if value.ndim == 2 else value, np.float32)
    view = stored.T if value.ndim == 2 else stored
    records[name] = Record(str(i), stored.size, view.shape, tuple(s // 4 for s in view.strides))
    storages[str(i)] = stored.tobytes()
  (write_legacy if legacy else write_zip)(path, state_pickle(records, legacy), storages)
