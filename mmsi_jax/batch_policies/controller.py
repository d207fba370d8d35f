"""Smart Mining's adaptive controller of the negative bound kappa (Harwood et al., ICCV 2017, sec. 3.3).

A negative n of anchor a is valid when d^2(a, n) > kappa * d^2(a, p_NN) (batch_policies/smart_mining.py): a larger
kappa admits only easier negatives, so fewer of the triplets have a non-zero loss. The controller
steers kappa so that e, the share of a batch's triplets with a non-zero loss, approaches a target e_t:

  observe (e, kappa) after each refresh of the batches; fit kappa = alpha e + beta by least squares over
  the last `window` observations; set kappa = alpha e_t + beta.

What the paper leaves open, and what is chosen here (docs/METHODS.md):
  - the window: the last `window` observations (one per refresh), 4 by default;
  - the fit is used only where it is determined and says what the bound does, i.e. the window's e and
    kappa both vary and alpha < 0. Otherwise (the first observations, all taken at one kappa) kappa
    takes a multiplicative step towards the target, kappa * exp(step_gain * (e - e_t)): down (harder
    negatives) while e is below the target, up while it is above;
  - kappa is kept in [kappa_min, kappa_max].

The state is a small fixed-shape pytree with pure `init` and `update`, like the memories of
mining/memory.py.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Below this spread (variance) the window's e or kappa counts as constant and the fit as undetermined.
_MIN_SPREAD = 1e-12


class ControllerState(NamedTuple):
  """kappa and the window of recent observations.

  Attributes:
    kappa: [] the bound factor for the next refresh.
    errors: [window] e of each observation (oldest overwritten first).
    kappas: [window] the kappa each observation was taken at.
    count: [] int32, observations so far (slot count % window is written next).
  """
  kappa: jax.Array
  errors: jax.Array
  kappas: jax.Array
  count: jax.Array


def init(kappa: float, window: int) -> ControllerState:
  """The controller before any observation, at the initial kappa (the paper starts it large)."""
  if window < 2:
    raise ValueError(f"The controller's window must hold at least 2 observations to fit a line, got "
                     f"{window}.")
  return ControllerState(kappa=jnp.asarray(kappa, jnp.float32),
                         errors=jnp.zeros((window,), jnp.float32),
                         kappas=jnp.zeros((window,), jnp.float32), count=jnp.zeros((), jnp.int32))


def fit(errors: jax.Array, kappas: jax.Array, valid: jax.Array):
  """Least squares kappa = alpha e + beta over the valid observations: (alpha, beta, determined), where
  determined says that e and kappa both vary over them."""
  weights = valid.astype(errors.dtype)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  mean_e, mean_kappa = jnp.sum(weights * errors) / count, jnp.sum(weights * kappas) / count
  var_e = jnp.sum(weights * (errors - mean_e) ** 2) / count
  var_kappa = jnp.sum(weights * (kappas - mean_kappa) ** 2) / count
  covariance = jnp.sum(weights * (errors - mean_e) * (kappas - mean_kappa)) / count
  alpha = covariance / jnp.maximum(var_e, _MIN_SPREAD)
  return alpha, mean_kappa - alpha * mean_e, (var_e > _MIN_SPREAD) & (var_kappa > _MIN_SPREAD)


def update(state: ControllerState, error: jax.Array, *, target: float, step_gain: float,
           kappa_min: float, kappa_max: float) -> ControllerState:
  """Records the observation (error, state.kappa) and sets the kappa of the next refresh.

  Args:
    state: the controller.
    error: e in [0, 1], the share of triplets with a non-zero loss mined at state.kappa.
    target: e_t (the paper: 0.5 to 0.75).
    step_gain: the rate of the multiplicative step taken when the fit is undetermined.
    kappa_min, kappa_max: the range kappa is kept in.
  """
  state = jax.tree.map(jnp.asarray, state)  # Host arrays too (a restored checkpoint's).
  window = state.errors.shape[0]
  slot = state.count % window
  errors = state.errors.at[slot].set(error)
  kappas = state.kappas.at[slot].set(state.kappa)
  count = state.count + 1
  alpha, beta, determined = fit(errors, kappas, jnp.arange(window) < count)
  fitted = alpha * target + beta
  stepped = state.kappa * jnp.exp(step_gain * (error - target))
  kappa = jnp.clip(jnp.where(determined & (alpha < 0), fitted, stepped), kappa_min, kappa_max)
  return ControllerState(kappa=kappa.astype(jnp.float32), errors=errors, kappas=kappas, count=count)
