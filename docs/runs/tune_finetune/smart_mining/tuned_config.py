"""configs/finetune.py:smart_mining with the settings of trial 6 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5209, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/smart_mining/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:smart_mining'
SETTINGS = {
    'optim.learning_rate': 1.2559792007498653e-05,
    'loss.hparams.margin': 0.2711140574131257,
    'loss.hparams.global_weight': 4.584450788207495,
    'loss.hparams.global_margin': 0.07370290855931423,
    'data.smart_mining.target_error': 0.7367703247428025,
}
TRIAL = 6
VALIDATION_MAP_AT_R = 0.5209278143948177
AUTHORS = False  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.49704870680211266


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
