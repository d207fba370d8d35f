"""configs/finetune.py:ms_continued with the settings of trial 14 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5029, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/ms_continued/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:ms_continued'
SETTINGS = {
    'optim.learning_rate': 5.378700040753188e-07,
    'loss.hparams.alpha': 1.7595048045515636,
    'loss.hparams.beta': 29.472145110105863,
    'loss.hparams.base': 0.3411566891097075,
    'loss.hparams.epsilon': 0.045770900080234746,
}
TRIAL = 14
VALIDATION_MAP_AT_R = 0.502893941217335
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.4998954306542873


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
