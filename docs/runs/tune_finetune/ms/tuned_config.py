"""configs/finetune.py:ms with the settings of trial 4 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5270, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/ms/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:ms'
SETTINGS = {
    'optim.learning_rate': 5.81734976535655e-06,
    'loss.hparams.alpha': 2.3048767749019365,
    'loss.hparams.beta': 11.111364211547329,
    'loss.hparams.base': 0.7337182439882133,
    'loss.hparams.epsilon': 0.2825617183678479,
}
TRIAL = 4
VALIDATION_MAP_AT_R = 0.5269938804795189
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.5087557467319614


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
