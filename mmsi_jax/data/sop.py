"""Stanford Online Products (Song et al. 2016): 120,053 product photographs of 22,634 products.

Official archive `Stanford_Online_Products.zip`, under `Stanford_Online_Products/`: `<super class>_final/
<name>.JPG` and the lists `Ebay_train.txt` and `Ebay_test.txt`, each a header line then
"<image_id> <class_id> <super_class_id> <path>". Their split is the DML one: train 59,551 images of
classes 1-11,318, test 60,502 images of classes 11,319-22,634.
"""

import os

from mmsi_jax.data import archives

ARCHIVE = "Stanford_Online_Products.zip"
_ROOT = "Stanford_Online_Products"


class StanfordOnlineProducts(archives.OfficialArchivesBuilder):
  """Stanford Online Products with its own train/test lists (disjoint classes)."""

  name = "sop"
  ARCHIVES = {ARCHIVE: "about 2.9 GB"}
  HOMEPAGE = "https://cvgl.stanford.edu/projects/lifted_struct/"
  PUBLISHED_SPLIT_SIZES = {"train": 59_551, "test": 60_502}

  def _catalog(self, manual_dir: str) -> list[archives.Entry]:
    lists = {split: f"{_ROOT}/Ebay_{split}.txt" for split in archives.SPLITS}
    files = archives.read_files(os.path.join(manual_dir, ARCHIVE), lists.values())
    entries = []
    for split, member in lists.items():
      header, *rows = archives.text_lines(files[member])
      if header != ["image_id", "class_id", "super_class_id", "path"]:
        raise ValueError(f"{member} in {ARCHIVE} starts with {header}, not the official header.")
      entries.extend(archives.Entry(ARCHIVE, f"{_ROOT}/{path}", path, int(class_id), split)
                     for _, class_id, _, path in rows)
    return entries
