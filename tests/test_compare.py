"""The comparison command end to end on tiny variants (tests/compare_config.py): its table equals the
runs' own metrics, a rerun does no work, a killed run resumes to the same result, a failure is
reported and the rest finish."""

import csv
import json
import os
import shutil
import subprocess
import sys

from absl import app
import numpy as np
import pytest

from configs import cars196, cub200, demo, finetune, sop
from mmsi_jax import compare, reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1)


def run_compare(workdir, data_dir, *args):
  command = [sys.executable, "-m", "mmsi_jax.compare", "--config=tests/compare_config.py",
             f"--seeds={','.join(map(str, SEEDS))}", f"--workdir={workdir}", "--parallel=2",
             f"--config.data.data_dir={data_dir}", *args]
  # The runs share compiled programs with each other and the suite's other runs through the session's
  # persistent cache (tests/conftest.py): only the first of each compiles.
  cache = {"JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, **cache})


def final_test_metrics(run_dir):
  record = reporting.read_metrics(run_dir)[-1]
  return {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("test/")}


@pytest.fixture(scope="module")
def compared(glyphs_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("compare"))
  return workdir, run_compare(workdir, glyphs_dir)


def test_table_equals_the_runs_metrics_and_a_failure_is_reported(compared, glyphs_dir):
  workdir, result = compared
  data_dir = glyphs_dir
  assert result.returncode == 1  # The broken variant's two runs; the others finished.
  assert "2 of 6 runs did not finish" in result.stderr
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = {row["variant"]: row for row in csv.DictReader(f)}
  assert list(rows) == ["raw pixels", "ms", "contrastive", "broken"]  # Step 0's reference first.
  baselines = [reporting.read_metrics(os.path.join(workdir, v, f"seed_{s}"))[0]["baseline/recall@1"]
               for v in ("ms", "contrastive") for s in SEEDS]
  assert rows["raw pixels"]["finished"] == "4"
  assert float(rows["raw pixels"]["recall@1_mean"]) == pytest.approx(np.mean(baselines), rel=1e-12)
  for variant in ("ms", "contrastive"):
    finals = [final_test_metrics(os.path.join(workdir, variant, f"seed_{s}")) for s in SEEDS]
    assert set(finals[0]) == {"recall@1", "recall@2", "recall@4", "recall@8", "precision@1",
                              "r_precision", "map@r"}
    for metric in finals[0]:
      values = [f[metric] for f in finals]
      assert float(rows[variant][f"{metric}_mean"]) == pytest.approx(np.mean(values), rel=1e-12)
      assert float(rows[variant][f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert rows[variant]["finished"] == "2" and rows[variant]["failed"] == "0"
    assert float(rows[variant]["wall_seconds_mean"]) > 0 and float(rows[variant]["step_ms_mean"]) > 0
    assert rows[variant]["plain_variant"] == variant and float(rows[variant]["step_time_vs_plain"]) == 1
    for seed in SEEDS:  # The overrides reached every run.
      with open(os.path.join(workdir, variant, f"seed_{seed}", "config.json")) as f:
        config = json.load(f)
      assert config["data"]["data_dir"] == data_dir and config["seed"] == seed
  broken = rows["broken"]
  assert broken["finished"] == "0" and broken["failed"] == "2" and broken["recall@1_mean"] == ""
  assert "must be a multiple of train.log_every" in broken["errors"]
  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read()
  assert "| broken | 0/2, 2 failed |" in table and "must be a multiple of train.log_every" in table
  mean, sd = float(rows["ms"]["recall@1_mean"]), float(rows["ms"]["recall@1_std"])
  assert f"| ms | 2/2 | {mean:.4f} ± {sd:.4f} |" in table
  for name in ("recall_at_1.png", "final_recall_at_1.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0


def test_a_rerun_does_no_work_and_a_killed_run_resumes_to_the_same_result(compared, glyphs_dir):
  workdir, _ = compared
  run_dir = os.path.join(workdir, "ms", "seed_1")
  finished_records = reporting.read_metrics(run_dir)
  log_size = os.path.getsize(os.path.join(run_dir, compare.LOG_FILE))

  rerun = run_compare(workdir, glyphs_dir, "--variants=ms,contrastive")
  assert rerun.returncode == 0, rerun.stderr
  assert "4 runs finished, 0 to run" in rerun.stdout
  assert not [line for line in rerun.stdout.splitlines() if line.startswith("start ")]
  assert os.path.getsize(os.path.join(run_dir, compare.LOG_FILE)) == log_size

  # What a kill after the step-2 checkpoint leaves: that checkpoint, and a step-4 log line it wrote.
  shutil.rmtree(os.path.join(run_dir, "checkpoints", "4"))
  with open(os.path.join(run_dir, reporting.METRICS_FILE), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in finished_records
                 if r["step"] <= 2 or (r["step"] == 4 and "train/loss" in r))

  resumed = run_compare(workdir, glyphs_dir, "--variants=ms,contrastive")
  assert resumed.returncode == 0, resumed.stderr
  assert "3 runs finished, 1 to run" in resumed.stdout and "done ms seed 1" in resumed.stdout
  with open(os.path.join(run_dir, compare.LOG_FILE)) as f:
    assert "Resuming at step 2 of 4" in f.read()
  assert reporting.read_metrics(run_dir) == finished_records
  assert compare.Run("ms", 1, run_dir, None).status()["attempts"] == 2

  # Runs made with other settings than the command's: a table says so, a run stops before any work.
  table = run_compare(workdir, glyphs_dir, "--variants=ms", "--norun", "--config.train.num_steps=6")
  assert table.returncode == 0, table.stderr
  assert "2 of the runs" in table.stdout and "train.num_steps: 4 in the run, 6 now" in table.stdout
  refused = run_compare(workdir, glyphs_dir, "--variants=ms", "--config.loss.hparams.alpha=3")
  assert refused.returncode == 1 and "loss.hparams.alpha: 2.0 in the run, 3.0 now" in refused.stderr
  assert "start " not in refused.stdout
  assert reporting.read_metrics(run_dir) == finished_records


def test_overrides_apply_to_every_variant_as_its_run_parses_them():
  overrides = ["--config.train.num_steps=5", "--config.model.widths=(8,8)"]
  config = compare.variant_config("configs/demo.py", "mmsi_ms", overrides, seed=2)
  assert config.train.num_steps == 5 and tuple(config.model.widths) == (8, 8) and config.seed == 2
  assert config.miner.name == "mmsi" and config.miner.mmsi.memory_size == 5  # The variant's own.
  # A component chosen by name starts from its own defaults in every variant, as in mmsi_jax.main.
  switched = ["--config.loss.name=triplet", "--config.loss.hparams.margin=0.3"]
  for variant in ("ms", "contrastive", "mmsi_ms"):
    config = compare.variant_config("configs/demo.py", variant, switched, seed=0)
    assert dict(config.loss.hparams) == {"margin": 0.3}
  with pytest.raises(app.UsageError, match="ms: .*loss.hparams.alpah.*did you mean --config.loss.hparams.alpha"):
    compare.variant_config("configs/demo.py", "ms", ["--config.loss.hparams.alpah=1"], seed=0)


def test_each_variant_is_timed_against_its_plain_loss():
  configs = {v: demo.get_config(v) for v in demo.VARIANTS if v}
  counterparts = {v: compare.plain_counterpart(c, configs) for v, c in configs.items()}
  assert counterparts["ms"] == counterparts["mmsi_ms"] == counterparts["xbm_ms"] == "ms"
  assert counterparts["mmsi_contrastive"] == counterparts["xbm_contrastive"] == "contrastive"
  assert counterparts["mmsi_triplet"] == "triplet"
  assert counterparts["proxy_anchor"] == "proxy_anchor"  # A proxy loss is its own plain loss.
  del configs["ms"]
  assert compare.plain_counterpart(demo.get_config("mmsi_ms"), configs) is None


T_975_4_DOF = 2.7764451051977987  # Student's t, 97.5% quantile, 4 degrees of freedom.


@pytest.mark.parametrize("method, baseline, verdict", [
    ([0.56, 0.57, 0.58], [0.50, 0.51, 0.52], "helps"),
    ([0.52, 0.53, 0.54], [0.50, 0.51, 0.52], "cannot tell"),
    ([0.46, 0.47, 0.48], [0.50, 0.51, 0.52], "does not help (worse)"),
    ([0.510, 0.511, 0.512], [0.510, 0.511, 0.512], "does not help"),  # No gain of 0.005 or more.
])
def test_a_method_helps_when_welchs_interval_of_its_gain_lies_above_zero(method, baseline, verdict):
  gain, low, high, said = compare.help_verdict(method, baseline, margin=0.005)
  # Three seeds a side with equal spreads: Welch's interval has 4 degrees of freedom.
  standard_error = np.sqrt(np.var(method, ddof=1) / 3 + np.var(baseline, ddof=1) / 3)
  expected_gain = np.mean(method) - np.mean(baseline)
  np.testing.assert_allclose([gain, low, high], [expected_gain, expected_gain - T_975_4_DOF *
                             standard_error, expected_gain + T_975_4_DOF * standard_error], rtol=1e-9)
  assert said == verdict
  assert compare.help_verdict([0.6], baseline, margin=0.005)[3] == "cannot tell: under 2 seeds"


@pytest.mark.parametrize("module", [demo, finetune, cub200, cars196, sop])
def test_every_method_has_its_baseline_among_the_configs_variants(module):
  variants = set(module.VARIANTS) | set(getattr(module, "EXTRA_VARIANTS", ()))
  assert all(m in variants and b in variants and m != b for m, b in module.BASELINES.items())
  methods = {v for v in variants if v.startswith(("mmsi_", "xbm_ms", "xbm_contrastive", "memvir_"))
             and not v.endswith("_resnet50")}
  assert methods <= set(module.BASELINES)


def test_bad_arguments_stop_before_any_run():
  with pytest.raises(app.UsageError, match="pass the config file alone"):
    compare.select_variants("configs/demo.py:ms", [])
  with pytest.raises(app.UsageError, match=r"has no variants \['nope'\]"):
    compare.select_variants("tests/compare_config.py", ["ms", "nope"])
  _, variants = compare.select_variants("configs/demo.py", [])
  assert "" not in variants and variants[:3] == ["ms", "contrastive", "triplet"]
  assert "bn_inception_osm_caa" not in variants  # An extra variant runs when named.
  assert compare.select_variants("configs/demo.py", ["bn_inception_osm_caa"])[1] == [
      "bn_inception_osm_caa"]
  with pytest.raises(app.UsageError, match="--seeds=0,1,2"):
    compare.config_overrides(["--config.seed=3"])
  with pytest.raises(app.UsageError, match="as --config.train.num_steps=VALUE"):
    compare.config_overrides(["--config.train.num_steps", "5"])
  assert compare.config_overrides(["--seeds=0", "--config.a.b=1"]) == ["--config.a.b=1"]


def test_runs_share_the_local_gpus_and_take_the_whole_cpu(monkeypatch):
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert compare.device_slots("gpu", 4, 1, 0) == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(4)]
  assert compare.device_slots("gpu", 5, 2, 0) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                  {"CUDA_VISIBLE_DEVICES": "2,3"}]
  assert compare.device_slots("gpu", 4, 2, 1) == [{"CUDA_VISIBLE_DEVICES": "0,1"}]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # Numbering within what this process may use.
  assert compare.device_slots("gpu", 2, 1, 0) == [{"CUDA_VISIBLE_DEVICES": "3"},
                                                  {"CUDA_VISIBLE_DEVICES": "5"}]
  assert compare.device_slots("cpu", 1, 1, 0) == [{}]
  assert compare.device_slots("cpu", 1, 1, 2) == [{}, {}]
  with pytest.raises(app.UsageError, match="hold 2 runs"):
    compare.device_slots("gpu", 4, 2, 3)
