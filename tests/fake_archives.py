"""Tiny fake versions of the official archives of CUB-200-2011, Cars196 and SOP, in their exact layouts.

Each `make_*` writes the archives into a directory and returns a `FakeDataset`: what a correct build must
contain, and the one image written corrupt (a truncated JPEG) that it must skip.
"""

import dataclasses
import io
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image
from scipy import io as scipy_io


@dataclasses.dataclass
class FakeDataset:
  manual_dir: str
  expected: dict  # split -> {file_name: (class_id, encoded bytes)}
  corrupt: str  # file name of the corrupt image


def jpeg_bytes(seed: int, width: int = 40, height: int = 30) -> bytes:
  """A small, smooth JPEG whose colours depend on the seed."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[0:height, 0:width]
  image = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(xs / 7.0 + ys / 5.0 + seed))[..., None]
  buffer = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def truncated_jpeg() -> bytes:
  data = jpeg_bytes(999, 64, 48)
  return data[:len(data) // 2]


def write_tar(path: str, members: dict) -> None:
  with tarfile.open(path, "w:gz") as archive:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))


def mat_bytes(variables: dict) -> bytes:
  buffer = io.BytesIO()
  scipy_io.savemat(buffer, variables)
  return buffer.getvalue()


def car_annotations(rows: list, with_class: bool = True) -> np.ndarray:
  """A 1 x N MATLAB struct array like the devkit's `annotations`; rows of (class_id, fname)."""
  fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
  annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
  for i, (class_id, fname) in enumerate(rows):
    box = (np.array([[1]]), np.array([[2]]), np.array([[30]]), np.array([[20]]))
    label = (np.array([[class_id]], np.uint8),) if with_class else ()
    annotations[0, i] = box + label + (np.array([fname]),)
  return annotations


def make_cub200(directory: str, *, extra_listed: str = "") -> FakeDataset:
  """4 classes x 3 images (train: classes 1-2); `extra_listed` adds a listed image the archive lacks."""
  class_dirs = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
                "004.Groove_billed_Ani"]
  images, labels, members = [], [], {}
  expected = {"train": {}, "test": {}}
  corrupt = "004.Groove_billed_Ani/Groove_Billed_Ani_0002_1.jpg"
  for class_id, class_dir in enumerate(class_dirs, start=1):
    for i in range(3):
      path = f"{class_dir}/{class_dir[4:]}_{i:04d}_{class_id}.jpg"
      if class_id == 4 and i == 2:
        path = corrupt
      image_id = len(images) + 1
      images.append(f"{image_id} {path}")
      labels.append(f"{image_id} {class_id}")
      data = truncated_jpeg() if path == corrupt else jpeg_bytes(image_id, 40 + 3 * i, 30)
      members[f"CUB_200_2011/images/{path}"] = data
      if path != corrupt:
        expected["train" if class_id <= 2 else "test"][path] = (class_id, data)
  if extra_listed:
    images.append(f"{len(images) + 1} {extra_listed}")
    labels.append(f"{len(labels) + 1} 4")
  members["CUB_200_2011/images/001.Black_footed_Albatross/Stray_rgb.jpg"] = jpeg_bytes(0)  # unlisted
  members.update({
      "attributes.txt": b"1 has_bill_shape::curved\n",
      "CUB_200_2011/README": b"CUB-200-2011\n",
      "CUB_200_2011/images.txt": "\n".join(images).encode() + b"\n",
      "CUB_200_2011/image_class_labels.txt": "\n".join(labels).encode() + b"\n",
      "CUB_200_2011/classes.txt": "\n".join(f"{i} {d}" for i, d in enumerate(class_dirs, 1)).encode(),
      "CUB_200_2011/train_test_split.txt": "\n".join(f"{i + 1} {i % 2}" for i in range(12)).encode(),
  })
  write_tar(os.path.join(directory, "CUB_200_2011.tgz"), members)
  return FakeDataset(directory, expected, corrupt)


