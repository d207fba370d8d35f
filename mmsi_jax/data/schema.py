"""The features every dataset of the project stores, so that one pipeline reads them all."""

import numpy as np
import tensorflow_datasets as tfds


def example_features(image: tfds.features.Image) -> tfds.features.FeaturesDict:
  """The image (as given), its label (0-based within the split), original class id and file name."""
  return tfds.features.FeaturesDict({
      "image": image,
      "label": tfds.features.Scalar(np.int64, doc="Class index, 0-based within the split."),
      "class_id": tfds.features.Scalar(np.int64, doc="The class index in the whole dataset."),
      "file_name": tfds.features.Text(),
  })
