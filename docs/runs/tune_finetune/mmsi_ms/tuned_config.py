"""configs/finetune.py:mmsi_ms with the settings of trial 2 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5010, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/mmsi_ms/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:mmsi_ms'
SETTINGS = {
    'optim.learning_rate': 6.539197105511288e-07,
    'loss.hparams.alpha': 6.786597744549514,
    'loss.hparams.beta': 11.020145878849847,
    'loss.hparams.base': 0.4646194881759725,
    'loss.hparams.epsilon': 0.010174993676965845,
    'miner.mmsi.net_learning_rate': 0.006735473714879359,
    'miner.mmsi.memory_size': 15,
}
TRIAL = 2
VALIDATION_MAP_AT_R = 0.5009852942478998
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.4993268272992767


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
