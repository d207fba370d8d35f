"""Crafted weight files: code in every pickle of both torch.save formats, views outside their storage,
storages that lie about their size, truncated files and unsupported dtypes are each refused with an
error naming the file and the reason, and (where the file tries to run code) a marker file proves that
nothing ran. Built with the standard library only (tests/torch_files.py)."""

import os
import pickle

import jax
import numpy as np
import pytest

from mmsi_jax.models import torch_weights
from tests import torch_files
from tests.torch_files import Record, dumps


class RunsCode:
  """Pickles to a call of exec that creates `marker`: what a malicious weights file does."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').close()",))


def float_storage(n):
  return np.arange(n, dtype=np.float32).tobytes()


WEIGHT = {"w": Record("0", 6, (2, 3), (3, 1))}


def test_the_payload_runs_code_under_plain_pickle(tmp_path):
  """The crafted pickles are live: plain pickle.loads creates the marker (the reader must not)."""
  marker = tmp_path / "ran"
  pickle.loads(dumps(RunsCode(marker)))
  assert marker.exists()


def read_refused(path, match):
  with pytest.raises(torch_weights.WeightsError, match=match) as error:
    torch_weights.read_state_dict(str(path))
  assert str(path) in str(error.value)


@pytest.mark.parametrize("part", ["magic", "protocol", "system_info", "state", "keys"])
def test_code_in_any_pickle_of_the_legacy_format_is_refused_and_never_runs(tmp_path, part):
  marker, path = tmp_path / "ran", tmp_path / "weights.pth"
  payload = dumps(RunsCode(marker))
  state = torch_files.state_pickle(WEIGHT, legacy=True)
  parts = {"magic": dumps(torch_files.MAGIC), "protocol": dumps(torch_files.PROTOCOL),
           "system_info": dumps(torch_files.SYSTEM_INFO), "keys": dumps(["0"])}
  if part == "state":  # A state dict whose entry is the payload.
    state = dumps({"w": RunsCode(marker)})
  else:
    parts[part] = payload
  torch_files.write_legacy(path, state, {"0": float_storage(6)}, **parts)
  read_refused(path, r"refused: .* asks for __builtin__\.exec.*may try to run code")
  assert not marker.exists()


@pytest.mark.parametrize("where", ["entry", "rebuild_args", "checkpoint"])
def test_code_in_the_zip_formats_pickle_is_refused_and_never_runs(tmp_path, where):
  marker, path = tmp_path / "ran", tmp_path / "weights.pth"
  payload = RunsCode(marker)
  obj = {"entry": {"w": payload}, "rebuild_args": {"w": [1, 2, payload]},
         "checkpoint": {"epoch": 3, "state_dict": {"optimizer": {"step": payload}}}}[where]
  torch_files.write_zip(path, dumps(obj), {})
  read_refused(path, r"refused: archive/data\.pkl asks for __builtin__\.exec")
  assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_other_torch_globals_and_persistent_objects_are_refused(tmp_path, legacy):
  path = tmp_path / "weights.pth"
  write = torch_files.write_legacy if legacy else torch_files.write_zip
  # A storage type outside the supported dtypes (quantized) is refused by name.
  records = {"w": Record("0", 6, (6,), (1,), storage_type="QInt8Storage")}
  write(path, torch_files.state_pickle(records, legacy), {"0": bytes(6)})
  read_refused(path, r"asks for torch\.QInt8Storage")
  # A persistent object that is not a storage record.
  persistent = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01X\x04\x00\x00\x00evilq\x02Qs."
  write(path, persistent, {})
  read_refused(path, r"asks for the persistent object 'evil'")
  if legacy:  # Persistent objects in a header pickle.
    torch_files.write_legacy(path, torch_files.state_pickle(WEIGHT, True), {"0": float_storage(6)},
                             system_info=b"\x80\x02X\x04\x00\x00\x00evilQ.")
    read_refused(path, r"the system info pickle asks for the persistent object 'evil'")


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("view, match", [
    (dict(size=(2, 3), stride=(3, 1), offset=1), r"'w' \(offset 1, size \[2, 3\], stride \[3, 1\]\) "
                                                 r"reaches element 6 of storage '0', which holds 6"),
    (dict(size=(3, 3), stride=(3, 1)), r"reaches element 8"),
    (dict(size=(2**40,), stride=(0,)), r"reaches element 0 of storage '0', which holds 6"),  # Huge.
    (dict(size=(2**62, 2**62), stride=(1, 1)), r"reaches element"),
    (dict(size=(2, 3), stride=(-3, 1)), r"'w' has an invalid view"),
    (dict(size=(2, 3.0), stride=(3, 1)), r"'w' has an invalid view"),
    (dict(size=(6,), stride=(1,), offset=-1), r"'w' has an invalid view"),
])
def test_views_outside_their_storage_are_refused(tmp_path, legacy, view, match):
  path = tmp_path / "weights.pth"
  record = Record("0", 6, **view)
  write = torch_files.write_legacy if legacy else torch_files.write_zip
  write(path, torch_files.state_pickle({"w": record}, legacy), {"0": float_storage(6)})
  read_refused(path, match)


def test_storages_must_hold_what_their_records_declare(tmp_path):
  path = tmp_path / "weights.pth"
  huge = {"w": Record("0", 2**60, (6,), (1,))}
  torch_files.write_zip(path, torch_files.state_pickle(huge, False), {"0": float_storage(6)})
  read_refused(path, r"storage '0' is declared as 1152921504606846976 x float32 .* holds 24 bytes")
  torch_files.write_zip(path, torch_files.state_pickle(WEIGHT, False), {})
  read_refused(path, r"no item named 'archive/data/0'")
  # Legacy: the storage's own count disagrees with its record, or runs past the end of the file.
  torch_files.write_legacy(path, torch_files.state_pickle(WEIGHT, True), {"0": float_storage(5)})
  read_refused(path, r"storage '0' holds 5 elements, its record declares 6")
  torch_files.write_legacy(path, torch_files.state_pickle(huge, True), {"0": float_storage(6)})
  with open(path, "r+b") as f:  # The count before the data: 2**60, as the record says.
    f.seek(-(8 + 24), os.SEEK_END)
    f.write(np.int64(2**60).tobytes())
  read_refused(path, r"storage '0' needs 4611686018427387904 bytes, the file has 24 left")
  torch_files.write_legacy(path, torch_files.state_pickle(WEIGHT, True), {"0": float_storage(6)},
                           keys=dumps(["0", "1"]))
  read_refused(path, r"storage keys \['0', '1'\] are not those of the state dict's tensors")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_and_corrupt_files_are_clear_errors(tmp_path, legacy):
  path = tmp_path / "weights.pth"
  rng = np.random.default_rng(0)
  state = {"a.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
           "a.bias": rng.normal(size=(8,)).astype(np.float32)}
  torch_files.write_state_dict(path, state, legacy)
  whole = path.read_bytes()
  for cut in (len(whole) - 10, len(whole) // 2, 200, 3):
    path.write_bytes(whole[:cut])
    read_refused(path, r"not a readable PyTorch state dict: .*Is the file complete")
  corrupt = bytearray(whole)
  corrupt[40:104] = bytes(64)  # Inside the (first) pickles.
  path.write_bytes(bytes(corrupt))
  with pytest.raises(torch_weights.WeightsError, match=str(path)):
    torch_weights.read_state_dict(str(path))
  path.write_bytes(b"")
  read_refused(path, r"not a readable PyTorch state dict")


def test_npz_files_never_unpickle(tmp_path):
  path = tmp_path / "weights.npz"
  np.savez(path, w=np.array([{"a": 1}], dtype=object))
  read_refused(path, r"not a readable PyTorch state dict: .*allow_pickle")


def test_a_file_that_does_not_fit_lists_missing_unexpected_misshaped_and_non_float_entries(tmp_path):
  path = tmp_path / "weights.pth"
  records = {"conv.weight": Record("0", 24, (2, 3, 2, 2), (12, 4, 2, 1)),
             "bn.weight": Record("1", 2, (1, 2), (2, 1)),  # A Caffe-converted [1, C] vector: fits.
             "bn.bias": Record("2", 3, (3,), (1,)),
             "bn.running_mean": Record("3", 2, (2,), (1,), storage_type="LongStorage"),
             "bn.num_batches_tracked": Record("4", 1, (), (), storage_type="LongStorage"),
             "fc.weight": Record("5", 6, (3, 2), (2, 1)),
             "extra.weight": Record("6", 1, (1,), (1,))}
  storages = {"0": float_storage(24), "1": float_storage(2), "2": float_storage(3),
              "3": np.zeros(2, np.int64).tobytes(), "4": np.zeros(1, np.int64).tobytes(),
              "5": float_storage(6), "6": float_storage(1)}
  torch_files.write_zip(path, torch_files.state_pickle(records, False), storages)
  weights = torch_weights.Pretrained(str(path), ignored=("fc.",))
  key = jax.random.PRNGKey(0)
  kernel = weights.init("conv", "kernel", None)(key, (2, 2, 3, 2))
  np.testing.assert_array_equal(kernel, np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(weights.init("bn", "scale", None)(key, (2,)), [0, 1])
  for leaf in ("bias", "mean", "var"):
    weights.init("bn", leaf, None)(key, (2,))
  with pytest.raises(torch_weights.WeightsError) as error:
    weights.check()
  assert str(error.value) == (
      f"{path} does not fit the model (is it a state dict of this architecture?): "
      f"missing (1): bn.running_var; unexpected (1): extra.weight; "
      f"mis-shaped (1): 'bn.bias' has shape [3] in the file but the model expects [2]; "
      f"not floating point (1): 'bn.running_mean' is int64 in the file, the model needs floating "
      f"point.")
