"""configs/finetune.py:memvir_proxy_nca with the settings of trial 0 of the study in this
directory (mmsi_jax.tune): validation MAP@R 0.5071, on its half-and-half split.
The trials ran with these overrides, which this config does not apply:
  --config.train.num_steps=200
  --config.train.eval_every=50

  python -m mmsi_jax.main --config=runs/tune_finetune/memvir_proxy_nca/tuned_config.py --workdir=WORKDIR
"""

from mmsi_jax import config_cli, search_space
from mmsi_jax.search_space import Share

CONFIG = 'configs/finetune.py:memvir_proxy_nca'
SETTINGS = {
    'optim.learning_rate': 5e-05,
    'loss.hparams.scale': 12.0,
    'references.memvir.num_steps': 5,
    'references.memvir.step_gap': 9,
    'references.memvir.warmup_steps': Share(of_run=0.25),
}
TRIAL = 0
VALIDATION_MAP_AT_R = 0.5070776214396271
AUTHORS = True  # Whether the best trial is the authors' settings.
# The validation MAP@R of the authors' settings (the study's first trial; None if it did not finish).
AUTHORS_VALIDATION_MAP_AT_R = 0.5070776214396271


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"{__file__} has no variants, got {variant!r}.")
  config, _ = config_cli.resolve(CONFIG, ())
  search_space.apply(config, SETTINGS)
  return config
