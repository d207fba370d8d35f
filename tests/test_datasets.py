"""The CUB-200-2011, Cars196 and SOP builders on fake archives in the official layouts: contents, labels,
original bytes, the corrupt image, a missing archive, an incomplete archive and a half-finished build."""

import contextlib
import io
import logging
import os

import numpy as np
import pytest

from mmsi_jax.data import pipeline, prepare
from tests import fake_archives


@pytest.fixture(scope="module", params=sorted(fake_archives.MAKERS))
def built(request, tmp_path_factory):
  """(name, fake dataset, data_dir, prepare's summary, captured log messages, printed text) for each
  dataset, built once."""
  name = request.param
  manual_dir = str(tmp_path_factory.mktemp(f"{name}_manual"))
  data_dir = str(tmp_path_factory.mktemp(f"{name}_tfds"))
  fake = fake_archives.MAKERS[name](manual_dir)
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger().addHandler(handler)
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      summary = pipeline.prepare(name, data_dir, manual_dir)
  finally:
    logging.getLogger().removeHandler(handler)
  return name, fake, data_dir, summary, [r.getMessage() for r in records], printed.getvalue()


def test_every_listed_image_is_written_with_its_original_bytes_and_labels(built):
  name, fake, data_dir, _, _, _ = built
  for split, expected in fake.expected.items():
    source = pipeline.load_split(name, split, data_dir, decode_images=False)
    records = {r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]: r
               for r in source}
    assert set(records) == set(expected)
    class_ids = sorted({class_id for class_id, _ in expected.values()})
    for file_name, (class_id, data) in expected.items():
      record = records[file_name]
      assert record["image"] == data  # The original JPEG, not re-encoded.
      assert int(record["class_id"]) == class_id
      assert int(record["label"]) == class_ids.index(class_id)


def test_decoded_images_are_hwc_uint8_rgb(built):
  name, fake, data_dir, _, _, _ = built
  source = pipeline.load_split(name, "test", data_dir)
  example = source[0]
  assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
  assert example["image"].shape[2] == 3
  assert len(source.__getitems__([0, 1])) == 2
  assert 0 <= int(example["label"]) < len({c for c, _ in fake.expected["test"].values()})


def test_corrupt_image_is_reported_skipped_and_counted(built):
  name, fake, _, summary, warnings, _ = built
  assert {split: report["images"] for split, report in summary.items()} == {
      split: len(expected) for split, expected in fake.expected.items()}
  assert summary["test"]["corrupt"] == [fake.corrupt]
  assert summary["train"]["corrupt"] == []
  assert any(fake.corrupt in w and "corrupt" in w for w in warnings)


def test_totals_different_from_the_published_ones_are_warned(built):
  name, _, _, _, warnings, _ = built
  assert sum("the published split has" in w for w in warnings) == 2, warnings


def test_preparing_says_what_it_reads_and_what_it_wrote_and_nothing_of_downloads(built):
  name, fake, data_dir, _, warnings, printed = built
  assert f"Preparing dataset {name} in {data_dir}, from the archives in " in printed, printed
  sizes = ", ".join(f"{split} {len(expected):,}" for split, expected in fake.expected.items())
  assert f"({sizes} images)" in printed, printed
  assert "download" not in printed.lower(), printed  # TFDS's lines size a download that never was.
  assert not any("dataset_info.json" in w for w in warnings), warnings


def test_missing_archive_names_expected_files_sizes_and_directory(tmp_path, capsys):
  fake_archives.make_cars196(str(tmp_path))
  os.remove(tmp_path / "cars_test.tgz")
  with pytest.raises(FileNotFoundError) as error:
    pipeline.prepare("cars196", str(tmp_path / "tfds"), str(tmp_path))
  message = str(error.value)
  for expected in ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz",
                   "cars_test_annos_withlabels.mat", "0.98 GB", "missing: cars_test.tgz", str(tmp_path)):
    assert expected in message
  assert prepare.main(["--dataset=cars196", f"--manual_dir={tmp_path}",
                       f"--data_dir={tmp_path / 'tfds'}"]) == 1
  assert "missing: cars_test.tgz" in capsys.readouterr().err


def test_half_finished_build_is_never_read_and_is_redone(tmp_path):
  manual_dir, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  manual_dir.mkdir()
  # The test split lists an image the archive lacks: the build fails after writing the train split.
  fake_archives.make_cub200(str(manual_dir), extra_listed="004.Groove_billed_Ani/Lost_0001.jpg")
  with pytest.raises(FileNotFoundError, match="Lost_0001.jpg"):
    pipeline.prepare("cub200", data_dir, str(manual_dir))
  with pytest.raises(FileNotFoundError, match="not prepared"):
    pipeline.load_split("cub200", "train", data_dir)

  fake = fake_archives.make_cub200(str(manual_dir))
  summary = pipeline.prepare("cub200", data_dir, str(manual_dir))
  assert summary["train"]["images"] == len(fake.expected["train"])
  assert len(pipeline.load_split("cub200", "train", data_dir)) == len(fake.expected["train"])


def test_prepare_command_prints_the_summary(built, capsys):
  name, fake, data_dir, _, _, _ = built
  assert prepare.main([f"--dataset={name}", f"--manual_dir={fake.manual_dir}",
                       f"--data_dir={data_dir}"]) == 0
  out = capsys.readouterr().out
  assert f"{name} test: {len(fake.expected['test'])} images; 1 corrupt images skipped: {fake.corrupt}" \
      in out
