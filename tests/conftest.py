"""Shared fixtures: the built-in dataset, built once per test session into a temporary directory; and
one compilation cache for the session (its processes and their subprocesses), so that a program that
several tests compile alike (e.g. a run and its resumed copy) compiles once."""

import contextlib
import io
import os
import shutil
import tempfile

import jax
import pytest

from mmsi_jax.data import pipeline


@pytest.fixture(scope="session")
def glyphs_build(tmp_path_factory):
  """(data_dir, what preparing it printed)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    pipeline.prepare("glyphs", data_dir)
  return data_dir, printed.getvalue()


@pytest.fixture(scope="session")
def glyphs_dir(glyphs_build):
  return glyphs_build[0]


_OWN_CACHE = []  # The cache directory this session made (removed at its end), if any.


# The end-to-end runs and the largest compilations, each 15 s or more on 2 CPU cores: `-m "not slow"`
# leaves them out while iterating (the full suite, as CI runs it, keeps them).
SLOW = ("test_two_processes_of_two_devices_train_like_one_device",
        "test_the_authors_layout_trains_every_classifier_and_branch",
        "test_table_equals_the_runs_metrics_and_a_failure_is_reported",
        "test_a_rerun_does_no_work_and_a_killed_run_resumes_to_the_same_result",
        "test_resume_after_a_kill_equals_an_uninterrupted_run_bitwise",
        "test_init_from_starts_a_new_run_from_another_runs_weights",
        "test_sharded_over_four_devices_gives_the_same_results",
        "test_classes_sharded_over_4_devices_give_the_results_of_one",
        "test_meta_gradients_match_finite_differences",
        "test_no_update_until_the_dictionary_holds_t_classes_nor_at_a_zero_meta_loss",
        "test_a_workdir_refuses_another_config_and_resumes_its_own_for_more_steps",
        "test_a_switched_loss_trains_from_the_command_line_and_ctrl_c_says_how_to_resume",
        "test_a_lost_process_stops_the_other_and_a_preempted_one_saves_with_it",
        "test_sigterm_saves_the_step_in_flight_and_the_resumed_run_equals_an_uninterrupted_one")


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.originalname in SLOW:
      item.add_marker(pytest.mark.slow)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: an end-to-end run or a large compilation (conftest.SLOW)")
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE.append(tempfile.mkdtemp(prefix="mmsi_jax_test_cache_"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE[0]  # Subprocesses inherit it.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  # Most of the suite's time is XLA compiling tiny programs: without its optimisation passes it
  # compiles them about a third faster, computing the same values up to rounding (JAX's
  # jax_disable_most_optimizations; subprocesses read the variable too). JAX_DISABLE_MOST_OPTIMIZATIONS=0
  # tests the optimised programs.
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  jax.config.update("jax_disable_most_optimizations",
                    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true"))
  # XLA's CPU fusion emitters take about twice as long as its older emitters to compile the suite's
  # programs (same values up to rounding); read when the backend starts, here and in subprocesses.
  # MMSI_JAX_TEST_FUSION_EMITTERS=1 tests with them.
  if os.environ.get("MMSI_JAX_TEST_FUSION_EMITTERS", "0").lower() not in ("1", "true"):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false"
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def host_devices_env(count: int) -> dict:
  """This process's environment for a subprocess of `count` CPU devices (XLA's host platform)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"}


def pytest_unconfigure(config):
  del config
  for path in _OWN_CACHE:
    shutil.rmtree(path, ignore_errors=True)
