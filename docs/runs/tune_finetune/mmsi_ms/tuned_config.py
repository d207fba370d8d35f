"""configs/finetune.py:mmsi_ms with the settings of trial 6 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5018, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/mmsi_ms/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:mmsi_ms'
SETTINGS = {
    'optim.learning_rate': 2.903477382513301e-06,
    'loss.hparams.alpha': 2.818476701011628,
    'loss.hparams.beta': 17.998729178102785,
    'loss.hparams.base': 0.3449250736495658,
    'loss.hparams.epsilon': 0.01760773984920373,
    'miner.mmsi.net_learning_rate': 0.0002229506575001333,
    'miner.mmsi.memory_size': 62,
}
TRIAL = 6
VALIDATION_MAP_AT_R = 0.5017808929859894
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.4993268272992767


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
