"""Proxy losses: samples against C learnable class proxies, in the unified form.

Each is a function `loss(S, pos, neg, **hparams)` of the cosine similarities S [N, C] between N samples
and the L2-normalised proxies, with pos [N, C] marking each sample's own class and neg [N, C] the other
classes (rows of invalid samples are empty); see `pairs.build_proxy_pairs`. The softmax losses average
over the samples that have a class, i.e. the valid rows.
"""

import jax
import jax.numpy as jnp

from mmsi_jax.losses.masked import masked_log1p_sum_exp, softmax_cross_entropy
from mmsi_jax.search_space import Float, tunable


@tunable(temperature=Float(0.01, 0.2, log=True))
def norm_softmax(sim: jax.Array, pos: jax.Array, neg: jax.Array, *,
                 temperature: float = 0.05) -> jax.Array:
  """NormSoftmax (Zhai and Wu, "Classification is a strong baseline for DML", BMVC 2019).

    L = mean_i -log( exp(S_iy / t) / sum_c exp(S_ic / t) ),   y the class of sample i.

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    temperature: t (0.05 in the paper).
  """
  return softmax_cross_entropy(sim / temperature, pos, pos | neg)


@tunable(scale=Float(16.0, 128.0, log=True), margin=Float(0.05, 0.5))
def cosface(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, scale: float = 64.0,
            margin: float = 0.35) -> jax.Array:
  """CosFace, the large margin cosine loss (Wang et al., CVPR 2018, eq. 4).

    L = mean_i -log( exp(s (S_iy - m)) / (exp(s (S_iy - m)) + sum_{c != y} exp(s S_ic)) )

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    scale: s. margin: m (the paper's s = 64, m = 0.35).
  """
  return softmax_cross_entropy(scale * jnp.where(pos, sim - margin, sim), pos, pos | neg)


@tunable(scale=Float(16.0, 128.0, log=True), margin=Float(0.05, 0.7))
def arcface(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, scale: float = 64.0,
            margin: float = 0.5) -> jax.Array:
  """ArcFace, the additive angular margin loss (Deng et al., CVPR 2019, eq. 3).

    L = mean_i -log( exp(s cos(theta_iy + m)) / (exp(s cos(theta_iy + m)) + sum_{c != y} exp(s S_ic)) )

  with theta_iy = arccos S_iy. Where theta + m > pi, cos(theta + m) would rise again with theta; as in
  the authors' code the target logit continues instead as S_iy - m sin(m), which keeps it decreasing.
  S is clipped to one float epsilon inside [-1, 1] so that arccos has a finite derivative.

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    scale: s. margin: m in radians (the paper's s = 64, m = 0.5).
  """
  eps = jnp.finfo(sim.dtype).eps
  theta = jnp.arccos(jnp.clip(sim, -1.0 + eps, 1.0 - eps))
  with_margin = jnp.where(theta + margin <= jnp.pi, jnp.cos(theta + margin),
                          sim - margin * jnp.sin(margin))
  return softmax_cross_entropy(scale * jnp.where(pos, with_margin, sim), pos, pos | neg)


@tunable(scale=Float(3.0, 48.0, log=True))
def proxy_nca(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, scale: float = 12.0,
              own_proxy_in_denominator: bool = False) -> jax.Array:
  """ProxyNCA (Movshovitz-Attias et al., "No fuss distance metric learning using proxies", ICCV 2017),
  on squared Euclidean distances of unit vectors d = |x - p|^2 = 2 - 2 S, scaled.

    L = mean_i -log( exp(-scale d(x_i, p_y)) / sum_{c in D_i} exp(-scale d(x_i, p_c)) )
      = mean_i [ log sum_{c in D_i} exp(2 scale S_ic) - 2 scale S_iy ]

  The denominator D_i is every class but the sample's own, as in the paper, or every class, as in
  MemVir's code (navervision/MemVir, loss/softmax_variants.py: a log-softmax over all proxies).

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    scale: multiplies the squared distances (so the cosine logits are scaled by 2 * scale); 12 is
      MemVir's setting for ProxyNCA.
    own_proxy_in_denominator: D_i holds the own class too (MemVir's code) instead of the others only.
  """
  denominator = pos | neg if own_proxy_in_denominator else neg
  return softmax_cross_entropy(2.0 * scale * sim, pos, denominator)


@tunable(alpha=Float(8.0, 64.0, log=True), margin=Float(0.0, 0.4))
def proxy_anchor(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, alpha: float = 32.0,
                 margin: float = 0.1) -> jax.Array:
  """Proxy-Anchor (Kim et al., CVPR 2020): each proxy is an anchor against the samples.

    L = 1/|C+| sum_{c in C+} log(1 + sum_{i in X_c+} exp(-alpha (S_ic - margin)))
      + 1/|C|  sum_{c in C}  log(1 + sum_{i in X_c-} exp( alpha (S_ic + margin)))

  X_c+ are the samples of class c, X_c- the others, C+ the proxies with at least one sample, C the
  proxies with at least one sample or negative (a column with neither, such as an unfilled virtual class
  of MemVir, is no proxy of the step). With no valid sample at all L = 0.

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    alpha: the scale. margin: the margin delta (the paper's alpha = 32, delta = 0.1).
  """
  has_samples = jnp.any(pos, axis=0)
  pos_term = masked_log1p_sum_exp((-alpha * (sim - margin)).T, pos.T)
  neg_term = masked_log1p_sum_exp((alpha * (sim + margin)).T, neg.T)
  return (jnp.sum(pos_term) / jnp.maximum(jnp.sum(has_samples), 1)
          + jnp.sum(neg_term) / jnp.maximum(jnp.sum(jnp.any(pos | neg, axis=0)), 1))
