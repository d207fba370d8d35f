"""Cars196 (Stanford Cars, Krause et al. 2013): 16,185 photographs of 196 car models.

Official files: `cars_train.tgz` (`cars_train/00001.jpg` ... 8,144 images), `cars_test.tgz`
(`cars_test/00001.jpg` ... 8,041 images), `car_devkit.tgz` (`devkit/cars_meta.mat`: cell array
`class_names`; `devkit/cars_train_annos.mat`: struct array `annotations` with fields bbox_x1, bbox_y1,
bbox_x2, bbox_y2, class, fname) and `cars_test_annos_withlabels.mat` (the same struct array for the test
images, with their classes). Class ids 1-196. DML splits, over the images of both official halves:
classes 1-98 train (8,054 images), 99-196 test (8,131).
"""

import os

from mmsi_jax.data import archives

TRAIN_IMAGES = "cars_train.tgz"
TEST_IMAGES = "cars_test.tgz"
DEVKIT = "car_devkit.tgz"
TEST_ANNOTATIONS = "cars_test_annos_withlabels.mat"


class Cars196(archives.OfficialArchivesBuilder):
  """Cars196 with the DML splits: train = classes 1-98, test = classes 99-196."""

  ARCHIVES = {
      TRAIN_IMAGES: "about 0.98 GB",
      TEST_IMAGES: "about 0.98 GB",
      DEVKIT: "about 330 kB",
      TEST_ANNOTATIONS: "about 185 kB",
  }
  HOMEPAGE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
  PUBLISHED_SPLIT_SIZES = {"train": 8_054, "test": 8_131}

  def _catalog(self, manual_dir: str) -> list[archives.Entry]:
    devkit = archives.read_files(os.path.join(manual_dir, DEVKIT),
                                 ["devkit/cars_meta.mat", "devkit/cars_train_annos.mat"])
    with open(os.path.join(manual_dir, TEST_ANNOTATIONS), "rb") as f:
      test_annotations = f.read()
    num_classes = len(archives.mat_struct_array(devkit["devkit/cars_meta.mat"], "class_names"))
    entries = []
    for archive, annotations in ((TRAIN_IMAGES, devkit["devkit/cars_train_annos.mat"]),
                                 (TEST_IMAGES, test_annotations)):
      folder = archive.removesuffix(".tgz")
      for record in archives.mat_struct_array(annotations, "annotations"):
        class_id = int(record["class"])
        name = f"{folder}/{record['fname']}"
        entries.append(archives.Entry(archive, name, name, class_id,
                                      archives.first_half_split(class_id, num_classes)))
    return entries
