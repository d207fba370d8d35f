"""Proxy losses: samples against C learnable class proxies, in the unified form.

Each is a function `loss(S, pos, neg, **hparams)` of the cosine similarities S [N, C] between N samples
and the L2-normalised proxies, with pos [N, C] marking each sample's own class and neg [N, C] the other
classes (rows of invalid samples are empty); see `pairs.build_proxy_pairs`. The softmax losses average
over the samples that have a class, i.e. the valid rows.

Each is declared by what it computes on one block of classes, so that it can also run over class blocks
without S whole (class_blocks.py): the softmax losses by their logits and the softmax's support
(`ClassSoftmax`), Proxy-Anchor by its per-class terms (`ClassTerms`).
"""

import jax
import jax.numpy as jnp

from mmsi_jax.losses.class_blocks import ClassSoftmax, ClassTerms, log1p_sum_exp_per_class
from mmsi_jax.search_space import Float, tunable


@tunable(temperature=Float(0.01, 0.2, log=True))
@ClassSoftmax
def norm_softmax(sim: jax.Array, pos: jax.Array, neg: jax.Array, *,
                 temperature: float = 0.05) -> tuple[jax.Array, jax.Array]:
  """NormSoftmax (Zhai and Wu, "Classification is a strong baseline for DML", BMVC 2019).

    L = mean_i -log( exp(S_iy / t) / sum_c exp(S_ic / t) ),   y the class of sample i.

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    temperature: t (0.05 in the paper).
  Returns the logits z [N, C] and the softmax's support [N, C]; ClassSoftmax makes them the loss.
  """
  return sim / temperature, pos | neg


@tunable(scale=Float(16.0, 128.0, log=True), margin=Float(0.05, 0.5))
@ClassSoftmax
def cosface(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, scale: float = 64.0,
            margin: float = 0.35) -> tuple[jax.Array, jax.Array]:
  """CosFace, the large margin cosine loss (Wang et al., CVPR 2018, eq. 4).

    L = mean_i -log( exp(s (S_iy - m)) / (exp(s (S_iy - m)) + sum_{c != y} exp(s S_ic)) )

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    scale: s. margin: m (the paper's s = 64, m = 0.35).
  Returns the logits z [N, C] and the softmax's support [N, C]; ClassSoftmax makes them the loss.
  """
  return scale * jnp.where(pos, sim - margin, sim), pos | neg


@tunable(scale=Float(16.0, 128.0, log=True), margin=Float(0.05, 0.7))
@ClassSoftmax
def arcface(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, scale: float = 64.0,
            margin: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """ArcFace, the additive angular margin loss (Deng et al., CVPR 2019, eq. 3).

    L = mean_i -log( exp(s cos(theta_iy + m)) / (exp(s cos(theta_iy + m)) + sum_{c != y} exp(s S_ic)) )

  with theta_iy = arccos S_iy. Where theta + m > pi, cos(theta + m) would rise again with theta; as in
  the authors' code the target logit continues instead as S_iy - m sin(m), which keeps it decreasing.
  S is clipped to one float epsilon inside [-1, 1] so that arccos has a finite derivative.

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    scale: s. margin: m in radians (the paper's s = 64, m = 0.5).
  Returns the logits z [N, C] and the softmax's support [N, C]; ClassSoftmax makes them the loss.
  """
  eps = jnp.finfo(sim.dtype).eps
  theta = jnp.arccos(jnp.clip(sim, -1.0 + eps, 1.0 - eps))
  with_margin = jnp.where(theta + margin <= jnp.pi, jnp.cos(theta + margin),
                          sim - margin * jnp.sin(margin))
  return scale * jnp.where(pos, with_margin, sim), pos | neg


@tunable(scale=Float(3.0, 48.0, log=True))
@ClassSoftmax
def proxy_nca(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, scale: float = 12.0,
              own_proxy_in_denominator: bool = False) -> tuple[jax.Array, jax.Array]:
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
  Returns the logits z [N, C] and the softmax's support [N, C]; ClassSoftmax makes them the loss.
  """
  denominator = pos | neg if own_proxy_in_denominator else neg
  return 2.0 * scale * sim, denominator


@tunable(alpha=Float(8.0, 64.0, log=True), margin=Float(0.0, 0.4))
@ClassTerms
def proxy_anchor(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, alpha: float = 32.0,
                 margin: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Proxy-Anchor (Kim et al., CVPR 2020): each proxy is an anchor against the samples.

    L = 1/|C+| sum_{c in C+} log(1 + sum_{i in X_c+} exp(-alpha (S_ic - margin)))
      + 1/|C|  sum_{c in C}  log(1 + sum_{i in X_c-} exp( alpha (S_ic + margin)))

  X_c+ are the samples of class c, X_c- the others, C+ the proxies with at least one sample, C the
  proxies with at least one sample or negative (a column with neither, such as an unfilled virtual class
  of MemVir, is no proxy of the step). With no valid sample at all L = 0.

  Args:
    sim: [N, C] sample-proxy similarities; pos, neg: [N, C] bool masks.
    alpha: the scale. margin: the margin delta (the paper's alpha = 32, delta = 0.1).
  Returns the per-class terms (pull [C], push [C]); ClassTerms makes them the loss.
  """
  return (log1p_sum_exp_per_class(-alpha * (sim - margin), pos),
          log1p_sum_exp_per_class(alpha * (sim + margin), neg))
