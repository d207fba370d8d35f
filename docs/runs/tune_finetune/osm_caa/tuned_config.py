"""configs/finetune.py:osm_caa with the settings of trial 15 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5133, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/osm_caa/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:osm_caa'
SETTINGS = {
    'optim.learning_rate': 5.833974513042002e-06,
    'loss.hparams.margin': 1.6078948087937923,
    'miner.osm_caa.pos_sigma': 1.8934408537888414,
    'miner.osm_caa.attention_sigma': 0.3001438904114645,
}
TRIAL = 15
VALIDATION_MAP_AT_R = 0.5133075571646137
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.4461379312997451


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
