"""Convolutions whose output has fewer positions than the kernel has taps, computed as a matrix product.

XLA's algebraic simplifier swaps the operands of such a convolution (the kernel becomes the smaller
operand), and XLA:CPU then runs the swapped form, which its Eigen path does not cover, through a naive
loop: a 3x3 convolution over a 2x2 map with 512 channels (ResNet-18's last stage at 64 px) takes ~70x
longer than the same FLOPs at 4x4, and its input-gradient convolution swaps the same way. Here those
convolutions are patches (im2col: kh * kw shifted, strided slices of the padded input, concatenated)
times the kernel reshaped to [kh * kw * C_in, C_out]: the same sums (up to float rounding), and their
derivatives are slices, pads and matrix products, which run at full speed.

Use as `nn.Conv(..., conv_general_dilated=conv_general_dilated)`, or `Conv`: nn.Conv's parameters.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` for NHWC inputs and HWIO kernels, by im2col when the output has fewer
  positions (oh * ow) than the kernel has taps (kh * kw); other cases go to lax unchanged."""
  conv = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  standard = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if (lhs.ndim != 4 or feature_group_count != 1 or kwargs
      or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != standard):
    return conv()
  window = rhs.shape[:2]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, window_strides, padding)
  padding = [tuple(p) for p in padding]
  out = [(size + low + high - k) // stride + 1
         for size, (low, high), k, stride in zip(lhs.shape[1:3], padding, window, window_strides)]
  if math.prod(out) >= math.prod(window) or any(p < 0 for pair in padding for p in pair):
    return conv()
  x = jnp.pad(lhs, [(0, 0), *padding, (0, 0)])
  (sh, sw), (oh, ow) = window_strides, out
  patches = jnp.concatenate(
      [x[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
       for i in range(window[0]) for j in range(window[1])], axis=-1)
  return jnp.dot(patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
