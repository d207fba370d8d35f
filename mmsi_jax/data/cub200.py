"""CUB-200-2011 (Wah et al. 2011): 11,788 photographs of 200 bird species, from `CUB_200_2011.tgz`.

Official layout inside the archive, under `CUB_200_2011/`: `images/<class dir>/<name>.jpg`; `images.txt`
("<image id> <path under images/>"), `image_class_labels.txt` ("<image id> <class id>"), `classes.txt`
("<class id> <class dir>"), class ids 1-200. DML splits: classes 1-100 train (5,864 images), 101-200 test
(5,924). The archive's own train_test_split.txt (a classification split) is not used.
"""

import os

from mmsi_jax.data import archives

ARCHIVE = "CUB_200_2011.tgz"
_ROOT = "CUB_200_2011"


class Cub200(archives.OfficialArchivesBuilder):
  """CUB-200-2011 with the DML splits: train = classes 1-100, test = classes 101-200."""

  ARCHIVES = {ARCHIVE: "1,150,585,339 bytes"}
  HOMEPAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
  PUBLISHED_SPLIT_SIZES = {"train": 5_864, "test": 5_924}

  def _catalog(self, manual_dir: str) -> list[archives.Entry]:
    names = {key: f"{_ROOT}/{key}.txt" for key in ("images", "image_class_labels", "classes")}
    files = archives.read_files(os.path.join(manual_dir, ARCHIVE), names.values())
    paths = dict(archives.text_lines(files[names["images"]]))
    class_of = {image_id: int(class_id)
                for image_id, class_id in archives.text_lines(files[names["image_class_labels"]])}
    num_classes = len(archives.text_lines(files[names["classes"]]))
    return [archives.Entry(ARCHIVE, f"{_ROOT}/images/{path}", path, class_of[image_id],
                           archives.first_half_split(class_of[image_id], num_classes))
            for image_id, path in paths.items()]
