"""configs/finetune.py:mmsi_ms with the settings of trial 11 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5029, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/mmsi_ms/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:mmsi_ms'
SETTINGS = {
    'optim.learning_rate': 5.77368340694147e-07,
    'loss.hparams.alpha': 4.495466903897269,
    'loss.hparams.beta': 19.089790867559636,
    'loss.hparams.base': 0.39512878750962477,
    'loss.hparams.epsilon': 0.020574646508050628,
    'miner.mmsi.net_learning_rate': 0.00019613309262728987,
    'miner.mmsi.memory_size': 1,
}
TRIAL = 11
VALIDATION_MAP_AT_R = 0.5028576308011543
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.4993268272992767


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
