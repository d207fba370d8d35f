"""configs/finetune.py:xbm_ms with the settings of trial 0 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5130, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/xbm_ms/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:xbm_ms'
SETTINGS = {
    'optim.learning_rate': 5e-05,
    'loss.hparams.alpha': 2.0,
    'loss.hparams.beta': 50.0,
    'loss.hparams.base': 0.5,
    'loss.hparams.epsilon': 0.1,
    'references.xbm.size': 2048,
    'references.xbm.start_step': Share(of_run=0.25),
}
TRIAL = 0
VALIDATION_MAP_AT_R = 0.5130248845599514
AUTHORS = True  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.5130248845599514


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