def make_cars196(directory: str) -> FakeDataset:
  """4 classes (train: 1-2) over the official train and test halves, 4 images each."""
  halves = {"cars_train": [1, 3, 2, 4], "cars_test": [2, 4, 1, 3]}
  corrupt = "cars_test/00004.jpg"
  expected = {"train": {}, "test": {}}
  annotations = {}
  for offset, (folder, class_ids) in enumerate(halves.items()):
    members = {}
    for i, class_id in enumerate(class_ids, start=1):
      name = f"{folder}/{i:05d}.jpg"
      data = truncated_jpeg() if name == corrupt else jpeg_bytes(10 * offset + i, 36, 28)
      members[name] = data
      if name != corrupt:
        expected["train" if class_id <= 2 else "test"][name] = (class_id, data)
    write_tar(os.path.join(directory, f"{folder}.tgz"), members)
    annotations[folder] = car_annotations([(c, f"{i:05d}.jpg") for i, c in enumerate(class_ids, 1)])
  class_names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
                           "Acura TL Type-S 2008"]], dtype=object)
  unlabelled = car_annotations([(c, f"{i:05d}.jpg") for i, c in enumerate(halves["cars_test"], 1)],
                               with_class=False)
  write_tar(os.path.join(directory, "car_devkit.tgz"), {
      "devkit/README.txt": b"This file gives documentation for the cars 196 dataset.\n",
      "devkit/cars_meta.mat": mat_bytes({"class_names": class_names}),
      "devkit/cars_train_annos.mat": mat_bytes({"annotations": annotations["cars_train"]}),
      "devkit/cars_test_annos.mat": mat_bytes({"annotations": unlabelled}),
      "devkit/train_perfect_preds.txt": b"1\n3\n2\n4\n",
  })
  with open(os.path.join(directory, "cars_test_annos_withlabels.mat"), "wb") as f:
    f.write(mat_bytes({"annotations": annotations["cars_test"]}))
  return FakeDataset(directory, expected, corrupt)


def make_sop(directory: str) -> FakeDataset:
  """Train classes 1-3, test classes 4-6 (2 or 3 images each), two super classes."""
  counts = {1: 2, 2: 3, 3: 2, 4: 3, 5: 2, 6: 2}
  corrupt = "chair_final/400004_1.JPG"
  expected = {"train": {}, "test": {}}
  lists = {"train": ["image_id class_id super_class_id path"],
           "test": ["image_id class_id super_class_id path"]}
  members = {}
  image_id = 0
  for class_id, count in counts.items():
    split = "train" if class_id <= 3 else "test"
    super_id, super_name = (1, "bicycle") if class_id % 2 else (3, "chair")
    for i in range(count):
      image_id += 1
      path = f"{super_name}_final/{class_id * 100_001}_{i}.JPG"
      if class_id == 4 and i == 1:
        path = corrupt
      data = truncated_jpeg() if path == corrupt else jpeg_bytes(image_id, 32, 32 + 4 * i)
      lists[split].append(f"{image_id} {class_id} {super_id} {path}")
      members[f"Stanford_Online_Products/{path}"] = data
      if path != corrupt:
        expected[split][path] = (class_id, data)
  with zipfile.ZipFile(os.path.join(directory, "Stanford_Online_Products.zip"), "w") as archive:
    archive.writestr("Stanford_Online_Products/", b"")
    for split, lines in lists.items():
      archive.writestr(f"Stanford_Online_Products/Ebay_{split}.txt", "\n".join(lines) + "\n")
    archive.writestr("Stanford_Online_Products/Ebay_info.txt", "image_id class_id super_class_id path\n")
    archive.writestr("Stanford_Online_Products/README", "Stanford Online Products\n")
    for name, data in members.items():
      archive.writestr(name, data)
  return FakeDataset(directory, expected, corrupt)


MAKERS = {"cub200": make_cub200, "cars196": make_cars196, "sop": make_sop}
