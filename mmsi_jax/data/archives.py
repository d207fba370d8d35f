"""TFDS builders for datasets that users bring as their official archives (CUB-200-2011, Cars196, SOP).

A dataset module describes only what differs: the archives it needs (`ARCHIVES`), the published split
sizes, and `_catalog`, which reads the archives' own metadata into a list of `Entry` (archive, member path,
original class id, split). `OfficialArchivesBuilder` does the rest, the same way for every dataset:

- checks that every archive is in the manual directory, or fails naming the expected files, their sizes
  and the directory;
- streams the images out of the archives (tar read sequentially, zip by member), never extracting them to
  disk, and writes the original encoded bytes (not re-encoded) with "label" (0-based within the split, in
  the order of the original class ids), "class_id" (the original id) and "file_name";
- decodes every image once: one that fails is reported by file name, skipped and counted (the names are
  kept in the dataset's metadata); an image that the metadata lists but the archive lacks fails the build;
- warns when a split's size differs from the published one.

TFDS writes into a temporary directory and renames it only once every split is complete, so a build that
fails or is killed half-way is never read as a finished one.
"""

import dataclasses
import io
import logging
import os
import tarfile
import zipfile
from typing import Iterable, Iterator

import numpy as np
from PIL import Image
from scipy import io as scipy_io
import tensorflow_datasets as tfds

from mmsi_jax.data import schema
from mmsi_jax.data.transforms import decode_image

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image that a dataset's metadata lists.

  Attributes:
    archive: file name of the archive holding it, in the manual directory.
    member: its path inside the archive.
    file_name: the name it is stored and reported under (unique within its split).
    class_id: the original class id.
    split: "train" or "test".
  """
  archive: str
  member: str
  file_name: str
  class_id: int
  split: str


def first_half_split(class_id: int, num_classes: int) -> str:
  """The DML split of a 1-based class id: the first half of the classes trains, the second half tests."""
  return "train" if class_id <= num_classes // 2 else "test"


def _member_name(name: str) -> str:
  return name[2:] if name.startswith("./") else name


def read_members(path: str, wanted: Iterable[str]) -> Iterator[tuple[str, bytes]]:
  """(member path, bytes) of the wanted members of a tar (any compression) or zip archive, in archive
  order, stopping once all are found. Members the archive lacks are simply not yielded."""
  remaining = set(wanted)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      for info in archive.infolist():
        if not remaining:
          return
        if info.filename in remaining:
          remaining.discard(info.filename)
          yield info.filename, archive.read(info)
    return
  with tarfile.open(path, "r|*") as archive:
    for info in archive:
      if not remaining:
        return
      name = _member_name(info.name)
      if info.isfile() and name in remaining:
        remaining.discard(name)
        yield name, archive.extractfile(info).read()


def read_files(path: str, names: Iterable[str]) -> dict[str, bytes]:
  """The named members of an archive; fails naming those it lacks."""
  names = set(names)
  found = dict(read_members(path, names))
  if len(found) < len(names):
    raise FileNotFoundError(f"{path} lacks {sorted(names - set(found))}: is it the official archive?")
  return found


def decode_error(data: bytes) -> str:
  """Why the encoded image cannot be decoded to RGB, or "" if it can."""
  try:
    decode_image(data)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    return f"{type(e).__name__}: {e}"
  return ""


class OfficialArchivesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder of datasets read from official archives; subclasses set the class attributes below
  and implement `_catalog`.

  Attributes:
    ARCHIVES: file name -> its size, as users see it, of every file needed in the manual directory.
    HOMEPAGE: where users find the archives.
    PUBLISHED_SPLIT_SIZES: split -> number of images in the published dataset.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original JPEG bytes; DML splits (train and test classes disjoint)."}
  ARCHIVES: dict[str, str] = {}
  HOMEPAGE = ""
  PUBLISHED_SPLIT_SIZES: dict[str, int] = {}

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download from {cls.HOMEPAGE} and place in the manual directory:\n"
        + "\n".join(f"  {name} ({size})" for name, size in cls.ARCHIVES.items()))

  @classmethod
  def check_archives(cls, manual_dir) -> None:
    """Fails with the expected files, their sizes and the directory when any archive is missing."""
    missing = [name for name in cls.ARCHIVES
               if not manual_dir or not os.path.isfile(os.path.join(manual_dir, name))]
    if missing:
      where = f"the manual directory {manual_dir!r}" if manual_dir else "a manual directory (none given)"
      raise FileNotFoundError(
          f"Dataset {cls.name!r} needs these files in {where} (missing: {', '.join(missing)}):\n"
          + "\n".join(f"  {name} ({size})" for name, size in cls.ARCHIVES.items())
          + f"\nDownload them from {cls.HOMEPAGE}; pass their directory as --manual_dir (prepare) or "
          "--config.data.manual_dir (training).")

  def _catalog(self, manual_dir: str) -> list[Entry]:
    """Every image the archives' metadata lists, with its class and split."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        homepage=self.HOMEPAGE,
        features=schema.example_features(
            tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    self.check_archives(manual_dir)
    entries = self._catalog(manual_dir)
    return {split: self._generate_examples(manual_dir, [e for e in entries if e.split == split], split)
            for split in SPLITS}

  def _generate_examples(self, manual_dir: str, entries: list[Entry], split: str):
    class_ids = sorted({e.class_id for e in entries})
    label_of = {class_id: label for label, class_id in enumerate(class_ids)}
    by_archive: dict[str, dict[str, Entry]] = {}
    for entry in entries:
      by_archive.setdefault(entry.archive, {})[entry.member] = entry
    written, corrupt = 0, []
    for archive, members in by_archive.items():
      path = os.path.join(manual_dir, archive)
      for member, data in read_members(path, members):
        entry = members.pop(member)
        error = decode_error(data)
        if error:
          logging.warning("%s %s: skipping corrupt image %s (%s)", self.name, split, entry.file_name,
                          error)
          corrupt.append(entry.file_name)
          continue
        written += 1
        yield entry.file_name, {"image": data, "label": label_of[entry.class_id],
                                "class_id": entry.class_id, "file_name": entry.file_name}
      if members:
        raise FileNotFoundError(
            f"{path} lacks {len(members)} images that the dataset's metadata lists, e.g. "
            f"{sorted(members)[:5]}: the archive is incomplete or not the official one.")
    self.info.metadata[f"{split}_corrupt"] = sorted(corrupt)
    published = self.PUBLISHED_SPLIT_SIZES.get(split)
    if written != published:
      logging.warning("%s %s: %d images written (%d corrupt skipped), the published split has %s.",
                      self.name, split, written, len(corrupt), published)


def text_lines(data: bytes) -> list[list[str]]:
  """The whitespace-separated fields of every non-empty line of a text file."""
  return [line.split() for line in data.decode("utf-8").splitlines() if line.strip()]


def mat_struct_array(data: bytes, variable: str) -> np.ndarray:
  """A MATLAB struct array (or cell array) stored as `variable` in a .mat file, as a 1-D array."""
  return np.atleast_1d(scipy_io.loadmat(io.BytesIO(data), squeeze_me=True)[variable])
