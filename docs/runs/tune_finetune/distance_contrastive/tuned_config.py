"""configs/finetune.py:distance_contrastive with the settings of trial 1 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5117, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/distance_contrastive/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:distance_contrastive'
SETTINGS = {
    'optim.learning_rate': 6.260326907499729e-05,
    'loss.hparams.margin': 1.5727840495586292,
}
TRIAL = 1
VALIDATION_MAP_AT_R = 0.511713159243421
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.49468405603489374


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
